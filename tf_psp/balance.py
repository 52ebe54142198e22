"""balance_alphas(): start PSP where alpha decay and kernel decay balance.

With L2 decay `lambda` on alpha and decay `kappa` on the kernel `v`, the
cheapest way to write a structure's weights `w_i = alpha_i * v_i` is
`alpha_i**4 = (kappa / lambda) * ||w_i||**2`; there the two decays together
act like a group lasso `2 sqrt(kappa * lambda) * ||w_i||` on the structure,
which is what drives unimportant structures to zero. Starting from
`alpha = 1` instead, the first epochs only move scale between alpha and the
kernel (all alphas shrink alike), which a short run cannot afford: the
kernel's side of that exchange runs at the slow rate `learning_rate * kappa`.

`balance_alphas` rescales every alpha and its kernel slice to that
equilibrium; the model computes exactly the same function. It is an addition
to the paper's method (which starts at `alpha = 1`).
"""

import keras
import numpy as np

from tf_psp import compat, coupling, recurrent_layers
from tf_psp import layers as psp_layers
from tf_psp import regularizers as psp_regularizers


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _decays(regularizer, size, where):
    """Per-alpha L2 decay of a `WeightDecay` regularizer (its weights included)."""
    if not isinstance(regularizer, psp_regularizers.WeightDecay) or regularizer.decay <= 0:
        raise ValueError(
            f"balance_alphas: {where} needs a tf_psp.regularizers.WeightDecay alpha "
            f"regularizer with decay > 0, got {regularizer!r}."
        )
    weights = np.ones(size) if regularizer.weights is None else np.asarray(regularizer.weights)
    return regularizer.decay * weights


def _copy(model):
    """A new model with the same config and weights (shared layers stay shared).

    Unlike `functional.clone_with_weights`, rebuilt from the model's config
    (a deserialization round trip: the copy is what a saved model loads as).
    """
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def balance_alphas(model: keras.Model, kernel_decay: float, momentum: float = 0.0,
                   min_alpha: float = 1e-6) -> keras.Model:
    """A copy of a PSP model with alphas and kernels at the decays' equilibrium.

    Per-layer alphas of the `channel` and `column` structures (which scale
    only the kernel) and group alphas (`parameterize(coupling='group')`,
    whose structure is the channel in every layer reading it) are set to
    `alpha_i = (kappa / lambda_i)**(1/4) * sqrt(||w_i||)`, with `w_i` the
    structure's current effective weights and `lambda_i` its alpha decay
    (a `WeightDecay`, cost weights included); the kernel slices are divided
    accordingly, so outputs do not change. `filter` and `layer` alphas also
    scale a bias and are left as they are.

    Args:
        model: a PSP model; it is not modified.
        kernel_decay: the decay `kappa` on kernels while training (e.g. the
            optimizer's `weight_decay`, or an L2 kernel regularizer's factor
            times 2).
        momentum: SGD momentum `mu` if the kernel decay is *decoupled*
            (optimizer `weight_decay`, applied once per step) while alpha's
            decay goes through the gradient and momentum, which amplifies it
            by `1 / (1 - mu)`: then `kappa * (1 - mu)` is used. 0 otherwise.
        min_alpha: floor of the new alphas (a structure of zero weights).

    Returns:
        The balanced copy.

    Raises:
        ValueError: `kernel_decay <= 0`, or an alpha has no `WeightDecay`.
    """
    kernel_decay = float(kernel_decay)
    if not kernel_decay > 0:
        raise ValueError(f"balance_alphas: kernel_decay must be > 0, got {kernel_decay}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"balance_alphas: momentum must be in [0, 1), got {momentum}.")
    kappa = kernel_decay * (1.0 - momentum)
    model = _copy(model)
    for layer in compat.flatten_layers(model):
        if (psp_layers.is_psp_layer(layer) and layer.structure in ("channel", "column")
                and hasattr(layer, layer._alpha_kernel_name)):
            _balance_layer(layer, kappa, min_alpha)
    calls = coupling.reader_calls(model)
    if calls:
        _balance_groups(model, calls, kappa, min_alpha)
    return model


def _balance_layer(layer, kappa, min_alpha):
    kernel_var = getattr(layer, layer._alpha_kernel_name)
    kernel = _np(kernel_var)
    # alpha's shape on that kernel (attention heads: [heads, 1, 1] on the output kernel)
    broadcast = getattr(layer, "_alpha_kernel_broadcast", layer._alpha_broadcast)
    alpha = _np(layer.alpha).reshape(broadcast)
    axes = tuple(i for i, d in enumerate(broadcast) if d == 1)
    norms = np.sqrt(np.sum(np.square(kernel * alpha), axis=axes, keepdims=True))
    size = int(np.prod(layer.alpha.shape))
    decays = _decays(layer.alpha_regularizer, size, f"layer '{layer.name}'")
    new = np.maximum((kappa / decays.reshape(broadcast)) ** 0.25 * np.sqrt(norms), min_alpha)
    kernel_var.assign((kernel * alpha / new).astype(kernel.dtype))
    layer.alpha.assign(new.reshape(layer.alpha.shape).astype("float32"))


def _balance_groups(model, calls, kappa, min_alpha):
    gate = next(iter(calls.values()))[0]
    alphas = gate.alphas()
    squares = np.zeros(alphas.size)
    rows = {}
    for name, (_, index) in calls.items():
        reader = model.get_layer(name)
        separable = hasattr(reader, "pointwise_kernel")
        kernel_var = reader.depthwise_kernel if separable else reader.kernel if hasattr(
            reader, "kernel") else recurrent_layers.input_kernel_variable(reader)  # an RNN
        kernel = _np(kernel_var)
        index = np.asarray(index)
        per_channel = np.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2], -1)
        norms = np.sum(np.square(per_channel), axis=1)
        live = index >= 0
        np.add.at(squares, index[live], norms[live] * alphas[index[live]] ** 2)
        rows[name] = (kernel_var, kernel, index, live)
    decays = np.concatenate([
        _decays(_group_regularizer(gate, g), v.shape[0], f"group '{gate.group_names[g]}'")
        for g, v in enumerate(gate.group_alphas)
    ])
    new = np.maximum((kappa / decays) ** 0.25 * squares ** 0.25, min_alpha)
    for kernel_var, kernel, index, live in rows.values():
        ratio = np.ones(index.size)
        ratio[live] = alphas[index[live]] / new[index[live]]
        kernel_var.assign((kernel * ratio.reshape(-1, 1)).astype(kernel.dtype))
    offset = 0
    for variable in gate.group_alphas:
        size = variable.shape[0]
        variable.assign(new[offset:offset + size].astype("float32"))
        offset += size


def _group_regularizer(gate, g):
    regularizer = gate.alpha_regularizer
    if gate.costs is not None and regularizer is not None:
        regularizer = psp_regularizers.with_weights(regularizer, gate.costs[g])
    return regularizer
