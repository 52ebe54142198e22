"""PSPGroupAlphas: the shared alphas of a `coupling='group'` model, one per channel group.

The layer only holds and applies alphas; which channels get one and which
layers read them is planned in `tf_psp.coupling`.
"""

import keras
import numpy as np
from keras import ops

from tf_psp import compat
from tf_psp import layers as psp_layers
from tf_psp import regularizers as psp_regularizers

GROUP_KWARGS = (
    "alpha_initializer",
    "alpha_regularizer",
    "alpha_constraint",
    "straight_through",
)
COSTS = (None, "macs")


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPGroupAlphas(keras.layers.Layer):
    """Shared PSP alphas: one per channel of each dependency group.

    One instance serves a whole model: it is called before every reading
    layer, `outputs = inputs * threshold(alphas)[index]` on the last axis.

    Args:
        group_sizes: number of alphas of each group.
        group_names: a readable name per group (its first producer).
        epsilon: pruning threshold, as for the PSP layers.
        alpha_initializer, alpha_regularizer, alpha_constraint,
            straight_through: as for the PSP layers (the default regularizer
            is `tf_psp.regularizers.WeightDecay()`).
        costs: None, or per group a list of non-negative factors that weight
            the regularizer of each alpha (cost-aware decay).
    """

    structure = "group"

    def __init__(
        self,
        group_sizes,
        group_names=None,
        epsilon=psp_layers.DEFAULT_EPSILON,
        alpha_initializer="ones",
        alpha_regularizer=psp_layers._DEFAULT,
        alpha_constraint=None,
        straight_through=True,
        costs=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True  # a per-channel scale: a sequence mask passes unchanged
        self.group_sizes = [int(n) for n in group_sizes]
        if not self.group_sizes or min(self.group_sizes) < 1:
            raise ValueError(
                f"layer '{self.name}': group_sizes must be positive, got {self.group_sizes}."
            )
        names = group_names or [f"group_{g}" for g in range(len(self.group_sizes))]
        self.group_names = [str(n) for n in names]
        if len(self.group_names) != len(self.group_sizes):
            raise ValueError(f"layer '{self.name}': one group name per group is needed.")
        self.epsilon = psp_layers.validate_epsilon(epsilon, self.name)
        self.alpha_initializer = keras.initializers.get(alpha_initializer)
        if alpha_regularizer is psp_layers._DEFAULT:
            alpha_regularizer = psp_regularizers.default_alpha_regularizer()
        self.alpha_regularizer = keras.regularizers.get(alpha_regularizer)
        self.alpha_constraint = keras.constraints.get(alpha_constraint)
        self.straight_through = bool(straight_through)
        if costs is not None:
            costs = [[float(c) for c in group] for group in costs]
            if [len(c) for c in costs] != self.group_sizes:
                raise ValueError(f"layer '{self.name}': costs must have one entry per alpha.")
            if self.alpha_regularizer is None:
                raise ValueError(
                    f"layer '{self.name}': cost-aware decay needs an alpha_regularizer.")
        self.costs = costs
        self.group_alphas = []
        self._total = sum(self.group_sizes)

    def build(self, input_shape=None):
        if self.group_alphas:
            return
        for g, (size, name) in enumerate(zip(self.group_sizes, self.group_names)):
            regularizer = self.alpha_regularizer
            if self.costs is not None:
                regularizer = psp_regularizers.with_weights(regularizer, self.costs[g])
            self.group_alphas.append(
                self.add_weight(
                    name=f"alpha_{name}",
                    shape=(size,),
                    initializer=self.alpha_initializer,
                    regularizer=regularizer,
                    constraint=self.alpha_constraint,
                    trainable=True,
                    dtype="float32",
                )
            )

    def _positions(self, index):
        index = np.asarray(index, dtype="int32").reshape(-1)
        if index.size and (index.max() >= self._total or index.min() < -1):
            raise ValueError(
                f"layer '{self.name}': index entries must be in [-1, {self._total}), "
                f"got {index.min()}..{index.max()}."
            )
        return np.where(index < 0, self._total, index)

    def call(self, inputs, index):
        groups, local = self._local_positions(index)
        parts = [psp_layers.threshold(self.group_alphas[g], self.epsilon, self.straight_through)
                 for g in groups]
        if local is None:
            scale = parts[0]  # the common call: one whole group, in order
        else:
            table = ops.concatenate(parts + [ops.ones((1,), "float32")], axis=0)
            scale = ops.take(table, local, axis=0)
        return inputs * ops.cast(scale, inputs.dtype)

    def _local_positions(self, index):
        """The groups a call with `index` reads, and its positions in those groups' table alone
        (None when it reads one whole group in order). Cached per index.

        A call reads one or a few groups of the (often hundreds of) groups:
        thresholding only those keeps the training graph small (thresholding
        every group at every call made a MobileNetV2's graph ~50x larger and
        its first training step minutes long). The values are the same.
        """
        positions = self._positions(index)
        key = positions.tobytes()
        cache = self.__dict__.setdefault("_local_cache", {})  # not tracked by Keras
        if key not in cache:
            sizes = np.asarray(self.group_sizes)
            starts = np.cumsum(sizes) - sizes
            real = positions < self._total
            group_of = np.searchsorted(starts + sizes, positions[real], side="right")
            groups = np.unique(group_of)
            local_start = np.zeros(len(sizes), "int64")
            local_start[groups] = np.cumsum(sizes[groups]) - sizes[groups]
            local = np.full(positions.shape, sizes[groups].sum(), "int32")  # the constant 1
            local[real] = local_start[group_of] + positions[real] - starts[group_of]
            whole = len(groups) == 1 and np.array_equal(local, np.arange(sizes[groups[0]]))
            cache[key] = (groups.tolist(), None if whole else local)
        return cache[key]

    def compute_output_spec(self, inputs, index=None):
        return keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)

    # --- numpy views ------------------------------------------------------------
    def alphas(self):
        """All alphas, groups concatenated (numpy)."""
        return np.concatenate([_np(a.value) for a in self.group_alphas])

    def structure_mask(self):
        """Numpy bool per alpha (groups concatenated): True where alive."""
        return np.abs(self.alphas()) >= self.epsilon

    def scales(self, index):
        """The thresholded scale the call with `index` applies (numpy)."""
        table = np.concatenate([np.where(self.structure_mask(), self.alphas(), 0.0), [1.0]])
        return table[self._positions(index)].astype("float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "group_sizes": self.group_sizes,
                "group_names": self.group_names,
                "epsilon": self.epsilon,
                "alpha_initializer": keras.initializers.serialize(self.alpha_initializer),
                "alpha_regularizer": keras.regularizers.serialize(self.alpha_regularizer),
                "alpha_constraint": keras.constraints.serialize(self.alpha_constraint),
                "straight_through": self.straight_through,
                "costs": self.costs,
            }
        )
        return config


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def is_group_alphas(layer):
    """True for the shared-alpha layer of a `coupling='group'` model."""
    return isinstance(layer, PSPGroupAlphas)


def has_alphas(model):
    """Whether `model` has PSP alphas (per-layer PSP layers or group alphas)."""
    return any(psp_layers.is_psp_layer(layer) or is_group_alphas(layer)
               for layer in compat.flatten_layers(model))
