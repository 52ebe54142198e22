"""Grouped convolutions: depthwise-like ones (groups == input channels) shrink, others freeze."""

import keras
import numpy as np
from shrink_helpers import _check, _randomize, _set_alpha

import tf_psp

L = keras.layers


def _model(groups, filters):
    inputs = keras.Input((6, 6, 3))
    h = tf_psp.PSPConv2D(8, 1, structure="filter", name="c1")(inputs)
    h = L.ReLU(name="r1")(h)
    h = L.Conv2D(filters, 3, padding="same", groups=groups, name="grouped")(h)
    h = L.ReLU(name="r2")(h)
    h = tf_psp.PSPConv2D(4, 1, structure="channel", name="c2")(h)
    model = keras.Model(inputs, h)
    _randomize(model)
    return model


def test_depthwise_like_grouped_conv_shrinks_like_depthwise():
    model = _model(groups=8, filters=16)  # multiplier 2
    _set_alpha(model.get_layer("c1"), [1, 0, 1, 1, 0, 1, 1, 1])
    # c2 ignores both outputs (2j, 2j+1) of input channel 3, and only output 10 of channel 5
    c2 = np.ones(16)
    c2[[6, 7, 10]] = 0
    _set_alpha(model.get_layer("c2"), c2)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    shrunk, _ = _check(model, x, {"c1": 5, "grouped": 10, "c2": 4})
    grouped = shrunk.get_layer("grouped")
    assert grouped.groups == 5 and grouped.filters == 10


def test_general_grouped_conv_freezes_with_reason():
    model = _model(groups=2, filters=6)
    _set_alpha(model.get_layer("c1"), [1, 0, 1, 1, 0, 1, 1, 1])
    _set_alpha(model.get_layer("c2"), [1, 0, 1, 1, 1, 1])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    _, report = _check(model, x, {"c1": 8, "grouped": 6})
    assert "grouped convolution (groups=2)" in str(report)


def test_channel_alpha_of_grouped_psp_conv_zeroes_a_position_in_every_group():
    layer = tf_psp.PSPConv2D(6, 1, groups=2, structure="channel")
    x = np.random.default_rng(0).normal(size=(1, 2, 2, 8)).astype("float32")
    layer(x)
    assert layer.alpha.shape == (4,)  # cin / groups
    layer.alpha.assign(np.array([1, 0, 1, 1], "float32"))
    kernel = tf_psp.strip(keras.Sequential([keras.Input((2, 2, 8)), layer])).layers[0].kernel
    kernel = keras.ops.convert_to_numpy(kernel)
    assert np.all(kernel[:, :, 1, :] == 0)  # input 1 of group 0 and input 5 of group 1
    assert np.all(kernel[:, :, [0, 2, 3], :] != 0)
