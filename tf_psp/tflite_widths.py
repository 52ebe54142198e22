"""Copies of a converted one-layer TFLite model at other channel widths, without converting.

Converting a Keras layer to TFLite takes 0.1-0.2 s (tracing, a SavedModel,
the MLIR converter); a latency table needs hundreds of widths of each layer.
The converted graph of one layer does not depend on its widths, only the
tensor shapes and the constant buffers do (and, in an int8 model, the
per-channel quantization scales). So each layer is converted once, at
*marker* widths (`c_in`, `c_out` chosen so that no other dimension of its
tensors takes those values), and every other width is a copy of that
subgraph with each marker dimension replaced (`c_in -> w_in`,
`c_out -> w_out`, `m * c_in -> m * w_in` for depth multipliers) and the
constant float buffers refilled with random values at their new sizes
(latency does not depend on the values of float weights), int8 weights and
int32 biases of an int8 model likewise, with as many per-channel scales as the
new width has. Integer constants holding a marker (an output shape) are
rewritten the same way.

`WidthPatcher` holds the converted templates; `batch(points)` returns one
multi-signature `.tflite` (bytes) with a signature `p<k>` per point. The
interpreter checks the result when it prepares each op (a conv whose filter
does not match its input fails), and `latency.measure_points` converts a
batch the ordinary way when it does.
"""

import copy

import numpy as np

_SMALL = frozenset(range(0, 5))  # dimensions too common to serve as markers


def _schema():
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    return flatbuffers, schema


def choose_markers(full_in, full_out, forbidden, multipliers=(1,), tied=False):
    """Marker widths `(c_in, c_out)` at most `(full_in, full_out)`, or None.

    Args:
        full_in, full_out: the layer's full widths (markers are at most these:
            a layer is rebuilt by keeping its first channels).
        forbidden: dimensions the layer's tensors have besides its channels
            (spatial sizes, kernel sizes).
        multipliers: depth multipliers `m`: `m * c_in` is a dimension too.
        tied: the output width is `multipliers[0] * c_in` (a depthwise conv).

    Returns:
        `(c_in, c_out)` with every marker dimension distinct and not in
        `forbidden` (nor 0..4), the widest such pair; None when there is none.
    """
    bad = set(forbidden) | _SMALL
    for c_in in range(full_in, 4, -1):
        ins = {m * c_in for m in multipliers} | {c_in}
        if ins & bad:
            continue
        if tied:
            return c_in, multipliers[0] * c_in
        for c_out in range(full_out, 4, -1):
            if c_out not in bad and c_out not in ins:
                return c_in, c_out
        return None
    return None


class WidthPatcher:
    """Converted one-layer templates and their copies at other widths.

    Args:
        converted: a list of `.tflite` contents (bytes), each one subgraph
            whose `k`-th input and output are those of its `k`-th layer, the
            layers independent of each other (`latency._convert_function`).
        templates: template id -> `(file index, k, markers, input_shape,
            output_width)`: `markers` a dict `{marker dimension: (axis,
            multiplier)}`, axis 0 the input width and 1 the output width;
            `input_shape` and `output_width` the template's own (checked).

    Attributes:
        ids: the template ids whose layer was found as described (the
            others are not copied).
    """

    def __init__(self, converted, templates):
        _, schema = _schema()
        self._schema = schema
        self._models, self._codes, self._remap, code_index = [], [], [], {}
        for content in converted:
            model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(content), 0))
            self._models.append(model)
            remap = []
            for code in model.operatorCodes:
                key = (code.builtinCode, code.deprecatedBuiltinCode, code.customCode,
                       code.version)
                if key not in code_index:
                    code_index[key] = len(self._codes)
                    self._codes.append(code)
                remap.append(code_index[key])
            self._remap.append(remap)
        self._templates = {}
        for tid, (file_index, k, markers, input_shape, output_width) in templates.items():
            part = self._component(self._models[file_index], k)
            if part is None:
                continue
            subgraph, ops, tensors, x, y = part
            if (tuple(int(d) for d in subgraph.tensors[x].shape) != tuple(input_shape)
                    or int(subgraph.tensors[y].shape[-1]) != output_width):
                continue
            self._templates[tid] = (file_index, subgraph, ops, tensors, x, y, markers)
        self.ids = frozenset(self._templates)

    @staticmethod
    def _component(model, k):
        """The ops and tensors that compute output `k` from input `k` of subgraph 0."""
        subgraph = model.subgraphs[0]
        if k >= len(subgraph.inputs) or k >= len(subgraph.outputs):
            return None
        x, y = int(subgraph.inputs[k]), int(subgraph.outputs[k])
        producer = {}
        for index, op in enumerate(subgraph.operators):
            for t in op.outputs:
                producer[int(t)] = index
        ops, stack, tensors = set(), [y], {y}
        while stack:
            t = stack.pop()
            if t == x or t not in producer or producer[t] in ops:
                continue
            ops.add(producer[t])
            for u in subgraph.operators[producer[t]].inputs:
                if int(u) >= 0 and int(u) not in tensors:
                    tensors.add(int(u))
                    stack.append(int(u))
        if x not in tensors:
            return None  # output k does not read input k
        for index in ops:
            tensors.update(int(t) for t in subgraph.operators[index].outputs)
        return subgraph, sorted(ops), sorted(tensors), x, y

    def batch(self, points, seed=0):
        """One multi-signature `.tflite` (bytes), a signature `p<k>` per point.

        Args:
            points: a list of `(template id, w_in, w_out)`.
            seed: of the random weights.

        Returns:
            `(content, keys)`.
        """
        flatbuffers, schema = _schema()
        rng = np.random.default_rng(seed)
        out = schema.ModelT()
        out.version = 3
        out.operatorCodes = self._codes
        out.buffers = [schema.BufferT()]
        out.subgraphs, out.signatureDefs, keys = [], [], []
        for k, (tid, w_in, w_out) in enumerate(points):
            file_index, source, ops, tensors, x, y, markers = self._templates[tid]
            model = self._models[file_index]
            widths = (w_in, w_out)
            mapping = {d: widths[axis] * m for d, (axis, m) in markers.items()}
            index = {t: n for n, t in enumerate(tensors)}
            subgraph = schema.SubGraphT()
            subgraph.name = f"p{k}".encode()
            subgraph.inputs = np.array([index[x]], np.int32)
            subgraph.outputs = np.array([index[y]], np.int32)
            subgraph.operators = []
            for op_index in ops:
                op = copy.copy(source.operators[op_index])
                op.opcodeIndex = self._remap[file_index][op.opcodeIndex]
                op.inputs = np.array([index[int(t)] if int(t) >= 0 else -1 for t in op.inputs],
                                     np.int32)
                op.outputs = np.array([index[int(t)] for t in op.outputs], np.int32)
                subgraph.operators.append(op)
            subgraph.tensors = [
                self._tensor(source.tensors[t], model.buffers[source.tensors[t].buffer],
                             mapping, out.buffers, rng) for t in tensors]
            out.subgraphs.append(subgraph)
            sig = schema.SignatureDefT()
            sig.inputs = [self._tensor_map(b"x", index[x])]
            sig.outputs = [self._tensor_map(b"y", index[y])]
            sig.signatureKey = f"p{k}".encode()
            sig.subgraphIndex = k
            out.signatureDefs.append(sig)
            keys.append(f"p{k}")
        builder = flatbuffers.Builder(1024)
        builder.Finish(out.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output()), keys

    def _tensor_map(self, name, index):
        entry = self._schema.TensorMapT()
        entry.name, entry.tensorIndex = name, index
        return entry

    def _tensor(self, tensor, buffer, mapping, buffers, rng):
        schema = self._schema
        new = copy.copy(tensor)
        if tensor.shape is not None:
            new.shape = np.array([mapping.get(int(d), int(d)) for d in tensor.shape], np.int32)
        if tensor.shapeSignature is not None and len(tensor.shapeSignature):
            new.shapeSignature = np.array(
                [mapping.get(int(d), int(d)) for d in tensor.shapeSignature], np.int32)
        quantized = _per_channel(tensor.quantization)
        if quantized:  # one scale per channel: as many as the new shape has
            new.quantization = copy.copy(tensor.quantization)
            size = int(new.shape[tensor.quantization.quantizedDimension])
            new.quantization.scale = np.resize(tensor.quantization.scale, size)
            if tensor.quantization.zeroPoint is not None:
                new.quantization.zeroPoint = np.resize(tensor.quantization.zeroPoint, size)
        data = buffer.data
        fresh = schema.BufferT()
        if data is not None and len(data):
            kind = tensor.type
            size = int(np.prod(new.shape)) if new.shape is not None else 0
            if kind == schema.TensorType.FLOAT32:
                fresh.data = (rng.standard_normal(size).astype(np.float32) * 0.1).view(np.uint8)
            elif kind == schema.TensorType.INT32 and _is_quantized(tensor.quantization):
                # an int8 layer's bias: values do not change its latency either
                fresh.data = rng.integers(-512, 512, size, dtype=np.int32).view(np.uint8)
            elif kind == schema.TensorType.INT32:
                values = np.frombuffer(bytes(bytearray(data)), np.int32)
                values = np.array([mapping.get(int(v), int(v)) for v in values], np.int32)
                fresh.data = values.view(np.uint8)
            elif kind == schema.TensorType.INT8:  # int8 weights
                fresh.data = rng.integers(-127, 128, size, dtype=np.int8).view(np.uint8)
            else:
                raise ValueError(f"constant tensor '{tensor.name}' of type {kind}: "
                                 "cannot rewrite its widths")
        new.buffer = len(buffers)
        buffers.append(fresh)
        return new


def _is_quantized(quantization):
    return quantization is not None and quantization.scale is not None and len(
        quantization.scale) > 0


def _per_channel(quantization):
    return _is_quantized(quantization) and len(quantization.scale) > 1
