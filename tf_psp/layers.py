"""PSP layers: drop-in twins of Keras layers with one trainable scale per structure.

Each layer computes with the effective kernel `threshold(alpha) * kernel`,
where `alpha` (the trainable weight `layer.alpha`, one entry per structure,
shape given by `tf_psp.structures.alpha_shape`) is broadcast onto the kernel.
Structures with `|alpha| < epsilon` are exactly zero in the forward pass. With
`straight_through=True` (default) the threshold passes gradients unchanged, so
a pruned structure keeps receiving `sum(dE/dw * v)` and can come back.

With `alpha == 1` every layer computes exactly what its Keras parent computes.
"""

import keras
import numpy as np
from keras import ops

from tf_psp import compat, structures
from tf_psp import regularizers as psp_regularizers

DEFAULT_EPSILON = 1e-2
_DEFAULT = object()  # sentinel: "use the paper's default regularizer"
PSP_CONFIG_KEYS = (
    "structure",
    "epsilon",
    "alpha_initializer",
    "alpha_regularizer",
    "alpha_constraint",
    "straight_through",
)


def threshold(alpha, epsilon, straight_through=True):
    """`alpha` with `|alpha| < epsilon` set to exactly zero (a tensor).

    With `straight_through`, the gradient passes the threshold unchanged, so
    a pruned structure keeps its gradient and can come back.
    """
    alpha = ops.convert_to_tensor(alpha)
    kept = ops.where(ops.abs(alpha) >= epsilon, alpha, ops.zeros_like(alpha))
    if straight_through:
        # alpha + (kept - alpha) is exactly `kept` in value, identity in gradient.
        return alpha + ops.stop_gradient(kept - alpha)
    return kept


def validate_epsilon(epsilon, name):
    """Returns `epsilon` as a float, or raises a ValueError naming the layer."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        value = None
    if isinstance(epsilon, bool) or value is None or not value > 0 or not np.isfinite(value):
        raise ValueError(
            f"layer '{name}': epsilon must be a positive finite "
            f"threshold, got {epsilon!r}."
        )
    return value


class PSPMixin:
    """The alpha machinery shared by all PSP layers.

    Subclasses name the kernel alpha scales (`_alpha_kernel_name`) and whether
    it is depthwise; the mixin owns alpha, its threshold and serialization.
    """

    _alpha_kernel_name = "kernel"
    _alpha_depthwise = False
    _alpha_transposed = False  # kernel [*spatial, out, in] (Conv*DTranspose)

    def __init__(
        self,
        *args,
        structure="channel",
        epsilon=DEFAULT_EPSILON,
        alpha_initializer="ones",
        alpha_regularizer=_DEFAULT,
        alpha_constraint=None,
        straight_through=True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.structure = structures.validate_structure(structure, self.name)
        self.epsilon = validate_epsilon(epsilon, self.name)
        self.alpha_initializer = keras.initializers.get(alpha_initializer)
        if alpha_regularizer is _DEFAULT:
            alpha_regularizer = psp_regularizers.default_alpha_regularizer()
        self.alpha_regularizer = keras.regularizers.get(alpha_regularizer)
        self.alpha_constraint = keras.constraints.get(alpha_constraint)
        self.straight_through = bool(straight_through)

    # --- alpha --------------------------------------------------------------
    def _build_alpha(self):
        kernel_shape = tuple(getattr(self, self._alpha_kernel_name).shape)
        if self._alpha_transposed:  # alphas as for the [.., in, out] kernel it transposes
            kernel_shape = kernel_shape[:-2] + (kernel_shape[-1], kernel_shape[-2])
        self._alpha_broadcast = structures.broadcast_shape(
            self.structure, kernel_shape, self._alpha_depthwise
        )
        if self._alpha_transposed and len(self._alpha_broadcast):
            b = self._alpha_broadcast
            self._alpha_broadcast = b[:-2] + (b[-1], b[-2])
        self.alpha = self.add_weight(
            name="alpha",
            shape=structures.alpha_shape(
                self.structure, kernel_shape, self._alpha_depthwise
            ),
            initializer=self.alpha_initializer,
            regularizer=self.alpha_regularizer,
            constraint=self.alpha_constraint,
            trainable=True,
            dtype="float32",
        )

    def _build_alpha_per_unit(self, units):
        """One alpha per head or unit of a twin layer (attention, recurrent), indexed by the
        pruning plan's handles like a kernel's input axis."""
        self._alpha_broadcast = (units, 1)
        self.alpha = self.add_weight(
            name="alpha", shape=(units,), initializer=self.alpha_initializer,
            regularizer=self.alpha_regularizer, constraint=self.alpha_constraint,
            trainable=True, dtype="float32")

    def _plain_variables(self):
        """Every weight but alpha, in the plain twin's order."""
        return [v for v in self.weights if v is not self.alpha]

    def set_plain_weights(self, weights):
        """Sets every weight but alpha from the plain layer's `get_weights()`."""
        variables = self._plain_variables()
        if len(variables) != len(weights):
            raise ValueError(
                f"layer '{self.name}': expected {len(variables)} plain weights, "
                f"got {len(weights)}.")
        for variable, value in zip(variables, weights):
            variable.assign(value)

    def thresholded_alpha(self):
        """Alpha with `|alpha| < epsilon` set to exactly zero (a tensor).

        With `straight_through`, the gradient passes the threshold unchanged.
        """
        return threshold(self.alpha, self.epsilon, self.straight_through)

    def structure_mask(self):
        """Numpy bool array, alpha's shape: True where the structure is alive."""
        return np.abs(keras.ops.convert_to_numpy(self.alpha.value)) >= self.epsilon

    def _scaled(self, tensor):
        """`tensor` (the alpha-scaled kernel) times the broadcast thresholded alpha."""
        alpha = ops.reshape(self.thresholded_alpha(), self._alpha_broadcast)
        return ops.cast(alpha, self.compute_dtype) * ops.cast(tensor, self.compute_dtype)

    def _scaled_bias(self, bias, repeats=1):
        """The bias, scaled when the structure owns it (`filter`, `layer`)."""
        if bias is None:
            return None
        bias = ops.cast(bias, self.compute_dtype)
        if not structures.scales_bias(self.structure):
            return bias
        alpha = ops.cast(self.thresholded_alpha(), self.compute_dtype)
        if repeats > 1 and len(alpha.shape):  # depthwise: channel c owns outputs c*m .. c*m+m-1
            alpha = ops.repeat(alpha, repeats)
        return alpha * bias

    def _add_bias_and_activate(self, outputs, repeats=1):
        """The tail of every PSP conv's call: (scaled) bias, then the activation."""
        if self.use_bias:
            bias = self._scaled_bias(self.bias, repeats=repeats)
            outputs = ops.add(outputs, ops.reshape(bias, _bias_shape(self, bias.shape[0])))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs

    def _folded_bias(self, alpha, repeats=1):
        """`[bias]` with thresholded `alpha` folded in when the structure owns it (or `[]`)."""
        if not self.use_bias:
            return []
        bias = _np(self.bias)
        if structures.scales_bias(self.structure):
            bias = bias * (np.repeat(alpha, repeats) if repeats > 1 and alpha.ndim else alpha)
        return [bias]

    # --- plain-layer view ---------------------------------------------------
    def folded_weights(self):
        """Weights with thresholded alphas folded in, ordered like the plain twin's."""
        raise NotImplementedError

    def plain_config(self):
        """Config of the plain Keras twin (PSP keys removed)."""
        config = self.get_config()
        for key in PSP_CONFIG_KEYS:
            config.pop(key, None)
        return config

    def to_plain(self):
        """A new plain Keras layer computing what this layer computes (alphas folded)."""
        plain = self.plain_class.from_config(self.plain_config())
        plain.build(compat.build_input_shape(self))
        plain.set_weights(self.folded_weights())
        return plain

    # --- serialization ------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "structure": self.structure,
                "epsilon": self.epsilon,
                "alpha_initializer": keras.initializers.serialize(self.alpha_initializer),
                "alpha_regularizer": keras.regularizers.serialize(self.alpha_regularizer),
                "alpha_constraint": keras.constraints.serialize(self.alpha_constraint),
                "straight_through": self.straight_through,
            }
        )
        return config

    # Keras's Conv/Dense store only kernel and bias; restore the generic Layer
    # behaviour so alpha is saved and loaded too.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _bias_shape(layer, channels):
    if layer.data_format == "channels_last":
        return (1,) * (layer.rank + 1) + (channels,)
    return (1, channels) + (1,) * layer.rank


class _PSPConvBase(PSPMixin):
    def build(self, input_shape):
        super().build(input_shape)
        self._build_alpha()

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self._scaled(self.kernel))
        return self._add_bias_and_activate(outputs)

    def folded_weights(self):
        alpha = _np(self.thresholded_alpha())
        weights = [_np(self.kernel) * alpha.reshape(self._alpha_broadcast)]
        return weights + self._folded_bias(alpha)


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPConv1D(_PSPConvBase, keras.layers.Conv1D):
    """`keras.layers.Conv1D` with PSP structure parameters `alpha`.

    Takes Conv1D's arguments plus `structure`, `epsilon`, `alpha_initializer`,
    `alpha_regularizer` (default `tf_psp.regularizers.WeightDecay()`),
    `alpha_constraint` and `straight_through`; see `PSPConv2D`.
    """

    plain_class = keras.layers.Conv1D

    def convolution_op(self, inputs, kernel):
        if self.padding != "causal":
            return super().convolution_op(inputs, kernel)
        # as keras.layers.Conv1D.call: pad dilation * (k - 1) steps on the left
        return ops.conv(
            ops.pad(inputs, self._compute_causal_padding()),
            kernel,
            strides=list(self.strides),
            padding="valid",
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPConv2D(_PSPConvBase, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with PSP structure parameters `alpha`.

    Args:
        filters, kernel_size, ...: exactly as `keras.layers.Conv2D`.
        structure: what one alpha scales: `'channel'` (an input channel, shape
            `(cin,)`, the paper's default), `'filter'` (an output channel and
            its bias, `(cout,)`), `'column'` (one im2col row, `(kh, kw, cin)`)
            or `'layer'` (the whole layer and its bias, scalar).
        epsilon: structures with `|alpha| < epsilon` are pruned (exact zeros).
        alpha_initializer: initializer of alpha (default ones).
        alpha_regularizer: penalty on alpha; default
            `tf_psp.regularizers.WeightDecay()` (paper eq. 6); None for none.
        alpha_constraint: e.g. `tf_psp.regularizers.FixedSparsity(0.5)`.
        straight_through: pass gradients through the threshold so pruned
            structures can revive (default True).
    """

    plain_class = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPConv3D(_PSPConvBase, keras.layers.Conv3D):
    """`keras.layers.Conv3D` with PSP structure parameters `alpha` (see `PSPConv2D`)."""

    plain_class = keras.layers.Conv3D


class _PSPConvTransposeBase(_PSPConvBase):
    """Conv*DTranspose: kernel [*spatial, out, in]; alphas as for a Conv's [.., in, out]."""

    _alpha_transposed = True

    def call(self, inputs):
        outputs = ops.conv_transpose(
            inputs,
            self._scaled(self.kernel),
            strides=list(self.strides),
            padding=self.padding,
            output_padding=self.output_padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._add_bias_and_activate(outputs)


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPConv2DTranspose(_PSPConvTransposeBase, keras.layers.Conv2DTranspose):
    """`keras.layers.Conv2DTranspose` with PSP structure parameters `alpha`.

    The kernel is `[kh, kw, out, in]`; alpha shapes are those of a Conv2D
    reading the same input: `'channel'` -> `(in,)`, `'filter'` -> `(out,)`
    (scales the bias too), `'column'` -> `(kh, kw, in)`, `'layer'` -> `()`.
    Other arguments as in `PSPConv2D`.
    """

    plain_class = keras.layers.Conv2DTranspose


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPDense(PSPMixin, keras.layers.Dense):
    """`keras.layers.Dense` with PSP structure parameters `alpha`.

    Alpha shapes for a kernel `[in, out]`: `'channel'` and `'column'` ->
    `(in,)`, `'filter'` -> `(out,)` (scales the bias too), `'layer'` -> `()`.
    Other arguments as in `PSPConv2D`.
    """

    plain_class = keras.layers.Dense

    def build(self, input_shape):
        super().build(input_shape)
        self._build_alpha()

    def call(self, inputs, training=None):
        x = ops.matmul(inputs, self._scaled(self.kernel))
        if self.bias is not None:
            x = ops.add(x, self._scaled_bias(self.bias))
        if self.activation is not None:
            x = self.activation(x)
        return x

    def folded_weights(self):
        return _PSPConvBase.folded_weights(self)


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPDepthwiseConv2D(PSPMixin, keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` with PSP structure parameters `alpha`.

    The kernel is `[kh, kw, cin, m]`. `'channel'` and `'filter'` -> `(cin,)`:
    one depthwise channel (`'filter'` also scales the `m` biases it owns);
    `'column'` -> `(kh, kw, cin)`; `'layer'` -> `()`.
    """

    plain_class = keras.layers.DepthwiseConv2D
    _alpha_kernel_name = "kernel"
    _alpha_depthwise = True

    def build(self, input_shape):
        super().build(input_shape)
        self._build_alpha()

    def call(self, inputs):
        outputs = ops.depthwise_conv(
            inputs,
            self._scaled(self.kernel),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._add_bias_and_activate(outputs, repeats=self.depth_multiplier)

    def folded_weights(self):
        alpha = _np(self.thresholded_alpha())
        weights = [_np(self.kernel) * alpha.reshape(self._alpha_broadcast)]
        return weights + self._folded_bias(alpha, repeats=self.depth_multiplier)


@keras.saving.register_keras_serializable(package="tf_psp")
class PSPSeparableConv2D(PSPMixin, keras.layers.SeparableConv2D):
    """`keras.layers.SeparableConv2D` with PSP structure parameters `alpha`.

    `'channel'` -> `(cin,)` and `'column'` -> `(kh, kw, cin)` scale the
    depthwise kernel; `'filter'` -> `(filters,)` and `'layer'` -> `()` scale the
    pointwise kernel and the bias.
    """

    plain_class = keras.layers.SeparableConv2D

    def __init__(self, *args, structure="channel", **kwargs):
        super().__init__(*args, structure=structure, **kwargs)
        self._alpha_kernel_name = (
            "depthwise_kernel" if structure in ("channel", "column") else "pointwise_kernel"
        )
        self._alpha_depthwise = structure in ("channel", "column")

    def build(self, input_shape):
        super().build(input_shape)
        self._build_alpha()

    def _kernels(self):
        if self._alpha_kernel_name == "depthwise_kernel":
            return self._scaled(self.depthwise_kernel), self.pointwise_kernel
        return self.depthwise_kernel, self._scaled(self.pointwise_kernel)

    def call(self, inputs):
        depthwise, pointwise = self._kernels()
        outputs = ops.separable_conv(
            inputs,
            ops.cast(depthwise, self.compute_dtype),
            ops.cast(pointwise, self.compute_dtype),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._add_bias_and_activate(outputs)

    def folded_weights(self):
        alpha = _np(self.thresholded_alpha()).reshape(self._alpha_broadcast)
        depthwise, pointwise = _np(self.depthwise_kernel), _np(self.pointwise_kernel)
        if self._alpha_kernel_name == "depthwise_kernel":
            depthwise = depthwise * alpha
        else:
            pointwise = pointwise * alpha
        return [depthwise, pointwise] + self._folded_bias(_np(self.thresholded_alpha()))


PSP_LAYERS = (
    PSPConv1D,
    PSPConv2D,
    PSPConv3D,
    PSPConv2DTranspose,
    PSPDense,
    PSPDepthwiseConv2D,
    PSPSeparableConv2D,
)

# Plain Keras class -> its PSP twin. Exact class match: subclasses of these
# (e.g. custom layers) are not converted silently.
PSP_TWINS = {cls.plain_class: cls for cls in PSP_LAYERS}


def is_psp_layer(layer):
    """True for every tf_psp layer."""
    return isinstance(layer, PSPMixin)
