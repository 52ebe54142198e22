"""PSPSimpleRNN, PSPLSTM, PSPGRU: recurrent layers with one PSP alpha per unit.

The alpha of unit `j` scales the weights that write the unit's *candidate*:
column `j` of the candidate gate block of the kernel `[in, G*units]`, of the
recurrent kernel `[units, G*units]` and of the bias (SimpleRNN: its only block;
LSTM: the `c` block of i, f, c, o; GRU: the `h` block of z, r, h, both bias
rows when `reset_after`). That is the paper's `w = alpha * v` with the unit as
the structure, and it folds exactly into the plain layer's weights for every
alpha. With alpha 0 and the default zero initial state the unit's hidden
output is exactly 0 at every step, because the activation maps 0 to 0 (tanh,
relu, linear):

- SimpleRNN: `h_j = act(0) = 0`;
- LSTM: the candidate `act(0) = 0`, so `c_j = f c_j' + i 0` stays 0 and
  `h_j = o act(c_j) = 0`;
- GRU: the candidate `hh_j = act(0) = 0`, so `h_j = z h_j' + (1 - z) 0` stays 0.

A zero `h_j` feeds nothing to the recurrence or the output, so the unit is
removed exactly (`tf_psp.recurrent`). Scaling the hidden output `h_j` itself
would not fold into a plain LSTM or GRU (their output is `o * tanh(c)` or a
gated sum, not a linear function of the weights), so the twin would not strip
to a plain layer.

`parameterize(coupling='group')` gives every recurrent layer whose units can
go this twin (like `PSPMultiHeadAttention` for heads). The cuDNN fast path is
turned off in the twin (`use_cudnn=False`: it reads the raw weights).
"""

import weakref

import keras
import numpy as np
from keras import ops

from tf_psp.layers import PSPMixin, threshold

CANDIDATE_BLOCK = {"SimpleRNN": (1, 0), "LSTM": (4, 2), "GRU": (3, 2)}  # (gate blocks, block)


def gate_layout(layer):
    """`(gate blocks G, candidate block index)` of a SimpleRNN, LSTM or GRU (or its cell)."""
    for cls in type(layer).__mro__:
        name = cls.__name__.replace("Cell", "")
        if cls.__module__.startswith("keras") and name in CANDIDATE_BLOCK:
            return CANDIDATE_BLOCK[name]
    raise TypeError(f"layer '{layer.name}' ({type(layer).__name__}) is not SimpleRNN/LSTM/GRU.")


def candidate_scale(alpha, units, layer):
    """The per-column scale `[G*units]`: `alpha` on the candidate block, 1 elsewhere (numpy)."""
    gates, block = gate_layout(layer)
    scale = np.ones((gates, units), np.float32)
    scale[block] = alpha
    return scale.reshape(-1)


class _ScaledCell:
    """Mixin for a Keras RNN cell: `kernel`, `recurrent_kernel`, `bias` read alpha-scaled.

    The cell's variables are stored as `_raw_<name>`; the layer that owns the
    alpha sets `_psp_gate`, a weak reference to itself (neither tracked nor
    walked by `.keras` saving).
    """

    def _scaled_weight(self, name):
        raw = self.__dict__.get("_raw_" + name)
        gate = self.__dict__.get("_psp_gate")
        gate = gate() if gate is not None else None
        if raw is None or gate is None or getattr(gate, "alpha", None) is None:
            return raw
        gates, block = gate_layout(self)
        alpha = ops.cast(gate.thresholded_alpha(), raw.dtype)
        parts = [ops.ones((self.units,), raw.dtype)] * gates
        parts[block] = alpha
        return raw * ops.concatenate(parts, axis=0)

    def _set_raw(self, name, value):
        object.__setattr__(self, "_raw_" + name, value)


def _scaled_property(name):
    return property(lambda self: self._scaled_weight(name),
                    lambda self, value: self._set_raw(name, value))


for _name in ("kernel", "recurrent_kernel", "bias"):
    setattr(_ScaledCell, _name, _scaled_property(_name))
del _name


def input_kernel_variable(layer):
    """The kernel variable `[in, G*units]` of an RNN layer (unscaled in a PSP twin)."""
    cell = layer.cell
    return cell.__dict__.get("_raw_kernel", None) if isinstance(cell, _ScaledCell) else cell.kernel


class PSPSimpleRNNCell(_ScaledCell, keras.layers.SimpleRNNCell):
    """A SimpleRNNCell whose weights read alpha-scaled (see `_ScaledCell`)."""


class PSPLSTMCell(_ScaledCell, keras.layers.LSTMCell):
    """An LSTMCell whose weights read alpha-scaled (see `_ScaledCell`)."""


class PSPGRUCell(_ScaledCell, keras.layers.GRUCell):
    """A GRUCell whose weights read alpha-scaled (see `_ScaledCell`)."""


class _PSPRecurrent(PSPMixin):
    """One alpha per unit (structure `'filter'`: a unit's candidate weights)."""

    _cell_class = None
    _alpha_kernel_name = "kernel"
    _has_cudnn = True

    def __init__(self, *args, structure="filter", **kwargs):
        if self._has_cudnn:
            kwargs["use_cudnn"] = False
        super().__init__(*args, structure=structure, **kwargs)
        if self.structure != "filter":
            raise ValueError(
                f"layer '{self.name}': {type(self).__name__} has one alpha per unit "
                f"(structure='filter'), got structure={structure!r}.")
        # the cell Keras made, given scaled weight reads (same config, not built yet)
        self.cell.__class__ = self._cell_class
        object.__setattr__(self.cell, "_psp_gate", weakref.ref(self))
        self.alpha = None

    def build(self, sequences_shape, initial_state_shape=None):
        super().build(sequences_shape, initial_state_shape)
        if self.alpha is None:
            # the units space is the first input of the channel graph's node, as for heads
            self._build_alpha_per_unit(int(self.units))

    def get_config(self):
        config = super().get_config()
        config.pop("use_cudnn", None)
        return config

    def folded_weights(self):
        """The plain layer's weights with the thresholded alphas folded into the candidate."""
        alpha = np.asarray(ops.convert_to_numpy(threshold(self.alpha, self.epsilon, False)))
        scale = candidate_scale(alpha, int(self.units), self)
        return [np.asarray(ops.convert_to_numpy(v.value)) * scale.astype(v.dtype)
                for v in self._plain_variables()]

    def plain_config(self):
        config = super().plain_config()
        if self._has_cudnn:
            config["use_cudnn"] = "auto"
        return config


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPSimpleRNN(_PSPRecurrent, keras.layers.SimpleRNN):
    """`keras.layers.SimpleRNN` with one PSP alpha per unit (see the module docstring)."""

    plain_class = keras.layers.SimpleRNN
    _cell_class = PSPSimpleRNNCell

    _has_cudnn = False


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPLSTM(_PSPRecurrent, keras.layers.LSTM):
    """`keras.layers.LSTM` with one PSP alpha per unit (see the module docstring)."""

    plain_class = keras.layers.LSTM
    _cell_class = PSPLSTMCell


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPGRU(_PSPRecurrent, keras.layers.GRU):
    """`keras.layers.GRU` with one PSP alpha per unit (see the module docstring)."""

    plain_class = keras.layers.GRU
    _cell_class = PSPGRUCell


PSP_RECURRENT = {keras.layers.SimpleRNN: PSPSimpleRNN, keras.layers.LSTM: PSPLSTM,
                 keras.layers.GRU: PSPGRU}
