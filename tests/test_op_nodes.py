"""keras.ops calls in a functional model (`h + 3.0`, `keras.ops.relu(h)`, `a * b`).

Oracle: the PSP model itself (inference mode); widths counted by hand.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import coupling

from conftest import _shrink_and_compare as _check
from conftest import randomize_biases_and_batchnorm as _randomize
from conftest import randomize_weights
from conftest import set_alpha as _set_alpha

L = keras.layers


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(2,) + shape).astype("float32")


def _rel_error(a, b, x):
    ref = keras.ops.convert_to_numpy(a(x, training=False))
    out = keras.ops.convert_to_numpy(b(x, training=False))
    assert out.shape == ref.shape
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("coupling_", ["layer", "group"])
def test_parameterize_keeps_op_nodes(coupling_):
    # issue 13's repro: AttributeError: 'Add' object has no attribute 'weights'
    i = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3)(i)
    model = keras.Model(i, L.Conv2D(2, 1)(h + 3.0))
    randomize_weights(model)
    psp = tf_psp.parameterize(model, coupling=coupling_)
    assert _rel_error(model, psp, _x((8, 8, 3))) <= 1e-6


def _hard_swish_model():
    inputs = keras.Input((6, 6, 3))
    h = tf_psp.PSPConv2D(6, 3, padding="same", structure="filter", name="c1")(inputs)
    h = keras.ops.multiply(h, L.ReLU(6.0, name="r6")(h + 3.0) * (1.0 / 6.0))  # hard-swish
    h = keras.ops.hard_sigmoid(h) - 0.25
    h = tf_psp.PSPConv2D(5, 1, structure="channel", name="c2")(h)
    h = keras.ops.relu(h)
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inputs, outputs)
    _randomize(model)
    return model


def test_elementwise_ops_pass_channels_through_and_fold_constants():
    model = _hard_swish_model()
    _set_alpha(model.get_layer("c1"), [1, 0, 1, 1, 0, 1])  # dead filters: constant bias channels
    _set_alpha(model.get_layer("c2"), [1, 1, 0, 1, 1, 1])  # c2 ignores channel 2
    # channels 1, 4 are constants through relu6/add/mul/hard_sigmoid/sub, folded into c2's
    # 1x1 kernel; channel 2 is ignored: 3 of 6 kept
    _check(model, _x((6, 6, 3)), {"c1": 3, "r6": 3, "c2": 5})


def test_op_between_two_tensors_couples_them():
    inputs = keras.Input((6, 6, 3))
    a = tf_psp.PSPConv2D(4, 1, structure="filter", name="a")(inputs)
    b = tf_psp.PSPConv2D(4, 1, structure="filter", name="b")(inputs)
    h = keras.ops.maximum(a * b, a - b)
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inputs, outputs)
    _randomize(model)
    _set_alpha(model.get_layer("a"), [0, 1, 0, 1])
    _set_alpha(model.get_layer("b"), [0, 1, 1, 1])
    # only channel 0 is dead in both: a*b = 0*0 and a-b = bias_a - bias_b are constants
    _check(model, _x((6, 6, 3)), {"a": 3, "b": 3, "gap": 3})


@pytest.mark.parametrize("op", ["pad", "split", "reshape", "softmax"])
def test_channel_mixing_ops_freeze_with_reason(op):
    inputs = keras.Input((6, 6, 3))
    h = tf_psp.PSPConv2D(4, 1, structure="filter", name="c1")(inputs)
    if op == "pad":
        h = keras.ops.pad(h, [[0, 0], [1, 1], [1, 1], [0, 0]])
    elif op == "split":
        h = keras.ops.concatenate(keras.ops.split(h, 2, axis=-1)[::-1], axis=-1)
    elif op == "reshape":
        h = keras.ops.reshape(h, (-1, 3, 12, 4))
    else:
        h = keras.ops.softmax(h, axis=-1)
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inputs, outputs)
    _randomize(model)
    _set_alpha(model.get_layer("c1"), [0, 1, 1, 1])
    _, report = _check(model, _x((6, 6, 3)), {"c1": 4})
    assert "keras.ops call" in str(report), str(report)


def test_op_with_per_channel_constant_freezes():
    inputs = keras.Input((6, 6, 3))
    h = tf_psp.PSPConv2D(4, 1, structure="filter", name="c1")(inputs)
    h = h * np.arange(1, 5, dtype="float32")
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inputs, outputs)
    _randomize(model)
    _set_alpha(model.get_layer("c1"), [0, 1, 1, 1])
    _, report = _check(model, _x((6, 6, 3)), {"c1": 4})
    assert "constant operand that is not a scalar" in str(report)


def _prune_random_half(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        variables = ([layer.alpha] if tf_psp.is_psp_layer(layer)
                     else layer.group_alphas if coupling.is_group_alphas(layer) else [])
        for v in variables:
            shape = tuple(v.shape)
            alive = rng.random(shape) >= 0.5
            v.assign(np.where(alive, 1.0 + 0.1 * rng.random(shape), 0.0).astype("float32"))


def _shrinks_exactly(model, coupling_, shape):
    psp = tf_psp.parameterize(model, coupling=coupling_)
    _prune_random_half(psp)
    shrunk = tf_psp.strip_and_shrink(psp)
    assert _rel_error(psp, shrunk, _x(shape, 1)) <= 1e-5
    before, after = tf_psp.profile(model).total_macs, tf_psp.profile(shrunk).total_macs
    return before / after


@pytest.mark.parametrize("coupling_", ["layer", "group"])
def test_mobilenet_v3_small_shrinks_exactly(coupling_):
    model = keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), weights=None, minimalistic=False, classes=10,
        classifier_activation=None)
    randomize_weights(model)
    assert _shrinks_exactly(model, coupling_, (64, 64, 3)) > 2.0


def test_mobilenet_v3_group_alphas_cover_se_blocks():
    model = keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), weights=None, minimalistic=False, classes=10,
        classifier_activation=None)
    plan = coupling.plan_groups(model)
    # hard-sigmoid / hard-swish op nodes once froze every SE block and residual stream
    assert plan.frozen == ["model input", "model output"]
    assert "expanded_conv_squeeze_excite_conv_1" in plan.readers


@pytest.mark.parametrize("coupling_", ["layer", "group"])
def test_convnext_pattern_shrinks_exactly(coupling_):
    from keras.src.applications.convnext import ConvNeXt

    model = ConvNeXt(depths=[1, 1, 1, 1], projection_dims=[8, 16, 32, 64],
                     input_shape=(32, 32, 3), weights=None, classes=10,
                     classifier_activation=None, layer_scale_init_value=0.5)
    randomize_weights(model)
    # the 4x Dense expansions shrink; LayerNormalization keeps the residual streams
    assert _shrinks_exactly(model, coupling_, (32, 32, 3)) > 1.2


def test_registry_finds_keras_op_classes():
    # keras.ops classes have no public path: fail loudly when Keras moves them
    from tf_psp import graph

    h = keras.Input((4, 4, 3))
    for t in (h + 3.0, h * (1 / 6), h - h, keras.ops.relu(h), keras.ops.relu6(h),
              keras.ops.hard_sigmoid(h), keras.ops.hard_swish(h), keras.ops.sigmoid(h),
              keras.ops.tanh(h), keras.ops.silu(h), keras.ops.divide(h, 2.0)):
        op = t._keras_history.operation
        assert type(op) in graph.REGISTRY, type(op)


@pytest.mark.parametrize("axis, reason", [
    (-1, "normalizes across channels (removing one changes the others)"),
    (1, "normalizes over axes [1], which is not understood"),
])
def test_layer_normalization_freezes_with_reason(axis, reason):
    inputs = keras.Input((6, 6, 3))
    h = tf_psp.PSPConv2D(4, 1, structure="filter", name="c1")(inputs)
    h = L.LayerNormalization(axis=axis, name="ln")(h)
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inputs, outputs)
    _randomize(model)
    _set_alpha(model.get_layer("c1"), [0, 1, 1, 1])
    _, report = _check(model, _x((6, 6, 3)), {"c1": 4})
    assert f"layer 'ln' (LayerNormalization) {reason}" in str(report)
