"""strip_and_shrink through DepthwiseConv2D (depth multiplier) and SeparableConv2D."""

import keras
import numpy as np

import tf_psp

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def _dead(n, dead):
    return [0 if i in dead else 1 for i in range(n)]


def test_depthwise_multiplier(check_shrink):
    x = inputs = keras.Input((8, 8, 3))
    x = tf_psp.PSPConv2D(6, 3, padding="same", structure="filter", name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = tf_psp.PSPDepthwiseConv2D(3, padding="same", depth_multiplier=2,
                                  structure="channel", name="dw")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="r2")(x)
    x = tf_psp.PSPConv2D(5, 1, structure="channel", name="pw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    bn1 = model.get_layer("bn1")
    gamma, beta, mean, var = bn1.get_weights()
    beta[:], mean[:] = 1.0, 0.0  # a dead c1 filter is a nonzero constant
    bn1.set_weights([gamma, beta, mean, var])
    set_alpha(model.get_layer("c1"), _dead(6, {0, 2}))
    set_alpha(model.get_layer("dw"), _dead(6, {1, 4}))
    set_alpha(model.get_layer("pw"), _dead(12, {0, 1, 4, 6, 10}))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    # channel c goes when dw is dead at c (its outputs are constants folded by
    # the 1x1 pw) or pw ignores both 2c and 2c+1: {1, 4} | {0}. c1's dead
    # filter 2 is a constant the 3x3 depthwise kernel cannot carry: kept.
    expected = {"c1": 3, "bn1": 3, "dw": 6, "bn2": 6, "pw": 5}
    check_shrink(model, x, expected)


def test_separable(check_shrink):
    x = inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = tf_psp.PSPSeparableConv2D(8, 3, padding="same", depth_multiplier=2,
                                  structure="channel", name="sep")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="r2")(x)
    x = tf_psp.PSPConv2D(4, 1, structure="channel", name="pw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model, seed=5)
    set_alpha(model.get_layer("sep"), _dead(6, {2, 3, 5}))
    set_alpha(model.get_layer("pw"), _dead(8, {0, 7}))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    expected = {"c1": 3, "bn1": 3, "sep": 6, "bn2": 6, "pw": 4}
    shrunk, _ = check_shrink(model, x, expected)
    assert shrunk.get_layer("sep").depthwise_kernel.shape == (3, 3, 3, 2)
