"""Handlers: how tf_psp treats a layer type. Register one with `tf_psp.register_layer`.

A handler tells the channel graph how channels flow through a layer, tells
`strip_and_shrink` how to rebuild it narrower, and (optionally) tells
`tf_psp.profile` its MACs. The built-in Keras layers use the same classes.
The contract (every method receives a `node`: `node.layer` is the layer,
`node.inputs` / `node.outputs` are tensors with `.channels`, `.tensor`):

- `kind`: `'passthrough'` (channel c in is channel c out), `'producer'` (a
  kernel reads the inputs and writes new channels) or `'frozen'`;
- `frozen_reason(layer, node)`: None if the handler understands this call,
  else a reason (its channels are then kept, and the reports say why);
- `couple(graph, node)`: ties channel slots, `graph.union_tensors(a, b)`, or
  keeps them, `graph.freeze(tensor, node, why)`;
- `constants(node, in_consts)`: receives per input, per channel, the value
  the channel has everywhere (NaN: not constant); returns the same per output;
- `needed_inputs(node, out_needed)`: receives per output a bool per channel
  (read downstream); returns per input which channels those depend on;
- `rebuild(node, keep_in, keep_out, in_consts, in_needed)`: receives per
  input/output the kept channel indices; returns `(new layer, weights or
  None)`;
- `macs(layer, input_shapes, output_shapes)` (optional): the MACs of one
  call, from batched shapes.
- `inner_spaces(layer)` (optional, producers): channel spaces inside the
  layer that no tensor carries (`tf_psp.attention.InnerSpace`, e.g. attention
  heads); they come first in `node.inputs`, read by the layer itself, and
  `rebuild` receives their kept indices in `keep_in`. With it, `psp_twin(layer,
  epsilon, psp_kwargs)` gives the layer that holds their alphas under
  `coupling='group'`, and `read_kernels(layer)` the kernels importance scores
  read (see `tf_psp.attention.AttentionHeadsHandler`).

Most custom layers need no new class: `PassThrough` for stateless elementwise
layers, `Channelwise(weights=[...])` for elementwise layers with per-channel
weights (LayerScale-like scales, PReLU-like activations), `Frozen` to say
explicitly that a layer's channels must be kept.
"""

import numpy as np

from tf_psp.graph import (
    ConcatenateHandler,
    ConvHandler,
    DenseHandler,
    DepthwiseHandler,
    LayerHandler,
    MergeHandler,
    PassThroughHandler,
    SeparableConvHandler,
    ShapeKeepingHandler,
    _new_layer,
    _np,
)

PassThrough = PassThroughHandler
Frozen = LayerHandler

__all__ = [
    "Channelwise",
    "ConcatenateHandler",
    "ConvHandler",
    "DenseHandler",
    "DepthwiseHandler",
    "Frozen",
    "LayerHandler",
    "MergeHandler",
    "PassThrough",
    "SeparableConvHandler",
    "ShapeKeepingHandler",
]


class Channelwise(PassThroughHandler):
    """A layer that maps channel c to channel c, elementwise, with per-channel weights.

    Examples: a custom activation, a LayerScale-like learned scale, a
    per-channel bias or gate. Channels removed around the layer are removed
    through it: the listed weights are sliced on their last axis, every other
    weight is copied unchanged. A constant input channel (a pruned filter's
    bias) is mapped by calling the layer on it, so the layer must be
    elementwise along the channel axis.

    Args:
        weights: names of the per-channel weights (attribute names such as
            `"gamma"`, or variable names), channel axis last. Empty for a
            stateless layer.
        width_key: the config key that holds the channel count (e.g.
            `"projection_dim"`), set to the new width on rebuild; None when the
            layer infers its width from its input in `build`.
    """

    def __init__(self, weights=(), width_key=None):
        if isinstance(weights, str):
            weights = [weights]
        self.weights = tuple(weights)
        self.width_key = width_key

    def __repr__(self):
        return f"Channelwise(weights={list(self.weights)!r}, width_key={self.width_key!r})"

    def _per_channel(self, layer):
        ids = set()
        for name in self.weights:
            attribute = getattr(layer, name, None)
            if attribute is not None and hasattr(attribute, "shape"):
                ids.add(id(attribute))
                continue
            matches = [v for v in layer.weights if v.name == name or v.path.endswith("/" + name)]
            if not matches:
                return None, name
            ids.update(id(v) for v in matches)
        return ids, None

    def frozen_reason(self, layer, node):
        reason = super().frozen_reason(layer, node)
        if reason:
            return reason
        ids, missing = self._per_channel(layer)
        if ids is None:
            return f"has no weight named {missing!r} (Channelwise(weights=...))"
        channels = node.outputs[0].channels
        for v in layer.weights:
            if id(v) in ids and (not len(v.shape) or v.shape[-1] != channels):
                return (f"weight {v.name!r} of shape {tuple(v.shape)} is not per channel "
                        f"(last axis {channels} expected)")
        if self.width_key is not None and self.width_key not in layer.get_config():
            return f"has no config key {self.width_key!r} (Channelwise(width_key=...))"
        return None

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = node.layer
        keep = keep_out[0]
        changes = {self.width_key: int(len(keep))} if self.width_key else {}
        ids, _ = self._per_channel(layer)
        weights = [_np(v)[..., keep] if id(v) in ids else _np(v) for v in layer.weights]
        return _new_layer(layer, **changes), [np.asarray(w) for w in weights]
