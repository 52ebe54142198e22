"""Channel dependency graph of a functional Keras model.

Every tensor's last axis (channels_last) is a row of channel *slots*. Layers
tie slots together: a pass-through layer (BatchNormalization, ReLU, pooling,
DepthwiseConv2D ...) ties input channel `c` to output channel `c`; Add and the
other merges tie all their inputs and their output; Concatenate maps with
offsets; Flatten after NHWC ties input channel `c` to positions `c + k*C`.
A union-find over slots yields *groups*: channels that can only be removed
together. Producers (Conv, Dense, SeparableConv) start new channel spaces.

Per-layer behaviour lives in small handler classes in `REGISTRY` (exact
Keras class -> handler), so supporting a new layer is one class. Layers not in
the registry, model inputs and model outputs *freeze* every channel they
touch. The graph also propagates two facts the exactness contract needs:

- `constants`: forward, per channel, the value when it is the same at every
  position and for every input (NaN otherwise), e.g. a conv whose kernel
  column is zero outputs `activation(bias)`, BatchNormalization maps it to
  another constant.
- `needed`: backward, per channel, whether the model outputs depend on the
  channel's value (a consumer whose kernel row is zero does not read it).

An Add, Subtract or Average input that is constant on every channel (a
residual branch pruned away, e.g. by the 'layer' structure) is *dropped*: the
merge becomes its other inputs plus that constant, and the layers that only
fed the dropped input are *dead* (not coupled, not rebuilt).

The graph is built on a *plain* model (see `tf_psp.shrink.strip`): pruning is
read from exact zeros in the folded weights, so every PSP structure
(`channel`, `filter`, `column`, `layer`) is handled the same way.
"""

import keras
import numpy as np

from tf_psp import compat, registry
from tf_psp import macs as mac_rules
from tf_psp.functional import new_layer as _new_layer
from tf_psp.inline import inline_nested, kept_whole_reason  # noqa: F401  (public here)

# --- small helpers ------------------------------------------------------------


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _channels(tensor):
    """The last axis's size; 0 for integer and boolean tensors (token ids, masks: no
    channels, also when their last axis is an unknown sequence length)."""
    if str(tensor.dtype).startswith(("int", "uint", "bool")):
        return 0
    dim = tensor.shape[-1] if len(tensor.shape) else None
    return None if dim is None else int(dim)


def _nonzero_rows(kernel, in_axis=-2):
    """Bool per kernel input channel: any nonzero weight."""
    k = np.moveaxis(kernel, in_axis, 0)
    return np.any(k.reshape(k.shape[0], -1) != 0, axis=1)


class _UnionFind:
    def __init__(self):
        self.parent = []

    def add(self, n):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a):
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class TensorInfo:
    """One symbolic tensor of the graph: its channel count and first slot."""

    def __init__(self, tensor, index, slot):
        self.tensor = tensor
        self.index = index
        self.channels = _channels(tensor)
        self.slot = slot

    def slots(self):
        return np.arange(self.slot, self.slot + (self.channels or 0))


class Blocker:
    """Why channels are kept: a layer (or None for model inputs/outputs) and a reason."""

    def __init__(self, node, text):
        self.layer = None if node is None else node.name
        self.cls = None if node is None else type(node.layer).__name__
        self.text = text

    def key(self):
        return (self.layer or "", self.cls or "", self.text)

    def __str__(self):
        return self.text if self.layer is None else f"layer '{self.layer}' ({self.cls}) {self.text}"


class NodeInfo:
    """One call of one layer: its handler, input and output tensors."""

    def __init__(self, node, handler, inputs, outputs):
        self.node = node
        self.layer = node.operation
        self.handler = handler
        self.inputs = inputs
        self.outputs = outputs
        self.in_needed = None
        self.dropped = []  # input indices replaced by their constants
        self.constant_name = None  # name of the Rescaling carrying their constant

    @property
    def name(self):
        return getattr(self.layer, "name", type(self.layer).__name__)

    def describe(self):
        return f"layer '{self.name}' ({type(self.layer).__name__})"


# --- handlers -----------------------------------------------------------------


class LayerHandler:
    """How one layer type moves channels. The base class freezes everything.

    `kind` is 'producer' (outputs are a new channel space, inputs are read
    through a kernel), 'passthrough' (outputs share the inputs' groups) or
    'frozen'. A handler may also define `macs(layer, input_shapes,
    output_shapes) -> number`, the MACs of one call (batched shapes), used by
    `tf_psp.profile` and the budget functions. Register a handler for a layer
    class with `tf_psp.register_layer`; `tf_psp.handlers` has ready ones.
    """

    kind = "frozen"
    approximate = False  # fold constants as if convolutions had no padding

    @classmethod
    def specialize(cls, layer):
        """The handler class for this very layer (e.g. a grouped conv's); default `cls`."""
        return cls

    def frozen_reason(self, layer, node):
        """None when this handler understands `layer`, else why not."""
        return None

    def couple(self, graph, node):
        """Ties slots (graph.union / graph.freeze)."""
        reason = _unknown_reason(node.layer)
        for t in node.inputs + node.outputs:
            graph.freeze(t, node, reason)

    def constants(self, node, in_consts):
        """Per-output arrays of per-channel constants (NaN: not constant)."""
        return [np.full(t.channels or 0, np.nan) for t in node.outputs]

    def needed_inputs(self, node, out_needed):
        """Per-input bool arrays: which input channels the needed outputs read."""
        return [np.ones(t.channels or 0, bool) for t in node.inputs]

    def absorbs(self, node, value):
        """Whether a removed input channel of constant `value` can be folded in."""
        return False

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        """Returns (new layer, weights or None) for the shrunk model."""
        return node.layer, None


class _FrozenHandler(LayerHandler):
    """Keeps every channel of the layer (the base class's behaviour)."""


def _unknown_reason(layer):
    """Why an unregistered layer freezes its channels; names a composite layer's sublayers."""
    inner = sorted({type(sub).__name__ for sub in compat.sublayers(layer)})
    if not inner:
        return "is not understood"
    why = kept_whole_reason(layer) or "it is not inlined"
    return (f"is a composite layer whose call runs its own sublayers ({', '.join(inner)}), "
            f"kept whole because it {why}, so the channels through it are kept (register "
            "it with tf_psp.register_layer)")


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


class PassThroughHandler(LayerHandler):
    """Channel c in is channel c out; per-channel weights are sliced.

    `keeps_constants`: a constant channel stays the same constant (pooling,
    cropping, upsampling). Elementwise layers compute the new constant by
    calling the layer on it.
    """

    kind = "passthrough"
    keeps_constants = False
    elementwise = True

    def frozen_reason(self, layer, node):
        if not _channels_last(layer):
            return "is not channels_last"
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            return "has several inputs or outputs"
        if node.inputs[0].channels != node.outputs[0].channels:
            return "changes the channel count"
        return None

    def couple(self, graph, node):
        graph.union_tensors(node.inputs[0], node.outputs[0])

    def constants(self, node, in_consts):
        c = in_consts[0]
        if self.keeps_constants or not np.any(np.isfinite(c)):
            return [c.copy()]
        rank = len(node.inputs[0].tensor.shape)
        x = np.where(np.isfinite(c), c, 0.0).reshape((1,) * (rank - 1) + (-1,))
        y = _np(node.layer(x.astype(node.inputs[0].tensor.dtype or "float32"), training=False))
        y = y.reshape(-1).astype(np.float64)
        return [np.where(np.isfinite(c), y, np.nan)]

    def needed_inputs(self, node, out_needed):
        return [out_needed[0].copy()]

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = _new_layer(node.layer)
        weights = [w[keep_out[0]] if w.ndim == 1 else w for w in node.layer.get_weights()]
        return layer, weights


class ShapeKeepingHandler(PassThroughHandler):
    """Pooling, cropping, upsampling: a constant channel stays constant."""

    keeps_constants = True


class ZeroPaddingHandler(PassThroughHandler):
    """Zero padding: only a constant 0 stays constant."""

    def constants(self, node, in_consts):
        c = in_consts[0]
        return [np.where(c == 0, 0.0, np.nan)]


class ActivationHandler(PassThroughHandler):
    def frozen_reason(self, layer, node):
        name = getattr(getattr(layer, "activation", None), "__name__", "")
        if name in ("softmax", "log_softmax"):
            return f"mixes channels ({name})"
        return super().frozen_reason(layer, node)


class BatchNormHandler(PassThroughHandler):
    def frozen_reason(self, layer, node):
        rank = len(node.inputs[0].tensor.shape)
        if layer.axis not in (-1, rank - 1):
            return f"normalizes axis {layer.axis}, not the channel axis"
        return super().frozen_reason(layer, node)

    def needed_inputs(self, node, out_needed):
        needed = out_needed[0].copy()
        if node.layer.scale:
            needed &= _np(node.layer.gamma) != 0
        return [needed]


class RescalingHandler(PassThroughHandler):
    """Scalar or per-channel (shape `(channels,)`) scale and offset."""

    def frozen_reason(self, layer, node):
        for value in (layer.scale, layer.offset):
            if np.ndim(value) and np.shape(value) != (node.outputs[0].channels,):
                return "has a scale or offset that is not per channel"
        return super().frozen_reason(layer, node)

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = node.layer

        def pick(value):
            return np.asarray(value)[keep_out[0]] if np.ndim(value) else value

        new = keras.layers.Rescaling(
            pick(layer.scale), offset=pick(layer.offset), name=layer.name, dtype=layer.dtype_policy
        )
        return new, []


class LayerScaleHandler(PassThroughHandler):
    """ConvNeXt's `LayerScale`: `x * gamma`, one gamma per channel."""

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = _new_layer(node.layer, projection_dim=len(keep_out[0]))
        return layer, [_np(node.layer.gamma)[keep_out[0]]]


class LayerNormHandler(_FrozenHandler):
    """LayerNormalization: every output channel depends on every input channel."""

    def couple(self, graph, node):
        rank = len(node.inputs[0].tensor.shape)
        axes = node.layer.axis if isinstance(node.layer.axis, (list, tuple)) else [node.layer.axis]
        if any(a % rank == rank - 1 for a in axes):
            reason = "normalizes across channels (removing one changes the others)"
        else:
            reason = f"normalizes over axes {list(axes)}, which is not understood"
        for t in node.inputs + node.outputs:
            graph.freeze(t, node, reason)


class TrivialReshapeHandler(PassThroughHandler):
    """A Reshape that keeps the last axis and only adds or drops size-1 axes."""

    def frozen_reason(self, layer, node):
        reason = super().frozen_reason(layer, node)
        if reason:
            return reason
        shapes = [node.inputs[0].tensor.shape[1:], node.outputs[0].tensor.shape[1:]]
        for shape in shapes:
            if not shape or any(d != 1 for d in shape[:-1]):
                return "reshapes more than size-1 axes"
        return None

    def constants(self, node, in_consts):
        return [in_consts[0].copy()]

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        target = tuple(node.layer.target_shape[:-1]) + (len(keep_out[0]),)
        return _new_layer(node.layer, target_shape=target), []


class DepthwiseHandler(PassThroughHandler):
    """DepthwiseConv: input channel c owns outputs c*m .. c*m+m-1."""

    macs = staticmethod(mac_rules.depthwise_macs)

    def frozen_reason(self, layer, node):
        if not _channels_last(layer):
            return "is not channels_last"
        return None

    def _multiplier(self, layer):
        return layer.depth_multiplier

    def _dw_kernel(self, layer):
        """The kernel as [*spatial, cin, m]."""
        return _np(layer.kernel)

    def couple(self, graph, node):
        m = self._multiplier(node.layer)
        t_in, t_out = node.inputs[0], node.outputs[0]
        for c in range(t_in.channels):
            for j in range(m):
                graph.union(t_in.slot + c, t_out.slot + c * m + j)

    def constants(self, node, in_consts):
        layer = node.layer
        kernel = self._dw_kernel(layer)
        zero = ~np.any(kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1]) != 0, axis=0)
        bias = _np(layer.bias) if layer.use_bias else np.zeros(zero.shape)
        m = self._multiplier(layer)
        value = np.repeat(np.where(np.isfinite(in_consts[0]), in_consts[0], 0.0), m)
        folds = [np.isfinite(v) and _folds_exactly(self, layer, v) for v in in_consts[0]]
        folds = np.repeat(folds, m)
        zero |= folds
        bias = bias + value * kernel.reshape(-1, kernel.shape[-2] * m).sum(axis=0)
        out = np.where(zero, bias, np.nan)
        if layer.activation is not None and np.any(zero):
            activated = _np(layer.activation(np.where(zero, bias, 0.0).astype("float32")))
            out = np.where(zero, activated, np.nan)
        return [out.astype(np.float64)]

    def needed_inputs(self, node, out_needed):
        kernel = self._dw_kernel(node.layer)
        m = self._multiplier(node.layer)
        live = np.any(kernel.reshape(-1, kernel.shape[-2], m) != 0, axis=0)
        return [np.any(live & out_needed[0].reshape(-1, m), axis=1)]

    def _bias(self, layer, keep):
        m = self._multiplier(layer)
        return _np(layer.bias).reshape(-1, m)[keep].reshape(-1)

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = node.layer
        weights = [_np(layer.kernel)[..., keep_in[0], :]]
        if layer.use_bias:
            weights.append(self._bias(layer, keep_in[0]))
        return _new_layer(layer), weights


class GroupedDepthwiseHandler(DepthwiseHandler):
    """Conv with `groups` == input channels (ConvNeXt's depthwise): a DepthwiseConv.

    The kernel [*spatial, 1, cin * m]: output c*m + j reads input channel c only.
    """

    def _multiplier(self, layer):
        return layer.filters // layer.groups

    def _dw_kernel(self, layer):
        kernel = _np(layer.kernel)
        return kernel.reshape(kernel.shape[:-2] + (layer.groups, self._multiplier(layer)))

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = node.layer
        m = self._multiplier(layer)
        rows = (keep_in[0][:, None] * m + np.arange(m)).reshape(-1)
        weights = [_np(layer.kernel)[..., rows]]
        if layer.use_bias:
            weights.append(self._bias(layer, keep_in[0]))
        n = len(keep_in[0])
        return _new_layer(layer, groups=n, filters=n * m), weights


class PReLUHandler(PassThroughHandler):
    """PReLU: its alpha is sliced on the channel axis (unless shared across it)."""

    def _alpha(self, node):
        return _np(node.layer.alpha)

    def constants(self, node, in_consts):
        alpha = self._alpha(node)
        c = in_consts[0]
        if alpha.size != alpha.shape[-1]:  # alpha varies over positions
            return [np.where(c >= 0, c, np.nan)]
        slope = np.broadcast_to(alpha.reshape(-1), c.shape)
        return [np.where(c >= 0, c, slope * c)]

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        alpha = self._alpha(node)
        if alpha.shape[-1] == node.outputs[0].channels:
            alpha = alpha[..., keep_out[0]]
        return _new_layer(node.layer), [alpha]


class MergeHandler(LayerHandler):
    """Add, Subtract, Average, Maximum, Minimum, Multiply: shared channels."""

    kind = "passthrough"

    def frozen_reason(self, layer, node):
        c = node.outputs[0].channels
        if len(node.outputs) != 1 or c is None:
            return "has an unknown channel count"
        if any(t.channels not in (1, c) for t in node.inputs):
            return "has inputs with different channel counts"
        return None

    def couple(self, graph, node):
        out = node.outputs[0]
        for k, t in enumerate(node.inputs):
            if k in node.dropped:
                continue  # replaced by its constant: not coupled
            if t.channels == out.channels:
                graph.union_tensors(t, out)
            else:
                graph.freeze(t, node, "broadcasts this size-1 input")

    def constants(self, node, in_consts):
        name = type(node.layer).__name__
        arrays = np.broadcast_arrays(*in_consts)
        if name == "Add":
            out = np.sum(arrays, axis=0)
        elif name == "Subtract":
            out = arrays[0] - arrays[1]
        elif name == "Average":
            out = np.mean(arrays, axis=0)
        elif name == "Maximum":
            out = np.max(arrays, axis=0)
        elif name == "Minimum":
            out = np.min(arrays, axis=0)
        else:  # Multiply: a zero factor makes the product exactly zero
            out = np.prod(arrays, axis=0)
            out = np.where(np.any(np.stack(arrays) == 0, axis=0), 0.0, out)
        return [out]

    def needed_inputs(self, node, out_needed):
        needed = out_needed[0]
        return [needed.copy() if t.channels == len(needed) else np.array([needed.any()])
                for t in node.inputs]

    def dropped_inputs(self, node, in_consts):
        """Indices of inputs constant on every channel that an offset can replace.

        Add, Subtract and Average only (a constant input of Maximum, Minimum
        or Multiply is kept). One input with the output's full shape stays.
        """
        if type(node.layer).__name__ not in ("Add", "Subtract", "Average"):
            return []
        shape = tuple(node.outputs[0].tensor.shape)
        full = [tuple(t.tensor.shape) == shape for t in node.inputs]
        kept = [k for k, c in enumerate(in_consts) if not np.all(np.isfinite(c))]
        if not any(full[k] for k in kept):
            if not any(full):
                return []
            kept.append(full.index(True))
        return [k for k in range(len(node.inputs)) if k not in kept]

    def call_without_dropped(self, node, tensors, keep_out, in_consts):
        """The merge's output from its kept input `tensors` plus the dropped constants.

        Returns the new output tensor: the kept input itself when the dropped
        constants are exactly zero, else a `Rescaling` with a per-channel offset.
        """
        n, width = len(node.inputs), node.outputs[0].channels
        kept = [k for k in range(n) if k not in node.dropped]
        offset = np.sum([np.broadcast_to(in_consts[k], (width,)) for k in node.dropped], axis=0)
        scale = 1.0
        name = type(node.layer).__name__
        if name == "Subtract":
            scale, offset = (-1.0, offset) if kept == [1] else (1.0, -offset)
        elif name == "Average":
            scale, offset = len(kept) / n, offset / n
        x = _new_layer(node.layer)(tensors) if len(tensors) > 1 else tensors[0]
        offset = offset[keep_out[0]]
        if scale == 1.0 and not np.any(offset):
            return x
        return keras.layers.Rescaling(
            scale, offset=offset.astype("float32"), name=node.constant_name
        )(x)

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        return _new_layer(node.layer), []


class ConcatenateHandler(LayerHandler):
    kind = "passthrough"

    def _channel_axis(self, node):
        rank = len(node.outputs[0].tensor.shape)
        return node.layer.axis in (-1, rank - 1)

    def frozen_reason(self, layer, node):
        if any(t.channels is None for t in node.inputs):
            return "has an unknown channel count"
        if not self._channel_axis(node):
            if any(t.channels != node.outputs[0].channels for t in node.inputs):
                return "has inputs with different channel counts"
        return None

    def couple(self, graph, node):
        out = node.outputs[0]
        if not self._channel_axis(node):
            for t in node.inputs:
                graph.union_tensors(t, out)
            return
        offset = 0
        for t in node.inputs:
            for c in range(t.channels):
                graph.union(t.slot + c, out.slot + offset + c)
            offset += t.channels

    def constants(self, node, in_consts):
        if self._channel_axis(node):
            return [np.concatenate(in_consts)]
        stack = np.stack(in_consts)
        return [np.where(np.all(stack == stack[0], axis=0), stack[0], np.nan)]

    def needed_inputs(self, node, out_needed):
        if not self._channel_axis(node):
            return [out_needed[0].copy() for _ in node.inputs]
        splits = np.cumsum([t.channels for t in node.inputs])[:-1]
        return list(np.split(out_needed[0], splits))

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        return _new_layer(node.layer), []


class FlattenHandler(LayerHandler):
    """Flatten of channels_last [.., C]: channel c lands at c + k*C."""

    kind = "passthrough"

    def frozen_reason(self, layer, node):
        t_in, t_out = node.inputs[0], node.outputs[0]
        if not _channels_last(layer):
            return "is not channels_last"
        if t_in.channels is None or t_out.channels is None:
            return "has an unknown size"
        return None

    def couple(self, graph, node):
        t_in, t_out = node.inputs[0], node.outputs[0]
        c = t_in.channels
        for p in range(t_out.channels):
            graph.union(t_in.slot + p % c, t_out.slot + p)

    def constants(self, node, in_consts):
        reps = node.outputs[0].channels // node.inputs[0].channels
        return [np.tile(in_consts[0], reps)]

    def needed_inputs(self, node, out_needed):
        return [out_needed[0].reshape(-1, node.inputs[0].channels).any(axis=0)]

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        return _new_layer(node.layer), []


class _KernelHandler(LayerHandler):
    """Conv and Dense: kernel [*spatial, in, out], optional bias."""

    kind = "producer"
    width_key = "filters"

    def frozen_reason(self, layer, node):
        if not _channels_last(layer):
            return "is not channels_last"
        groups = getattr(layer, "groups", 1)
        if groups != 1:
            return (f"is a grouped convolution (groups={groups}): removing a channel "
                    "would unbalance its groups")
        if len(node.inputs) != 1:
            return "has several inputs"
        return None

    def couple(self, graph, node):
        pass  # a new channel space: no ties between input and output

    def _kernel(self, layer):
        return _np(layer.kernel)

    def _folded_inputs(self, node, consts):
        """Per kernel input row: whether its constant input folds into the bias."""
        return np.array([np.isfinite(v) and self.absorbs(node, v) for v in consts], bool)

    def constants(self, node, in_consts):
        """An output channel is constant when every input it reads is a foldable constant."""
        layer = node.layer
        kernel = self._kernel(layer)
        rows = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])
        folds = self._folded_inputs(node, in_consts[0])
        zero = ~np.any(np.any(rows != 0, axis=0) & ~folds[:, None], axis=0)
        bias = _np(layer.bias) if layer.use_bias else np.zeros(zero.shape)
        if np.any(folds):
            bias = bias + np.where(folds, in_consts[0], 0.0) @ rows.sum(axis=0)
        out = np.where(zero, bias, 0.0)
        if layer.activation is not None:
            out = _np(layer.activation(out.astype("float32")))
        return [np.where(zero, out, np.nan).astype(np.float64)]

    def needed_inputs(self, node, out_needed):
        kernel = self._kernel(node.layer)
        return [_nonzero_rows(kernel[..., out_needed[0]])]

    def absorbs(self, node, value):
        # without a bias, the shrunk layer gets one
        return _folds_exactly(self, node.layer, value)

    def bias_delta(self, node, kernel, removed_consts):
        """Sum over removed constant inputs of value * kernel row."""
        spatial = tuple(range(kernel.ndim - 2))
        rows = kernel.sum(axis=spatial) if spatial else kernel
        return removed_consts @ rows

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = node.layer
        kernel = self._kernel(layer)
        consts = np.where(np.isfinite(in_consts[0]) & in_needed[0], in_consts[0], 0.0)
        consts[keep_in[0]] = 0.0
        weights = [kernel[..., keep_in[0], :][..., keep_out[0]]]
        delta = self.bias_delta(node, kernel, consts)[keep_out[0]]
        use_bias = layer.use_bias or bool(np.any(delta != 0))
        if use_bias:
            bias = _np(layer.bias)[keep_out[0]] if layer.use_bias else np.zeros_like(delta)
            weights.append((bias + delta).astype(kernel.dtype))
        changes = {self.width_key: len(keep_out[0]), "use_bias": use_bias}
        return _new_layer(layer, **changes), weights


def _folds_exactly(handler, layer, value):
    """Whether a constant input `value` of a conv/dense `layer` can be folded into its bias.

    Exact for 0 (zero padding and a zero input agree), 'valid' padding and
    1x1 kernels; with `handler.approximate`, always (borders then differ).
    """
    if value == 0 or handler.approximate:
        return True
    padding = getattr(layer, "padding", "valid")
    kernel_size = getattr(layer, "kernel_size", ())
    return padding == "valid" or all(k == 1 for k in kernel_size)


class ConvHandler(_KernelHandler):
    macs = staticmethod(mac_rules.conv_macs)

    @classmethod
    def specialize(cls, layer):
        kernel = getattr(layer, "kernel", None)
        if getattr(layer, "groups", 1) > 1 and kernel is not None and kernel.shape[-2] == 1:
            return GroupedDepthwiseHandler
        return cls


class DenseHandler(_KernelHandler):
    width_key = "units"

    macs = staticmethod(mac_rules.dense_macs)


class SeparableConvHandler(_KernelHandler):
    """SeparableConv: depthwise [.., cin, m] then pointwise [.., cin*m, out]."""

    macs = staticmethod(mac_rules.separable_macs)

    def _kernel(self, layer):
        return _np(layer.pointwise_kernel)

    def needed_inputs(self, node, out_needed):
        layer = node.layer
        dw = _np(layer.depthwise_kernel)
        m = dw.shape[-1]
        pw_live = _nonzero_rows(_np(layer.pointwise_kernel)[..., out_needed[0]])
        dw_live = np.any(dw.reshape(-1, dw.shape[-2] * m) != 0, axis=0)
        return [np.any((dw_live & pw_live).reshape(-1, m), axis=1)]

    def absorbs(self, node, value):
        return value == 0

    def _folded_inputs(self, node, consts):
        return np.zeros(self._kernel(node.layer).shape[-2], bool)

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = node.layer
        dw, pw = _np(layer.depthwise_kernel), _np(layer.pointwise_kernel)
        m = dw.shape[-1]
        rows = (keep_in[0][:, None] * m + np.arange(m)).reshape(-1)
        weights = [dw[..., keep_in[0], :], pw[..., rows, :][..., keep_out[0]]]
        if layer.use_bias:
            weights.append(_np(layer.bias)[keep_out[0]])
        return _new_layer(layer, filters=len(keep_out[0])), weights


class ConvTransposeHandler(_KernelHandler):
    """Conv1D/2D/3DTranspose: kernel [*spatial, out, in] (the transpose of Conv's).

    Only a constant 0 input folds: with strides, output positions sum
    different numbers of kernel taps, so a constant input is not a constant
    contribution.
    """

    macs = staticmethod(mac_rules.conv_transpose_macs)

    def _kernel(self, layer):
        return np.swapaxes(_np(layer.kernel), -1, -2)

    def absorbs(self, node, value):
        return value == 0

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer, weights = super().rebuild(node, keep_in, keep_out, in_consts, in_needed)
        weights[0] = np.swapaxes(weights[0], -1, -2)
        return layer, weights


# --- keras.ops calls ------------------------------------------------------------


def _is_scalar(value):
    """A Python number or a one-element array: broadcasts onto every channel alike."""
    if isinstance(value, (bool, int, float, np.number)):
        return True
    return isinstance(value, np.ndarray) and value.size == 1


def _op_constant_reason(node):
    """Why an op call's non-tensor arguments block pass-through (None: all scalars)."""
    tensors = {id(t) for t in node.node.arguments.keras_tensors}
    values = [v for v in keras.tree.flatten((node.node.arguments.args, node.node.arguments.kwargs))
              if id(v) not in tensors and v is not None and not isinstance(v, str)]
    if not all(_is_scalar(v) for v in values):
        return "has a constant operand that is not a scalar"
    return None


def _call_op_on_constants(node, in_consts):
    """The op applied to per-channel constants (NaN where an input is not constant)."""
    ranks = [len(t.tensor.shape) for t in node.inputs]
    values, finite = {}, np.ones(node.outputs[0].channels, bool)
    for t, c, rank in zip(node.inputs, in_consts, ranks):
        ok = np.isfinite(c)
        finite &= np.broadcast_to(ok, finite.shape)
        x = np.where(ok, c, 0.0).reshape((1,) * (rank - 1) + (-1,))
        values[id(t.tensor)] = x.astype(t.tensor.dtype or "float32")
    args, kwargs = node.node.arguments.fill_in(values)
    y = _np(node.layer(*args, **kwargs)).reshape(-1).astype(np.float64)
    y = np.broadcast_to(y, finite.shape)
    return np.where(finite & np.isfinite(y), y, np.nan)


class ElementwiseOpHandler(PassThroughHandler):
    """A keras.ops call on one tensor and scalar constants (`h + 3.0`, `ops.relu(h)`).

    Channel c in is channel c out; the op object is stateless and reused; a
    constant channel maps to the op applied to the constant.
    """

    def frozen_reason(self, layer, node):
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            return "is a keras.ops call on several tensors"
        if node.inputs[0].channels != node.outputs[0].channels:
            return "changes the channel count"
        return _op_constant_reason(node)

    def constants(self, node, in_consts):
        if not np.any(np.isfinite(in_consts[0])):
            return [in_consts[0].copy()]
        return [_call_op_on_constants(node, in_consts)]

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        return node.layer, None


class BinaryOpHandler(MergeHandler):
    """A keras.ops call on two tensors (`a + b`, `x * gate`): couples them like Add.

    With one tensor and scalar constants it is an `ElementwiseOpHandler`.
    """

    def frozen_reason(self, layer, node):
        if len(node.inputs) == 1:
            return ElementwiseOpHandler().frozen_reason(layer, node)
        return super().frozen_reason(layer, node) or _op_constant_reason(node)

    def couple(self, graph, node):
        if len(node.inputs) == 1:
            return graph.union_tensors(node.inputs[0], node.outputs[0])
        return super().couple(graph, node)

    def constants(self, node, in_consts):
        if not any(np.any(np.isfinite(c)) for c in in_consts):
            return [np.full(node.outputs[0].channels, np.nan)]
        out = _call_op_on_constants(node, in_consts)
        if type(node.layer).__name__ == "Multiply" and len(in_consts) > 1:
            zero = np.any([np.broadcast_to(c == 0, out.shape) for c in in_consts], axis=0)
            out = np.where(zero, 0.0, out)
        return [out]

    def needed_inputs(self, node, out_needed):
        if len(node.inputs) == 1:
            return [out_needed[0].copy()]
        return super().needed_inputs(node, out_needed)

    def dropped_inputs(self, node, in_consts):
        if len(node.inputs) == 1:
            return []
        return super().dropped_inputs(node, in_consts)

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        return node.layer, None


def _op_classes(module, names):
    """The classes `names` of a keras.ops module that exist in this Keras version."""
    return [getattr(module, n) for n in names if hasattr(module, n)]


ELEMENTWISE_OPS = _op_classes(compat.nn_ops, (
    "Relu", "Relu6", "Sigmoid", "HardSigmoid", "HardSilu", "Silu", "Gelu", "Elu", "Selu",
    "Celu", "LeakyRelu", "Softplus", "Softsign", "SoftShrink", "HardShrink", "HardTanh",
    "TanhShrink", "SparsePlus", "Squareplus", "LogSigmoid", "Mish",
)) + _op_classes(compat.numpy_ops, (
    "Tanh", "Absolute", "Abs", "Negative", "Square", "Sqrt", "Exp", "Expm1", "Log", "Log1p",
    "Clip", "Reciprocal", "Sign", "Floor", "Ceil", "Round",
)) + _op_classes(compat.core_ops, ("Cast",))
BINARY_OPS = _op_classes(compat.numpy_ops, (
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Power",
))


L = keras.layers
_BUILT_INS = (
    (L.Conv1D, ConvHandler),
    (L.Conv2D, ConvHandler),
    (L.Conv3D, ConvHandler),
    (L.Conv1DTranspose, ConvTransposeHandler),
    (L.Conv2DTranspose, ConvTransposeHandler),
    (L.Conv3DTranspose, ConvTransposeHandler),
    (L.Dense, DenseHandler),
    (L.SeparableConv1D, SeparableConvHandler),
    (L.SeparableConv2D, SeparableConvHandler),
    (L.DepthwiseConv1D, DepthwiseHandler),
    (L.DepthwiseConv2D, DepthwiseHandler),
    (L.BatchNormalization, BatchNormHandler),
    (L.Activation, ActivationHandler),
    (L.ReLU, PassThroughHandler),
    (L.LeakyReLU, PassThroughHandler),
    (L.PReLU, PReLUHandler),
    (L.ELU, PassThroughHandler),
    (L.Identity, PassThroughHandler),
    (L.Dropout, PassThroughHandler),
    (L.SpatialDropout1D, PassThroughHandler),
    (L.SpatialDropout2D, PassThroughHandler),
    (L.SpatialDropout3D, PassThroughHandler),
    (L.GaussianNoise, PassThroughHandler),
    (L.GaussianDropout, PassThroughHandler),
    (L.AlphaDropout, PassThroughHandler),
    (L.Rescaling, RescalingHandler),
    (L.MaxPooling1D, ShapeKeepingHandler),
    (L.MaxPooling2D, ShapeKeepingHandler),
    (L.MaxPooling3D, ShapeKeepingHandler),
    (L.AveragePooling1D, ShapeKeepingHandler),
    (L.AveragePooling2D, ShapeKeepingHandler),
    (L.AveragePooling3D, ShapeKeepingHandler),
    (L.GlobalAveragePooling1D, ShapeKeepingHandler),
    (L.GlobalAveragePooling2D, ShapeKeepingHandler),
    (L.GlobalAveragePooling3D, ShapeKeepingHandler),
    (L.GlobalMaxPooling1D, ShapeKeepingHandler),
    (L.GlobalMaxPooling2D, ShapeKeepingHandler),
    (L.GlobalMaxPooling3D, ShapeKeepingHandler),
    (L.Cropping1D, ShapeKeepingHandler),
    (L.Cropping2D, ShapeKeepingHandler),
    (L.Cropping3D, ShapeKeepingHandler),
    (L.UpSampling1D, ShapeKeepingHandler),
    (L.UpSampling2D, ShapeKeepingHandler),
    (L.UpSampling3D, ShapeKeepingHandler),
    (L.ZeroPadding1D, ZeroPaddingHandler),
    (L.ZeroPadding2D, ZeroPaddingHandler),
    (L.ZeroPadding3D, ZeroPaddingHandler),
    (L.Add, MergeHandler),
    (L.Subtract, MergeHandler),
    (L.Average, MergeHandler),
    (L.Maximum, MergeHandler),
    (L.Minimum, MergeHandler),
    (L.Multiply, MergeHandler),
    (L.Concatenate, ConcatenateHandler),
    (L.Flatten, FlattenHandler),
    (L.Reshape, TrivialReshapeHandler),
    (L.LayerNormalization, LayerNormHandler),
    (compat.convnext_application.LayerScale, LayerScaleHandler),
)
_BUILT_INS += tuple((cls, ElementwiseOpHandler) for cls in ELEMENTWISE_OPS)
_BUILT_INS += tuple((cls, BinaryOpHandler) for cls in BINARY_OPS)
for _cls, _handler in _BUILT_INS:
    registry.register_layer(_cls, _handler)
del L, _cls, _handler
REGISTRY = registry.HANDLERS  # layer class -> handler; add entries with tf_psp.register_layer


def handler_for(layer):
    """`(handler instance, frozen reason or None)` for `layer` (see `tf_psp.registry`).

    A handler class may `specialize` itself for a layer (a grouped conv that
    is depthwise-like gets its own handler).
    """
    handler, reason = registry.handler_for(layer, _FrozenHandler)
    specialized = type(handler).specialize(layer) if hasattr(type(handler), "specialize") else None
    if specialized is not None and specialized is not type(handler):
        handler = specialized()
    return handler, reason


# --- the graph ------------------------------------------------------------------


def check_channels_last(model, caller):
    """Raises a ValueError naming the first `channels_first` layer of `model` (nested too).

    The channel graph reads channels on the last axis; on a channels_first
    model it would see widths and spatial positions where channels are.
    """
    for layer in compat.flatten_layers(model):
        if getattr(layer, "data_format", None) == "channels_first":
            raise ValueError(
                f"{caller}: layer '{layer.name}' ({type(layer).__name__}) uses "
                "data_format='channels_first'; tf_psp finds channels on the last axis only. "
                "Rebuild the model channels_last (the default, keras.config."
                "set_image_data_format('channels_last')) and copy the weights: kernels "
                "have the same layout in both formats.")


class ChannelGraph:
    """Channel groups, constants and liveness of a functional Keras model.

    Args:
        model: a built functional or Sequential Keras model (plain layers; use
            `tf_psp.shrink.strip` first for PSP models).
        approximate: treat constants read by convolutions with padding as
            foldable, as if there were no padding (not exact at the borders).

    Attributes:
        nodes: `NodeInfo` per layer call, in topological order.
        tensors: `TensorInfo` per symbolic tensor, keyed by `id(tensor)`.
        constants / needed: per tensor id, per-channel arrays.
        frozen: group root -> list of reasons.
        live: ids of the nodes the outputs still depend on (see `is_live`).
    """

    def __init__(self, model, approximate=False):
        self.model = inline_nested(model)
        self.approximate = bool(approximate)
        self._uf = _UnionFind()
        self.tensors = {}
        self.frozen = {}
        self.nodes = []
        self._collect()
        self._propagate_constants()
        self._drop_constant_inputs()
        for node in self.nodes:
            if self.is_live(node):
                node.handler.couple(self, node)
        for t in self.model.inputs:
            self.freeze(self.tensors[id(t)], None, "model input")
        for t in self.model.outputs:
            self.freeze(self.tensors[id(t)], None, "model output")
        self._propagate_needed()

    # --- construction -----------------------------------------------------
    def _tensor(self, tensor):
        key = id(tensor)
        if key not in self.tensors:
            info = TensorInfo(tensor, len(self.tensors), 0)
            info.slot = self._uf.add(info.channels or 0)
            self.tensors[key] = info
        return self.tensors[key]

    def _collect(self):
        for t in self.model.inputs:
            self._tensor(t)
        calls = {}
        ordered = []
        for node in compat.nodes_in_order(self.model):
            if not node.operation or node.is_input:
                continue
            ordered.append(node)
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for node in ordered:
            inputs = [self._tensor(t) for t in node.arguments.keras_tensors]
            outputs = [self._tensor(t) for t in node.outputs]
            handler, reason = handler_for(node.operation)
            handler.approximate = self.approximate
            inner = getattr(handler, "inner_spaces", None)  # e.g. attention heads: inputs first
            inputs = [self._tensor(t) for t in (inner(node.operation) if inner else [])] + inputs
            info = NodeInfo(node, handler, inputs, outputs)
            if reason is not None:
                pass  # a subclass with its own call() of a registered layer
            elif calls[id(node.operation)] > 1:
                reason = "is shared (called more than once)"
            elif any(t.channels is None for t in inputs + outputs):
                reason = "has an unknown channel count"
            elif handler.kind != "frozen":
                reason = handler.frozen_reason(node.operation, info)
            elif not isinstance(node.operation, keras.layers.Layer):
                reason = ("is a keras.ops call that may mix channels (only elementwise "
                          "ops with scalar constants pass channels through)")
            if reason is not None:
                info.handler = _FrozenHandler()
                info.frozen_reason = reason
            self.nodes.append(info)

    def union(self, slot_a, slot_b):
        self._uf.union(int(slot_a), int(slot_b))

    def union_tensors(self, a, b):
        for c in range(a.channels):
            self._uf.union(a.slot + c, b.slot + c)

    def freeze(self, tensor, node, reason):
        """Keeps every channel of `tensor`; the reason is a `Blocker`."""
        if node is not None:
            reason = Blocker(node, getattr(node, "frozen_reason", reason))
        else:
            reason = Blocker(None, reason)
        for s in tensor.slots():
            self.frozen.setdefault(int(s), []).append(reason)

    def tensor_of_slot(self, slot):
        """The TensorInfo holding `slot`."""
        if not hasattr(self, "_slot_starts"):
            infos = sorted(self.tensors.values(), key=lambda t: t.slot)
            self._slot_infos = [t for t in infos if t.channels]
            self._slot_starts = np.array([t.slot for t in self._slot_infos])
        return self._slot_infos[int(np.searchsorted(self._slot_starts, slot, side="right")) - 1]

    def space_name(self, slot):
        """A readable name of the channel space of `slot`: its earliest tensor's producer."""
        t = self.tensor_of_slot(self.group(slot))
        if hasattr(t.tensor, "space_label"):  # an inner space of one layer (attention heads)
            return t.tensor.space_label
        op = compat.producer(t.tensor)
        if op is None or isinstance(op, keras.layers.InputLayer):
            return "model input"
        return f"output of '{op.name}'"

    def group(self, slot):
        """Root slot of the group `slot` belongs to."""
        return self._uf.find(int(slot))

    def is_live(self, node):
        """Whether the model outputs depend on `node` (not only through dropped inputs)."""
        return id(node) in self.live

    def dead_branch(self, node):
        """Names of the dead layers that fed `node`'s dropped inputs, in order."""
        producers = {id(t.tensor): n for n in self.nodes for t in n.outputs}
        stack, found = [node.inputs[k] for k in node.dropped], set()
        while stack:
            n = producers.get(id(stack.pop().tensor))
            if n is not None and not self.is_live(n) and id(n) not in found:
                found.add(id(n))
                stack.extend(n.inputs)
        return [n.name for n in self.nodes if id(n) in found]

    # --- value facts --------------------------------------------------------
    def _propagate_constants(self):
        self.constants = {k: np.full(t.channels or 0, np.nan) for k, t in self.tensors.items()}
        for node in self.nodes:
            outs = node.handler.constants(node, [self.constants[id(t.tensor)] for t in node.inputs])
            for t, c in zip(node.outputs, outs):
                self.constants[id(t.tensor)] = np.asarray(c, np.float64)

    def _drop_constant_inputs(self):
        """Sets `node.dropped` of merges and `live`: nodes reached from the outputs
        without passing through a dropped input."""
        live_tensors = {id(t) for t in self.model.outputs}
        self.live = set()
        for node in reversed(self.nodes):
            if not any(id(t.tensor) in live_tensors for t in node.outputs):
                continue
            self.live.add(id(node))
            if isinstance(node.handler, MergeHandler):
                in_consts = [self.constants[id(t.tensor)] for t in node.inputs]
                node.dropped = node.handler.dropped_inputs(node, in_consts)
                if node.dropped:
                    node.constant_name = self._unused_name(f"{node.name}_constant")
            for k, t in enumerate(node.inputs):
                if k not in node.dropped:
                    live_tensors.add(id(t.tensor))

    def _unused_name(self, name):
        """`name`, or `name_1`, `name_2` ... if a layer of the model already has it."""
        taken = {layer.name for layer in compat.flatten_layers(self.model)}
        taken |= {n.constant_name for n in self.nodes if n.constant_name}
        candidate, k = name, 0
        while candidate in taken:
            k += 1
            candidate = f"{name}_{k}"
        return candidate

    def _propagate_needed(self):
        self.needed = {k: np.zeros(t.channels or 0, bool) for k, t in self.tensors.items()}
        for t in self.model.outputs:
            self.needed[id(t)][:] = True
        for node in reversed(self.nodes):
            if self.is_live(node):
                out_needed = [self.needed[id(t.tensor)] for t in node.outputs]
                ins = node.handler.needed_inputs(node, out_needed)
            else:
                ins = [np.zeros(t.channels or 0, bool) for t in node.inputs]
            for k in node.dropped:
                ins[k] = np.zeros(node.inputs[k].channels or 0, bool)
            node.in_needed = [np.asarray(n, bool) for n in ins]
            for t, n in zip(node.inputs, node.in_needed):
                self.needed[id(t.tensor)] |= n
