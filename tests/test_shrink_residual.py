"""strip_and_shrink through residual Add (ResNet- and MobileNetV2-style)."""

import keras
import numpy as np
import pytest

import tf_psp

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def _dead(n, dead):
    return [0 if i in dead else 1 for i in range(n)]


def test_resnet_blocks(check_shrink):
    x = inputs = keras.Input((8, 8, 4))
    x = tf_psp.PSPConv2D(8, 3, padding="same", structure="filter", name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    h = L.ReLU(name="stem_relu")(x)
    for i in (1, 2):
        b = tf_psp.PSPConv2D(6, 3, padding="same", structure="channel", name=f"b{i}a")(h)
        b = L.BatchNormalization(name=f"b{i}a_bn")(b)
        b = L.ReLU(name=f"b{i}a_relu")(b)
        b = tf_psp.PSPConv2D(8, 3, padding="same", structure="channel", name=f"b{i}b")(b)
        b = L.BatchNormalization(name=f"b{i}b_bn")(b)
        h = L.Add(name=f"add{i}")([h, b])
        h = L.ReLU(name=f"out{i}")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    h = tf_psp.PSPDense(5, structure="channel", name="fc")(h)
    outputs = L.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("stem"), _dead(8, {2}))
    set_alpha(model.get_layer("b1a"), _dead(8, {1, 3, 6, 7}))
    set_alpha(model.get_layer("b2a"), _dead(8, {1, 3, 6}))
    set_alpha(model.get_layer("fc"), _dead(8, {1, 3, 5, 6}))
    set_alpha(model.get_layer("b1b"), _dead(6, {0, 4}))
    set_alpha(model.get_layer("b2b"), _dead(6, {2}))
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 4)).astype("float32")
    # Main space: removable where b1a, b2a and fc all ignore it: {1, 3, 6}.
    # Inner spaces: removable where the second conv ignores it.
    expected = {"stem": 5, "add1": 5, "add2": 5, "gap": 5, "b1b": 5, "b2b": 5,
                "b1a": 4, "b1a_bn": 4, "b2a": 5, "fc": 5}
    check_shrink(model, x, expected)


def test_mobilenetv2_block(check_shrink):
    x = inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    h = L.ReLU(max_value=6.0, name="stem_relu")(x)
    b = tf_psp.PSPConv2D(12, 1, use_bias=False, structure="channel", name="expand")(h)
    b = L.BatchNormalization(name="expand_bn")(b)
    b = L.ReLU(max_value=6.0, name="expand_relu")(b)
    b = tf_psp.PSPDepthwiseConv2D(3, padding="same", structure="channel", name="dw")(b)
    b = L.BatchNormalization(name="dw_bn")(b)
    b = L.ReLU(max_value=6.0, name="dw_relu")(b)
    b = tf_psp.PSPConv2D(6, 1, use_bias=False, structure="channel", name="project")(b)
    b = L.BatchNormalization(name="project_bn")(b)
    h = L.Add(name="add")([h, b])
    h = L.GlobalAveragePooling2D(name="gap")(h)
    outputs = tf_psp.PSPDense(3, structure="channel", name="fc")(h)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model, seed=3)
    set_alpha(model.get_layer("expand"), _dead(6, {0, 2, 5}))
    set_alpha(model.get_layer("fc"), _dead(6, {0, 1, 5}))
    # dw 'channel' keeps its bias: a dead depthwise channel is a constant that
    # the 1x1 projection folds into a bias (it gets one: use_bias=False here,
    # as in MobileNetV2).
    set_alpha(model.get_layer("dw"), _dead(12, {1, 4, 7}))
    set_alpha(model.get_layer("project"), _dead(12, {4, 8, 9, 10}))
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype("float32")
    expected = {"stem": 4, "add": 4, "expand": 12 - 6, "dw": 6, "dw_bn": 6,
                "project": 4, "fc": 3}
    shrunk, _ = check_shrink(model, x, expected)
    assert shrunk.get_layer("project").use_bias
    assert not shrunk.get_layer("expand").use_bias


@pytest.mark.parametrize("merge", ["Add", "Subtract", "Average", "Maximum", "Minimum", "Multiply"])
def test_merge_layers(check_shrink, merge):
    inputs = keras.Input((6, 6, 3))
    a = tf_psp.PSPConv2D(6, 3, padding="same", structure="filter", name="a")(inputs)
    a = L.BatchNormalization(name="a_bn")(a)
    b = tf_psp.PSPConv2D(6, 3, padding="same", structure="filter", name="b")(inputs)
    b = L.BatchNormalization(name="b_bn")(b)
    x = getattr(L, merge)(name="merge")([a, b])
    x = tf_psp.PSPConv2D(4, 1, structure="channel", name="mix")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("a"), _dead(6, {0, 1}))
    set_alpha(model.get_layer("b"), _dead(6, {1, 2}))
    set_alpha(model.get_layer("mix"), _dead(6, {3}))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    # 1: both inputs constant -> a constant the 1x1 mix folds; 3: ignored by mix.
    check_shrink(model, x, {"a": 4, "b": 4, "merge": 4, "mix": 4})


def test_keras_mobilenetv2_exact(check_shrink):
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4, include_top=True)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c),
                               rng.normal(0, 0.3, c), rng.uniform(0.5, 2.0, c)])
        elif isinstance(layer, L.DepthwiseConv2D):
            kernel = layer.kernel.numpy()
            kernel[..., rng.random(kernel.shape[2]) < 0.4, :] = 0.0
            layer.kernel.assign(kernel)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    # Conv1 feeds only the first depthwise conv: its dead channels are constants
    # the 1x1 projection folds. The 112-wide output space meets the head: kept.
    kernel = model.get_layer("expanded_conv_depthwise").kernel.numpy()
    dead = int(np.sum(~np.any(kernel != 0, axis=(0, 1, 3))))
    shrunk, report = check_shrink(model, x, {"Conv1": 16 - dead, "block_16_project": 112})
    assert shrunk.count_params() < 0.85 * model.count_params()
