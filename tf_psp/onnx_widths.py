"""Copies of a converted one-layer ONNX model at other channel widths, without converting.

The ONNX counterpart of `tflite_widths`: tf2onnx converts each layer once at
*marker* widths (`c_in`, `c_out` that no other dimension of the layer takes);
every other width is a copy of that layer's nodes with each marker dimension
replaced in the graph's input and output shapes, in the initializers' shapes
(float weights refilled with random values: latency does not depend on them),
in integer initializers holding a marker (a Reshape's target shape) and in a
grouped convolution's `group`. Intermediate shapes are not stored; ONNX Runtime
infers them when it loads the copy, and fails there when a copy is not
consistent (`latency` then converts that batch the ordinary way).
"""

import copy

import numpy as np

_MAPPED_ATTRIBUTES = ("group",)


class OnnxWidthPatcher:
    """Converted one-layer templates and their copies at other widths.

    Args:
        converted: a list of `onnx.ModelProto`, each running several layers
            side by side, the `k`-th on graph input `x<k>` to output `y<k>`.
        templates: template id -> `(file index, k, markers, input_shape,
            output_width)` as for `tflite_widths.WidthPatcher` (`input_shape`
            is checked up to the order of its axes: inputs may be NCHW).

    Attributes:
        ids: the template ids whose layer was found as described.
    """

    def __init__(self, converted, templates):
        from onnx import utils

        self._templates = {}
        extractors = {}
        for tid, (file_index, k, markers, input_shape, output_width) in templates.items():
            model = converted[file_index]
            names_in = {i.name for i in model.graph.input}
            names_out = {o.name for o in model.graph.output}
            if f"x{k}" not in names_in or f"y{k}" not in names_out:
                continue
            if file_index not in extractors:
                extractors[file_index] = utils.Extractor(model)
            try:
                part = extractors[file_index].extract_model([f"x{k}"], [f"y{k}"])
            except Exception:  # noqa: BLE001 - a layer that cannot be cut out is converted
                continue
            (x,) = part.graph.input
            if sorted(_dims(x)) != sorted(int(d) for d in input_shape):
                continue
            (y,) = part.graph.output
            if output_width not in _dims(y):
                continue
            self._templates[tid] = (part, markers)
        self.ids = frozenset(self._templates)

    def batch(self, points, seed=0):
        """Serialized ONNX models, one per point.

        Args:
            points: a list of `(template id, w_in, w_out)`.
            seed: of the random weights.

        Returns:
            A list of `bytes`.
        """
        rng = np.random.default_rng(seed)
        out = []
        for tid, w_in, w_out in points:
            template, markers = self._templates[tid]
            widths = (w_in, w_out)
            mapping = {d: widths[axis] * m for d, (axis, m) in markers.items()}
            model = copy.deepcopy(template)
            graph = model.graph
            for value in list(graph.input) + list(graph.output):
                for dim in value.type.tensor_type.shape.dim:
                    if dim.HasField("dim_value"):
                        dim.dim_value = mapping.get(int(dim.dim_value), int(dim.dim_value))
            del graph.value_info[:]
            for tensor in graph.initializer:
                _rewrite_tensor(tensor, mapping, rng)
            for node in graph.node:
                for attribute in node.attribute:
                    if attribute.name in _MAPPED_ATTRIBUTES and attribute.type == attribute.INT:
                        attribute.i = mapping.get(int(attribute.i), int(attribute.i))
                    elif attribute.type == attribute.TENSOR:  # a Constant node
                        _rewrite_tensor(attribute.t, mapping, rng)
            out.append(model.SerializeToString())
        return out


def _dims(value):
    return [int(d.dim_value) for d in value.type.tensor_type.shape.dim]


def _rewrite_tensor(tensor, mapping, rng):
    """`tensor` (a TensorProto) at the mapped widths: float values random, integers mapped."""
    from onnx import TensorProto, numpy_helper

    array = numpy_helper.to_array(tensor)
    shape = tuple(mapping.get(int(d), int(d)) for d in array.shape)
    if tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        if shape == array.shape:
            return
        fresh = (rng.standard_normal(shape) * 0.1).astype(array.dtype)
    elif tensor.data_type in (TensorProto.INT64, TensorProto.INT32):
        fresh = np.array([mapping.get(int(v), int(v)) for v in array.ravel()],
                         array.dtype).reshape(array.shape)
        if shape != array.shape:
            raise ValueError(f"integer constant '{tensor.name}' with a width in its shape: "
                             "cannot rewrite it")
    else:
        raise ValueError(f"constant '{tensor.name}' of ONNX type {tensor.data_type}: cannot "
                         "rewrite its widths")
    tensor.CopyFrom(numpy_helper.from_array(fresh, tensor.name))
