"""PSP layers against independent oracles: plain Keras layers with hand-scaled kernels.

Runs on the TensorFlow and the JAX backend (.ci/run runs it under both).
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import structures

STRUCTURES = structures.STRUCTURES

# (PSP class, plain class, constructor kwargs, input shape, reduce-axes per structure
#  giving the kernel axes one alpha covers; None = all axes)
CASES = {
    "conv2d": (tf_psp.PSPConv2D, keras.layers.Conv2D,
               dict(filters=4, kernel_size=3, padding="same"), (2, 6, 6, 3)),
    "conv2d_strided": (tf_psp.PSPConv2D, keras.layers.Conv2D,
                       dict(filters=5, kernel_size=(3, 1), strides=2), (2, 7, 7, 3)),
    "conv1d": (tf_psp.PSPConv1D, keras.layers.Conv1D,
               dict(filters=4, kernel_size=3), (2, 9, 3)),
    "dense": (tf_psp.PSPDense, keras.layers.Dense, dict(units=5), (2, 7)),
    "dense_4d": (tf_psp.PSPDense, keras.layers.Dense, dict(units=5), (2, 3, 3, 6)),
    "depthwise": (tf_psp.PSPDepthwiseConv2D, keras.layers.DepthwiseConv2D,
                  dict(kernel_size=3, depth_multiplier=2, padding="same"), (2, 6, 6, 3)),
    "separable": (tf_psp.PSPSeparableConv2D, keras.layers.SeparableConv2D,
                  dict(filters=4, kernel_size=3, depth_multiplier=2), (2, 6, 6, 3)),
}


def _kernel_names(layer):
    if isinstance(layer, keras.layers.SeparableConv2D):
        return ["depthwise_kernel", "pointwise_kernel"]
    return ["kernel"]


def _make(case, structure, seed=0, **kwargs):
    psp_cls, plain_cls, config, shape = CASES[case]
    rng = np.random.default_rng(seed)
    layer = psp_cls(**config, structure=structure, bias_initializer="random_normal", **kwargs)
    x = rng.normal(size=shape).astype("float32")
    layer(x)
    alpha = rng.uniform(0.5, 1.5, size=layer.alpha.shape).astype("float32")
    alpha *= rng.choice([-1.0, 1.0], size=alpha.shape).astype("float32")
    layer.alpha.assign(alpha)
    return layer, plain_cls, x, rng


def _hand_scaled(layer, plain_cls, alpha):
    """A plain Keras layer whose kernel(s)/bias are scaled by hand with numpy."""
    plain = plain_cls.from_config(layer.plain_config())
    weights = {v.path.split("/")[-1]: np.array(v.numpy() if hasattr(v, "numpy") else v)
               for v in layer.weights}
    kernel_name = _scaled_kernel_name(layer)
    kernel = weights[kernel_name]
    if layer.structure == "channel" or (
            layer.structure == "filter" and kernel_name != "pointwise_kernel"
            and isinstance(layer, keras.layers.DepthwiseConv2D)):
        scale = alpha.reshape((1,) * (kernel.ndim - 2) + (-1, 1))
    elif layer.structure == "filter":
        scale = alpha.reshape((1,) * (kernel.ndim - 1) + (-1,))
    elif layer.structure == "column":
        scale = alpha.reshape(kernel.shape[:-1] + (1,))
    else:
        scale = alpha
    weights[kernel_name] = kernel * scale
    if "bias" in weights and layer.structure in ("filter", "layer"):
        bias_scale = alpha
        if isinstance(layer, keras.layers.DepthwiseConv2D) and alpha.ndim:
            bias_scale = np.repeat(alpha, layer.depth_multiplier)
        weights["bias"] = weights["bias"] * bias_scale
    ordered = [weights[name] for name in _kernel_names(layer)]
    if "bias" in weights:
        ordered.append(weights["bias"])
    plain.build(layer._build_shapes_dict["input_shape"])
    plain.set_weights(ordered)
    return plain


def _scaled_kernel_name(layer):
    if isinstance(layer, keras.layers.SeparableConv2D):
        if layer.structure in ("channel", "column"):
            return "depthwise_kernel"
        return "pointwise_kernel"
    return "kernel"


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_equals_hand_scaled_kernel(case, structure):
    layer, plain_cls, x, _ = _make(case, structure)
    alpha = np.array(layer.alpha.numpy() if hasattr(layer.alpha, "numpy") else layer.alpha)
    expected = keras.ops.convert_to_numpy(_hand_scaled(layer, plain_cls, alpha)(x))
    got = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_alpha_one_equals_plain_layer(case, structure):
    layer, plain_cls, x, _ = _make(case, structure)
    layer.alpha.assign(np.ones(layer.alpha.shape, "float32"))
    plain = plain_cls.from_config(layer.plain_config())
    plain.build(x.shape)
    plain.set_weights(layer.get_weights()[:-1])  # alpha is the last weight
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(plain(x)),
        rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", ["conv2d", "dense", "depthwise", "separable"])
def test_threshold_zeroes_structures_exactly(case, structure):
    layer, plain_cls, x, rng = _make(case, structure)
    alpha = np.array(keras.ops.convert_to_numpy(layer.alpha))
    if alpha.ndim:
        dead = rng.random(alpha.shape) < 0.5
        dead.flat[0] = True
        alpha[dead] = layer.epsilon / 2 * np.sign(alpha[dead])
    else:
        alpha = np.array(layer.epsilon / 2, "float32")
    layer.alpha.assign(alpha)
    thresholded = np.where(np.abs(alpha) >= layer.epsilon, alpha, 0.0).astype("float32")
    expected = keras.ops.convert_to_numpy(_hand_scaled(layer, plain_cls, thresholded)(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(layer.structure_mask(), np.abs(alpha) >= layer.epsilon)


def _loss_and_grads(layer, x, target):
    """Loss sum((layer(x) - target)**2) and its gradients w.r.t. all trainable weights."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x) - target))
        grads = tape.gradient(loss, layer.trainable_variables)
        return [np.array(g) for g in grads]
    if backend == "jax":
        import jax

        def loss_fn(trainable):
            non_trainable = [v.value for v in layer.non_trainable_variables]
            y, _ = layer.stateless_call(trainable, non_trainable, x)
            return jax.numpy.sum((y - target) ** 2)

        grads = jax.grad(loss_fn)([v.value for v in layer.trainable_variables])
        return [np.array(g) for g in grads]
    pytest.skip(f"no gradient helper for backend {backend}")


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", ["conv2d", "dense", "depthwise", "separable"])
def test_alpha_gradient_is_sum_of_dE_dw_times_v(case, structure):
    layer, plain_cls, x, rng = _make(case, structure)
    target = rng.normal(size=keras.ops.convert_to_numpy(layer(x)).shape).astype("float32")
    alpha = np.array(keras.ops.convert_to_numpy(layer.alpha))
    grads = _loss_and_grads(layer, x, target)
    names = [v.path.split("/")[-1] for v in layer.trainable_variables]
    grad_alpha = grads[names.index("alpha")]

    # Oracle: the gradient w.r.t. the *effective* weights of a plain layer.
    plain = _hand_scaled(layer, plain_cls, alpha)
    plain_grads = _loss_and_grads(plain, x, target)
    plain_names = [v.path.split("/")[-1] for v in plain.trainable_variables]
    kernel_name = _scaled_kernel_name(layer)
    v = keras.ops.convert_to_numpy(getattr(layer, kernel_name))
    contribution = plain_grads[plain_names.index(kernel_name)] * v
    bcast = structures.broadcast_shape(
        structure, v.shape, depthwise=kernel_name != "pointwise_kernel"
        and (isinstance(layer, keras.layers.DepthwiseConv2D) or kernel_name == "depthwise_kernel"))
    axes = tuple(i for i in range(v.ndim) if not bcast or bcast[i] == 1)
    expected = contribution.sum(axis=axes).reshape(alpha.shape)
    if structure in ("filter", "layer") and layer.use_bias:
        bias_term = plain_grads[plain_names.index("bias")] * keras.ops.convert_to_numpy(layer.bias)
        if isinstance(layer, keras.layers.DepthwiseConv2D) and alpha.ndim:
            bias_term = bias_term.reshape(-1, layer.depth_multiplier).sum(axis=1)
        elif not alpha.ndim:
            bias_term = bias_term.sum()
        expected = expected + bias_term
    np.testing.assert_allclose(grad_alpha, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("straight_through", [True, False])
def test_pruned_structure_gets_gradient_only_with_straight_through(straight_through):
    layer, _, x, rng = _make("dense", "channel", straight_through=straight_through)
    alpha = np.array(keras.ops.convert_to_numpy(layer.alpha))
    alpha[0] = 0.0
    layer.alpha.assign(alpha)
    target = rng.normal(size=(2, 5)).astype("float32")
    names = [v.path.split("/")[-1] for v in layer.trainable_variables]
    grad_alpha = _loss_and_grads(layer, x, target)[names.index("alpha")]
    assert (grad_alpha[0] != 0) == straight_through


def test_pruned_structure_revives_under_straight_through():
    """Input 0 is the only useful input; its alpha starts pruned and must come back."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = 3.0 * x[:, :1]
    inputs = keras.Input((4,))
    layer = tf_psp.PSPDense(1, use_bias=False, alpha_regularizer=None,
                            kernel_initializer="ones", name="d")
    model = keras.Model(inputs, layer(inputs))
    layer.alpha.assign(np.array([0.0, 1.0, 1.0, 1.0], "float32"))
    assert not layer.structure_mask()[0]
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=False)
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    assert layer.structure_mask()[0], keras.ops.convert_to_numpy(layer.alpha)


def test_sequential_add_and_alpha_is_trainable_weight():
    model = keras.Sequential([keras.Input((8, 8, 3)), tf_psp.PSPConv2D(6, 3, name="c"),
                              keras.layers.GlobalAveragePooling2D(),
                              tf_psp.PSPDense(2, structure="filter")])
    conv = model.get_layer("c")
    assert conv.alpha.shape == (3,)
    assert any(v is conv.alpha for v in model.trainable_weights)
    assert len(model.losses) == 2  # default weight decay on both alphas


@pytest.mark.parametrize("kwargs, message", [
    (dict(structure="row"), "unknown PSP structure 'row'"),
    (dict(epsilon=0.0), "epsilon must be a positive"),
    (dict(epsilon=-1.0), "epsilon must be a positive"),
])
def test_bad_arguments_name_the_layer(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        tf_psp.PSPConv2D(4, 3, name="my_conv", **kwargs)
    if "structure" in kwargs:
        assert "my_conv" in str(info.value)
