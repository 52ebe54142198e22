"""Recurrent handlers: SimpleRNN / LSTM / GRU units and Embedding dims as channel spaces.

Registered through the public `tf_psp.register_layer` when tf_psp is imported:

- `keras.layers.SimpleRNN`, `LSTM`, `GRU`: the units are the layer's output
  channels *and* an inner channel space (`tf_psp.attention.InnerSpace`, the
  node's first input) that the layer reads itself through its recurrent
  kernel; the two are one group. Unit `j` goes when nothing needs it: no
  reader downstream, and no kept unit reads `h_j` through the recurrent kernel
  (a closure over the gates), or when `h_j` is exactly 0 at every step: its
  candidate columns (kernel, recurrent kernel, bias) are zero, e.g. after its
  PSP alpha (`tf_psp.recurrent_layers`) reached 0, and the activation maps 0
  to 0 (see that module for why this is exact). The rebuilt layer has fewer
  `units`: kernel `[in, G*units]` and recurrent kernel `[units, G*units]`
  sliced per gate block (G = 1 SimpleRNN, 4 LSTM, 3 GRU), the recurrent
  kernel's rows and the bias (GRU `reset_after`: `[2, 3*units]`) with them.
  The input channels are an ordinary reader's: kernel rows, a constant input
  folded into the (input) bias. `return_sequences` either way, `go_backwards`,
  masks (`mask=`, e.g. from `Embedding(mask_zero=True)`). Kept whole, with
  the reason: an initial state given, `return_state`, `stateful`, an
  activation with `act(0) != 0`, a subclass with its own cell.
  `Bidirectional` is kept whole, with that reason (not handled yet: its
  twin would hold PSP layers inside a wrapper that `strip` does not open).
- `keras.layers.Embedding`: its output dims are a producer's channels (the
  columns of `embeddings`); the token ids are no channels (kept).
"""

import keras
import numpy as np

from tf_psp import macs as mac_rules
from tf_psp import registry
from tf_psp.attention import InnerSpace
from tf_psp.graph import LayerHandler, _new_layer, _np
from tf_psp.recurrent_layers import PSP_RECURRENT, gate_layout


def _blocks(array, gates, units):
    """`array [..., G*units]` as `[..., G, units]`."""
    return array.reshape(array.shape[:-1] + (gates, units))


def _maps_zero_to_zero(activation):
    value = _np(activation(keras.ops.zeros((1,), "float32")))
    return bool(np.all(value == 0))


class RecurrentUnitsHandler(LayerHandler):
    """`SimpleRNN`, `LSTM`, `GRU`: units are output channels and an inner space (see module)."""

    kind = "producer"
    read_input = 1  # node.inputs[1] is the sequence the kernel reads (0: the units)
    units_are_outputs = True  # the twin's alphas are the units' only alphas
    macs = staticmethod(mac_rules.rnn_macs)

    def inner_spaces(self, layer):
        """The units, read by the layer's own recurrent kernel."""
        if not layer.built:
            return []
        return [InnerSpace(layer.units, f"units of '{layer.name}'")]

    def frozen_reason(self, layer, node):
        if not layer.built:
            return "is not built"
        if type(layer.cell).__name__.replace("PSP", "") not in (
                "SimpleRNNCell", "LSTMCell", "GRUCell"):
            return f"has a custom cell ({type(layer.cell).__name__})"
        kwargs = node.node.arguments.kwargs
        if kwargs.get("initial_state") is not None or len(node.node.arguments.args) > 1:
            return "is given an initial state (its units would need the state's channels too)"
        mask = kwargs.get("mask")
        if len(node.inputs) != 2 + (mask is not None and hasattr(mask, "shape")):
            return "has several inputs"
        if len(node.outputs) != 1:
            return "returns its states (return_state=True)"
        if layer.stateful:
            return "is stateful (its carried state is not zero at the start)"
        if not _maps_zero_to_zero(layer.cell.activation):
            return "has an activation that does not map 0 to 0 (a dead unit would not be 0)"
        return None

    def couple(self, graph, node):
        graph.union_tensors(node.inputs[0], node.outputs[0])

    # --- weights ---------------------------------------------------------------
    def _weights(self, layer):
        cell = layer.cell
        kernel, recurrent = _np(cell.kernel), _np(cell.recurrent_kernel)
        bias = _np(cell.bias) if cell.use_bias else None
        return kernel, recurrent, bias

    def _dead_units(self, layer, in_consts):
        """Bool per unit: its candidate is 0 at every step, so `h_j` is 0."""
        gates, block = gate_layout(layer)
        units = layer.units
        kernel, recurrent, bias = self._weights(layer)
        rows = ~(np.isfinite(in_consts) & (in_consts == 0))  # rows that may see nonzero input
        dead = ~np.any(_blocks(kernel[rows], gates, units)[:, block] != 0, axis=0)
        dead &= ~np.any(_blocks(recurrent, gates, units)[:, block] != 0, axis=0)
        if bias is not None:
            dead &= ~np.any(_blocks(bias.reshape(-1, gates * units), gates, units)[:, block] != 0,
                            axis=0)
        return dead

    def constants(self, node, in_consts):
        x_consts = in_consts[1] if len(in_consts) > 1 else np.full(0, np.nan)
        dead = self._dead_units(node.layer, x_consts)
        return [np.where(dead, 0.0, np.nan)]

    def needed_inputs(self, node, out_needed):
        layer = node.layer
        gates, _ = gate_layout(layer)
        kernel, recurrent, _ = self._weights(layer)
        dead = self._dead_units(layer, np.full(kernel.shape[0], np.nan))
        # reads[i, k]: h_i feeds a gate of unit k
        reads = np.any(_blocks(recurrent, gates, layer.units) != 0, axis=1)
        needed = out_needed[0] & ~dead
        while True:
            grown = (needed | np.any(reads[:, needed], axis=1)) & ~dead
            if np.array_equal(grown, needed):
                break
            needed = grown
        x_needed = np.any(_blocks(kernel, gates, layer.units)[:, :, needed] != 0, axis=(1, 2))
        return [needed, x_needed] + [np.ones(t.channels or 0, bool) for t in node.inputs[2:]]

    def absorbs(self, node, value):
        return value == 0 or bool(node.layer.cell.use_bias)

    def read_kernels(self, layer):
        """(weights reading each unit, on axis -2; weights writing each unit, on axis -1).

        For importance scores (`tf_psp.plan`): unit j is read by recurrent-kernel
        row j and written by its columns of every gate block (kernel and
        recurrent kernel).
        """
        gates, _ = gate_layout(layer)
        kernel, recurrent, _ = self._weights(layer)
        write = _blocks(np.concatenate([kernel, recurrent], axis=0), gates, layer.units)
        return recurrent, write.reshape(-1, layer.units)

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        layer = node.layer
        gates, _ = gate_layout(layer)
        units = layer.units
        keep_u, keep_x = np.asarray(keep_in[0], int), np.asarray(keep_in[1], int)
        kernel, recurrent, bias = self._weights(layer)
        columns = (np.arange(gates)[:, None] * units + keep_u[None, :]).reshape(-1)
        consts = np.where(np.isfinite(in_consts[1]) & in_needed[1], in_consts[1], 0.0)
        consts[keep_x] = 0.0
        weights = [kernel[keep_x][:, columns], recurrent[keep_u][:, columns]]
        if bias is not None:
            bias = bias.copy()
            delta = (consts @ kernel).astype(bias.dtype)  # removed constant inputs
            if bias.ndim == 2:
                bias[0] += delta  # GRU reset_after: the input bias
            else:
                bias += delta
            weights.append(bias[..., columns])
        return _new_layer(layer, units=int(len(keep_u))), weights

    def psp_twin(self, layer, epsilon, psp_kwargs):
        """The `tf_psp.recurrent_layers` twin of `layer` (alphas 1), for `coupling='group'`."""
        config = layer.get_config()
        config.pop("build_config", None)
        config.update(psp_kwargs, structure="filter", epsilon=epsilon)
        return PSP_RECURRENT[type(layer)].from_config(config)


class EmbeddingHandler(LayerHandler):
    """`keras.layers.Embedding`: its output dims are new channels (columns of `embeddings`)."""

    kind = "producer"

    def frozen_reason(self, layer, node):
        if not layer.built:
            return "is not built"
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            return "has several inputs or outputs"
        if getattr(layer, "quantization_mode", None):
            return f"is quantized ({layer.quantization_mode})"
        if len(layer.weights) != 1:
            return "has other weights than its embeddings"
        return None

    def couple(self, graph, node):
        graph.freeze(node.inputs[0], node, "reads token ids (no channels)")

    def constants(self, node, in_consts):
        table = _np(node.layer.embeddings)  # [vocabulary, dims]
        same = np.all(table == table[:1], axis=0)
        return [np.where(same, table[0], np.nan).astype(np.float64)]

    def read_kernels(self, layer):
        """(weights reading, weights writing each dim on axis -1): the columns, both.

        For importance scores (`tf_psp.plan`): token ids are no channels, so
        only the writing side is ever read.
        """
        table = _np(layer.embeddings)
        return table, table

    def rebuild(self, node, keep_in, keep_out, in_consts, in_needed):
        keep = np.asarray(keep_out[0], int)
        table = _np(node.layer.embeddings)[:, keep]
        return _new_layer(node.layer, output_dim=int(len(keep))), [table]


class BidirectionalHandler(LayerHandler):
    """`keras.layers.Bidirectional`: kept whole, with the reason (its units are not handled yet)."""

    def couple(self, graph, node):
        for t in node.inputs + node.outputs:
            graph.freeze(t, node, "is a Bidirectional RNN: its units and inputs are kept "
                                  "(tf_psp removes units of SimpleRNN/LSTM/GRU layers only)")


for _cls in PSP_RECURRENT:
    registry.register_layer(_cls, RecurrentUnitsHandler)
registry.register_layer(keras.layers.Embedding, EmbeddingHandler)
registry.register_layer(keras.layers.Bidirectional, BidirectionalHandler)
del _cls
