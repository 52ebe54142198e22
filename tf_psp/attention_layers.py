"""PSPMultiHeadAttention: a MultiHeadAttention with one PSP alpha per attention head.

The alpha of head `h` scales the head's attention output (softmax(q.k) v,
shape `[..., heads, value_dim]`) before the output projection, so a head with
`|alpha| < epsilon` contributes exactly nothing: `strip_and_shrink` removes it
from the query, key, value and output kernels (see `tf_psp.attention`).
Folded into the plain layer, the alpha scales the output kernel's head rows
(`[heads, value_dim, d_model]`).

`parameterize(coupling='group')` gives every MultiHeadAttention whose heads
can be removed this twin, next to the group alphas of the other channels.
"""

import keras
import numpy as np
from keras import ops

from tf_psp import compat
from tf_psp.layers import PSPMixin


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPMultiHeadAttention(PSPMixin, keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` with one alpha per head (structure `'channel'`:
    the heads are the input channels of the output projection).

    Takes the arguments of `keras.layers.MultiHeadAttention` plus the PSP
    arguments (`epsilon`, `alpha_initializer`, `alpha_regularizer`,
    `alpha_constraint`, `straight_through`); `structure` must be `'channel'`.
    With alpha 1 it computes what its Keras parent computes.
    """

    plain_class = keras.layers.MultiHeadAttention
    _alpha_kernel_name = "head_output_kernel"  # the weights alpha scales (balance_alphas)

    @property
    def head_output_kernel(self):
        """The output projection's kernel `[heads, value_dim, d_model]`: alpha scales its rows."""
        return compat.attention_projections(self)[3].kernel

    @property
    def _alpha_kernel_broadcast(self):
        return (self.num_heads, 1, 1)

    def __init__(self, *args, structure="channel", **kwargs):
        super().__init__(*args, structure=structure, **kwargs)
        if self.structure != "channel":
            raise ValueError(
                f"layer '{self.name}': PSPMultiHeadAttention has one alpha per head "
                f"(structure='channel'), got structure={structure!r}.")
        self.alpha = None

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        if self.alpha is None:
            self._build_alpha_per_unit(int(self.num_heads))

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        output, scores = super()._compute_attention(
            query, key, value, attention_mask, training, return_attention_scores)
        alpha = ops.reshape(self.thresholded_alpha(), (self.num_heads, 1))
        return output * ops.cast(alpha, output.dtype), scores

    def folded_weights(self):
        """The plain layer's weights with the thresholded alphas folded into the output kernel."""
        alpha = np.where(self.structure_mask(), _np(self.alpha.value), 0.0)
        output_kernel = compat.attention_projections(self)[3].kernel
        weights = []
        for variable in self._plain_variables():
            value = _np(variable.value)
            if variable is output_kernel:  # [heads, value_dim, d_model]
                value = value * alpha.reshape(-1, 1, 1).astype(value.dtype)
            weights.append(value)
        return weights

    def to_plain(self):
        raise NotImplementedError(
            f"layer '{self.name}': use tf_psp.strip(model) (the layer is built from "
            "several input shapes).")
