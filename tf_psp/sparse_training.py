"""Sparse training of the baselines, as proximal steps after each training batch.

- `BatchNormL1`: L1 on BatchNormalization gammas (Network Slimming, Liu et al.
  2017); rank the groups with `importance='bn'` afterwards.
- `GroupLasso`: the L2 norm of every coupled channel group's weights, reading
  kernel rows and writing filters together (DepGraph's group sparsity, Fang et
  al. 2023); rank with `importance='l2'` afterwards.

Both apply the proximal operator of their penalty after every optimizer step
(soft-thresholding with threshold `strength * learning rate`), which, unlike a
gradient penalty, sets entries and groups exactly to zero and does not depend
on the optimizer's momentum or adaptivity. The groups come from the same
`tf_psp.plan.PruningPlan` that `prune_to_budget` uses.
"""

import keras
import numpy as np

from tf_psp import compat
from tf_psp import plan as psp_plan


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _learning_rate(model):
    lr = model.optimizer.learning_rate
    return float(_np(lr.value if hasattr(lr, "value") else lr))


def _check_strength(strength, who):
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
        raise ValueError(f"{who}: strength must be a non-negative number, got {strength!r}.")
    return float(strength)


class BatchNormL1(keras.callbacks.Callback):
    """L1 penalty on every BatchNormalization gamma, as a proximal step per batch.

    Args:
        strength: the L1 coefficient (Network Slimming used 1e-5..1e-4 with
            the loss summed per example; here per mean loss, so larger values).
    """

    def __init__(self, strength):
        super().__init__()
        self.strength = _check_strength(strength, "BatchNormL1")

    def on_train_batch_end(self, batch, logs=None):
        compat.sync_training_state(self.model)
        t = self.strength * _learning_rate(self.model)
        for layer in compat.flatten_layers(self.model):
            if isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
                gamma = _np(layer.gamma.value)
                layer.gamma.assign(np.sign(gamma) * np.maximum(np.abs(gamma) - t, 0.0))


class GroupLasso(keras.callbacks.Callback):
    """Group lasso over the coupled channel groups of a plain or group-PSP model.

    Each group's weights are every kernel row reading its channels and every
    filter (with bias) writing them; after each batch all of them are scaled
    by `max(0, 1 - strength * lr / ||group||)`.

    Args:
        strength: the group-lasso coefficient.
    """

    def __init__(self, strength):
        super().__init__()
        self.strength = _check_strength(strength, "GroupLasso")
        self._layout = None

    def on_train_begin(self, logs=None):
        plan = psp_plan.pruning_plan(self.model)
        layers = psp_plan.layers_by_name(self.model)
        layout = {}
        for u in plan.units:
            for name, c in u.reads:
                layout.setdefault(name, [layers[name], {}, {}])[1][c] = u.index
            for name, c in u.writes:
                layout.setdefault(name, [layers[name], {}, {}])[2][c] = u.index
        self._layout = []
        for layer, reads, writes in layout.values():
            dw = getattr(layer, "depthwise_kernel", None) is not None
            read_var = layer.depthwise_kernel if dw else layer.kernel
            write_var = layer.pointwise_kernel if dw else layer.kernel
            cin, cout = read_var.shape[-2], write_var.shape[-1]
            r = np.full(cin, -1)
            r[list(reads)] = list(reads.values())
            w = np.full(cout, -1)
            w[list(writes)] = list(writes.values())
            bias = layer.bias if getattr(layer, "use_bias", False) and writes else None
            self._layout.append((read_var, r, write_var, w, bias))
        self._units = len(plan.units)

    def on_train_batch_end(self, batch, logs=None):
        compat.sync_training_state(self.model)
        t = self.strength * _learning_rate(self.model)
        if t == 0 or not self._units:
            return
        sq = np.zeros(self._units + 1)  # last entry: channels of no group
        values = []
        for read_var, r, write_var, w, bias in self._layout:
            rk = _np(read_var.value)
            wk = rk if write_var is read_var else _np(write_var.value)
            b = _np(bias.value) if bias is not None else None
            rows = np.sum(np.square(np.moveaxis(rk, -2, 0).reshape(rk.shape[-2], -1)), axis=1)
            cols = np.sum(np.square(wk.reshape(-1, wk.shape[-1])), axis=0)
            if b is not None:
                cols = cols + np.square(b)
            np.add.at(sq, np.where(r >= 0, r, self._units), rows)
            np.add.at(sq, np.where(w >= 0, w, self._units), cols)
            values.append((rk, wk, b))
        norm = np.sqrt(sq)
        scale = np.where(norm > 0, np.maximum(0.0, 1.0 - t / np.maximum(norm, 1e-30)), 1.0)
        scale[-1] = 1.0
        for (read_var, r, write_var, w, bias), (rk, wk, b) in zip(self._layout, values):
            s_in = scale[np.where(r >= 0, r, self._units)]
            s_out = scale[np.where(w >= 0, w, self._units)]
            shape_in = (1,) * (rk.ndim - 2) + (-1, 1)
            if write_var is read_var:
                read_var.assign((rk * s_in.reshape(shape_in) * s_out).astype(rk.dtype))
            else:
                read_var.assign((rk * s_in.reshape(shape_in)).astype(rk.dtype))
                pw_in = np.repeat(s_in, wk.shape[-2] // len(s_in)).reshape(shape_in[-2:])
                write_var.assign((wk * pw_in * s_out).astype(wk.dtype))
            if b is not None:
                bias.assign((b * s_out).astype(b.dtype))
