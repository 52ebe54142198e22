"""strip_and_shrink through Concatenate on the channel axis (offset mapping)."""

import keras
import numpy as np

import tf_psp

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def _dead(n, dead):
    return [0 if i in dead else 1 for i in range(n)]


def test_concat_branches(check_shrink):
    inputs = keras.Input((8, 8, 3))
    a = tf_psp.PSPConv2D(6, 3, padding="same", structure="filter", name="a")(inputs)
    a = L.ReLU(name="a_relu")(a)
    b = tf_psp.PSPConv2D(4, 3, padding="same", structure="filter", name="b")(inputs)
    b = L.BatchNormalization(name="b_bn")(b)
    b = L.ReLU(name="b_relu")(b)
    x = L.Concatenate(name="cat")([a, b])
    x = tf_psp.PSPConv2D(5, 1, structure="channel", name="mix")(x)
    y = L.Concatenate(name="cat2")([x, a])  # `a` is read twice
    y = L.GlobalAveragePooling2D(name="gap")(y)
    outputs = tf_psp.PSPDense(2, structure="channel", name="head")(y)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("a"), _dead(6, {0, 3}))
    set_alpha(model.get_layer("b"), _dead(4, {1}))
    set_alpha(model.get_layer("mix"), _dead(10, {1, 5, 8}))
    set_alpha(model.get_layer("head"), _dead(11, {2, 5 + 1, 5 + 4}))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    # a: dead filters {0, 3} are relu(0) = 0, absorbable anywhere; 1 is
    # ignored by mix and by head (cat2 position 6); 4 is ignored by head only
    # and 5 by mix only: kept. b: dead filter 1 is a constant folded into the
    # 1x1 mix's bias; 2 (cat position 8) is ignored by mix. mix: output 2 is
    # ignored by head.
    expected = {"a": 3, "b": 2, "cat": 5, "mix": 4, "cat2": 7}
    check_shrink(model, x, expected)
