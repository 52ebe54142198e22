"""Structure granularities: which slice of a kernel one `alpha` scales.

A kernel has the Keras layout `[*spatial, in, out]` (Conv1D/2D/3D, Dense with
no spatial axes) or `[*spatial, in, multiplier]` (depthwise kernels). Each
structure maps to a compact alpha shape (one entry per structure) and to the
shape alpha is reshaped to before it multiplies the kernel:

| structure | alpha shape           | broadcast onto the kernel   | bias scaled |
|-----------|-----------------------|-----------------------------|-------------|
| channel   | `(in,)`               | `[1, .., 1, in, 1]`         | no          |
| filter    | `(out,)` (`(in,)` for depthwise) | `[1, .., 1, out]` | yes         |
| column    | `(*spatial, in)`      | `[*spatial, in, 1]`         | no          |
| layer     | `()`                  | scalar                      | yes         |

For Dense, `column` has no spatial axes and equals `channel`.
"""

STRUCTURES = ("channel", "filter", "column", "layer")


def validate_structure(structure, layer_name=None):
    """Returns `structure` if it is known, else raises a ValueError naming the layer."""
    if structure not in STRUCTURES:
        where = f"layer '{layer_name}': " if layer_name else ""
        raise ValueError(
            f"{where}unknown PSP structure {structure!r}; expected one of "
            f"{', '.join(repr(s) for s in STRUCTURES)}."
        )
    return structure


def alpha_shape(structure, kernel_shape, depthwise=False):
    """Shape of the alpha vector for `structure` on a kernel of `kernel_shape`.

    Args:
        structure: one of `STRUCTURES`.
        kernel_shape: the kernel's shape, `[*spatial, in, out]`.
        depthwise: True for depthwise kernels `[*spatial, in, multiplier]`,
            whose filters are their input channels.

    Returns:
        A tuple: one alpha entry per structure.
    """
    validate_structure(structure)
    kernel_shape = tuple(int(d) for d in kernel_shape)
    if structure == "channel" or (structure == "filter" and depthwise):
        return (kernel_shape[-2],)
    if structure == "filter":
        return (kernel_shape[-1],)
    if structure == "column":
        return kernel_shape[:-1]
    return ()


def broadcast_shape(structure, kernel_shape, depthwise=False):
    """Shape alpha is reshaped to so that it broadcasts onto the kernel."""
    validate_structure(structure)
    ndim = len(kernel_shape)
    if structure == "channel" or (structure == "filter" and depthwise):
        return (1,) * (ndim - 2) + (int(kernel_shape[-2]), 1)
    if structure == "filter":
        return (1,) * (ndim - 1) + (int(kernel_shape[-1]),)
    if structure == "column":
        return tuple(int(d) for d in kernel_shape[:-1]) + (1,)
    return ()


def scales_bias(structure):
    """Whether pruning a structure also removes the bias it feeds."""
    return structure in ("filter", "layer")
