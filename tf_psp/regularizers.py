"""Regularizers and constraints on PSP's `alpha`: the paper's ablation set.

* `WeightDecay` (default, the paper's choice): L2 decay, gradient `decay * alpha`
  as in paper eq. 6.
* `L1`: L1 penalty on alpha.
* `FixedSparsity`: a constraint keeping only the largest `1 - sparsity`
  fraction of `|alpha|` of a layer after every update.
"""

import keras
import numpy as np
from keras import ops

DEFAULT_DECAY = 5e-4


@keras.saving.register_keras_serializable(package="tf_psp")
class WeightDecay(keras.regularizers.Regularizer):
    """L2 weight decay on alpha: loss `0.5 * decay * sum(alpha**2)`.

    The factor 0.5 makes the gradient `decay * alpha`, the paper's
    `lambda * alpha` (eq. 6), so with SGD+momentum this is exactly PSP.

    Args:
        decay: non-negative strength `lambda`.
        weights: optional non-negative per-entry factors (alpha's shape,
            flattened), e.g. the relative MAC cost of each structure for
            cost-aware decay: loss `0.5 * decay * sum(weights * alpha**2)`.
    """

    def __init__(self, decay=DEFAULT_DECAY, weights=None):
        self.decay = _non_negative(decay, "WeightDecay: decay")
        self.weights = _weights(weights)

    def __call__(self, x):
        return 0.5 * self.decay * ops.sum(_weighted(ops.square(x), self.weights))

    def get_config(self):
        return {"decay": self.decay, "weights": self.weights}


@keras.saving.register_keras_serializable(package="tf_psp")
class L1(keras.regularizers.Regularizer):
    """L1 penalty on alpha: loss `l1 * sum(|alpha|)`.

    Args:
        l1: non-negative strength.
        weights: optional non-negative per-entry factors, as for `WeightDecay`.
    """

    def __init__(self, l1=1e-4, weights=None):
        self.l1 = _non_negative(l1, "L1: l1")
        self.weights = _weights(weights)

    def __call__(self, x):
        return self.l1 * ops.sum(_weighted(ops.abs(x), self.weights))

    def get_config(self):
        return {"l1": self.l1, "weights": self.weights}


@keras.saving.register_keras_serializable(package="tf_psp")
class FixedSparsity(keras.constraints.Constraint):
    """Keeps the largest `1 - sparsity` fraction of `|alpha|`, zeroes the rest.

    Pass it as `alpha_constraint`; Keras applies it after each optimizer step
    (the paper's "fixed sparsity" baseline). Ties at the cut keep all tied
    entries.

    Args:
        sparsity: fraction of structures to zero, in [0, 1).
    """

    def __init__(self, sparsity=0.5):
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(
                f"FixedSparsity: sparsity must be in [0, 1), got {sparsity}."
            )
        self.sparsity = sparsity

    def __call__(self, w):
        size = 1
        for d in w.shape:
            size *= int(d)
        num_zero = int(round(self.sparsity * size))
        if num_zero == 0:
            return w
        magnitude = ops.abs(w)
        # The smallest magnitude that is kept; ties with it are kept too.
        keep_from = ops.sort(ops.reshape(magnitude, (-1,)))[num_zero]
        return ops.where(magnitude >= keep_from, w, ops.zeros_like(w))

    def get_config(self):
        return {"sparsity": self.sparsity}


def _weights(weights):
    """None, or a list of non-negative finite floats (JSON-serializable)."""
    if weights is None:
        return None
    try:
        values = [float(w) for w in np.ravel(np.asarray(weights, dtype="float64"))]
    except (TypeError, ValueError):
        raise ValueError(f"regularizer weights must be numbers, got {weights!r}.") from None
    if not all(np.isfinite(w) and w >= 0 for w in values):
        raise ValueError("regularizer weights must be finite and >= 0.")
    return values


def _weighted(values, weights):
    """`values` (any shape) flattened and multiplied by `weights` when given."""
    if weights is None:
        return values
    flat = ops.reshape(values, (-1,))
    if int(flat.shape[0]) != len(weights):
        raise ValueError(
            f"regularizer has {len(weights)} weights for {int(flat.shape[0])} entries."
        )
    return flat * ops.convert_to_tensor(np.asarray(weights, "float32"), dtype=flat.dtype)


def with_weights(regularizer, weights):
    """A copy of a `WeightDecay` or `L1` regularizer with per-entry `weights`.

    Raises:
        ValueError: for other regularizers, which cannot be weighted per entry.
    """
    if isinstance(regularizer, (WeightDecay, L1)):
        config = regularizer.get_config()
        config["weights"] = weights
        return type(regularizer)(**config)
    raise ValueError(
        f"cost-aware decay needs a tf_psp.regularizers.WeightDecay or L1 "
        f"alpha_regularizer, got {type(regularizer).__name__}."
    )


def _non_negative(value, name):
    """`value` as a float, or a ValueError naming the argument."""
    try:
        number = None if isinstance(value, (bool, str)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not np.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be >= 0 and finite, got {value!r}.")
    return number


def default_alpha_regularizer():
    """The paper's default: L2 weight decay on alpha."""
    return WeightDecay(DEFAULT_DECAY)
