"""Transformer handlers: attention heads as a channel space, token selection `x[:, 0, :]`.

Registered through the public `tf_psp.register_layer` when tf_psp is imported:

- `keras.layers.MultiHeadAttention`: its heads are one channel space of the
  channel graph (an *inner* space: slots of no Keras tensor, read by the
  layer's output projection). A head is removable when its output-kernel rows
  (`[heads, value_dim, d_model]`) are zero, e.g. after its PSP alpha
  (`tf_psp.attention_layers.PSPMultiHeadAttention`) reached 0, or when its
  value projection is zero; the rebuilt layer has fewer `num_heads` (same
  `key_dim` / `value_dim`), its query/key/value kernels `[d_model, heads, dim]`,
  biases `[heads, dim]` and output kernel sliced on the heads axis: exact.
  The model width (`d_model`: query, key, value and output channels) is kept:
  in a transformer it is the residual stream, which `LayerNormalization`
  makes not exactly removable (PSP.md section 7).
- `x[:, 0, :]` and other `keras.ops` indexing (GetItem) that leaves the last
  axis alone: channel c in is channel c out.
"""

import keras
import numpy as np

from tf_psp import compat, registry
from tf_psp import macs as mac_rules
from tf_psp.attention_layers import PSPMultiHeadAttention
from tf_psp.graph import LayerHandler, ShapeKeepingHandler, _new_layer, _np


class InnerSpace:
    """Channel slots inside one layer call (no Keras tensor carries them), e.g. heads.

    Quacks like a symbolic tensor for the channel graph: `shape[-1]` is the
    number of channels; `space_label` names the space in reports.
    """

    dtype = "float32"

    def __init__(self, channels, label):
        self.shape = (None, int(channels))
        self.space_label = label

    def __repr__(self):
        return f"InnerSpace({self.shape[-1]}, {self.space_label!r})"


KEEPS_WIDTH = ("keeps its model width (d_model, the residual stream of a transformer: "
               "not exactly removable through LayerNormalization); only its heads are removable")


def _head_kernels(layer):
    """`[(variable, heads axis)]` of every weight of `layer` that has a heads axis."""
    query, key, value, output = compat.attention_projections(layer)
    gate = compat.attention_gate(layer)
    dense = [query, key, value] + ([gate] if gate is not None else [])
    pairs = []
    for sub in dense:
        pairs.append((sub.kernel, 1))  # [d_model, heads, dim]
        if getattr(sub, "bias", None) is not None:
            pairs.append((sub.bias, 0))  # [heads, dim]
    pairs.append((output.kernel, 0))  # [heads, value_dim, d_model]
    return pairs


class AttentionHeadsHandler(LayerHandler):
    """`keras.layers.MultiHeadAttention`: heads are an inner channel space.

    The node's first input is the heads space (`InnerSpace`); the real
    inputs (query, value, key) and the output keep their channels.
    """

    kind = "producer"
    macs = staticmethod(mac_rules.attention_macs)

    def inner_spaces(self, layer):
        """The heads, as one inner channel space read by the output projection."""
        if not layer.built:
            return []
        return [InnerSpace(layer.num_heads, f"heads of '{layer.name}'")]

    def frozen_reason(self, layer, node):
        if not layer.built:
            return "is not built"
        if len(node.outputs) != 1:
            return "returns its attention scores (their heads axis would change)"
        return None

    def couple(self, graph, node):
        for t in node.inputs[1:] + node.outputs:
            graph.freeze(t, node, KEEPS_WIDTH)

    def constants(self, node, in_consts):
        return [np.full(t.channels or 0, np.nan) for t in node.outputs]

    def _live_heads(self, layer):
        """Bool per head: its output rows are nonzero and its value projection is not zero."""
        _, _, value, output = compat.attention_projections(layer)
        heads = layer.num_heads
        out_rows = np.any(_np(output.kernel).reshape(heads, -1) != 0, axis=1)
        v = np.moveaxis(_np(value.kernel), 1, 0).reshape(heads, -1)
        v_live = np.any(v != 0, axis=1)
        if getattr(value, "bias", None) is not None:
            v_live |= np.any(_np(value.bias).reshape(heads, -1) != 0, axis=1)
        return out_rows & v_live

    def needed_inputs(self, node, out_needed):
        heads = self._live_heads(node.layer) & bool(np.any(out_needed[0]))
        return [heads] + [np.ones(t.channels or 0, bool) for t in node.inputs[1:]]

    def read_kernels(self, layer):
        """(weights reading each head, on axis -2; weights writing each head, on axis -1).

        For importance scores (`tf_psp.plan`): a head is read by its output
        kernel rows and written by its query, key and value projections.
        """
        query, key, value, output = compat.attention_projections(layer)
        kernel = _np(output.kernel)  # [heads, value_dim, d_model]
        read = np.moveaxis(kernel.reshape(kernel.shape[0], -1), 0, -1)[..., None]
        write = np.concatenate([_np(d.kernel) for d in (query, key, value)], axis=-1)
        return read, np.moveaxis(write, 1, -1)  # [d_model, dims, heads]

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = node.layer
        heads = np.asarray(keep_in[0], int)
        axes = {id(v): axis for v, axis in _head_kernels(layer)}
        weights = []
        for variable in layer.weights:
            value = _np(variable.value)
            if id(variable) in axes:
                value = np.take(value, heads, axis=axes[id(variable)])
            weights.append(value)
        return _new_layer(layer, num_heads=int(len(heads))), weights

    def psp_twin(self, layer, epsilon, psp_kwargs):
        """The `PSPMultiHeadAttention` of `layer` (alphas 1), for `coupling='group'`."""
        config = layer.get_config()
        config.pop("build_config", None)
        config.update(psp_kwargs, structure="channel", epsilon=epsilon)
        return PSPMultiHeadAttention.from_config(config)


def _index_key(key):
    return key if isinstance(key, tuple) else (key,)


class GetItemHandler(ShapeKeepingHandler):
    """`x[:, 0, :]`, `x[:, 1:]`, `x[..., :]`: indexing that leaves the last axis whole.

    A constant channel stays the same constant; the op is stateless and reused.
    """

    def frozen_reason(self, layer, node):
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            return "indexes with a tensor"
        args = node.node.arguments.args
        key = _index_key(args[1] if len(args) > 1 else node.node.arguments.kwargs.get("key"))
        rank = len(node.inputs[0].tensor.shape)
        if any(k is None or isinstance(k, (np.ndarray, list)) or hasattr(k, "shape")
               for k in key):
            return "indexes with an array or adds axes"
        if Ellipsis in key:
            after = key[key.index(Ellipsis) + 1:]
            last = after[-1] if after else slice(None)
        elif len(key) < rank:
            last = slice(None)
        else:
            last = key[rank - 1]
        if last != slice(None):
            return f"indexes the channel axis ({last!r})"
        if node.inputs[0].channels != node.outputs[0].channels:
            return "changes the channel count"
        return None

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        return node.layer, None


registry.register_layer(keras.layers.MultiHeadAttention, AttentionHeadsHandler)
registry.register_layer(compat.numpy_ops.GetItem, GetItemHandler)
