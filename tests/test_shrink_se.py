"""strip_and_shrink through squeeze-and-excitation (Multiply with [N,1,1,C])."""

import keras
import numpy as np
import pytest

import tf_psp

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def _dead(n, dead):
    return [0 if i in dead else 1 for i in range(n)]


@pytest.mark.parametrize("reshape", [True, False])
def test_squeeze_excitation(check_shrink, reshape):
    inputs = keras.Input((8, 8, 3))
    f = tf_psp.PSPConv2D(8, 3, padding="same", structure="filter", name="conv")(inputs)
    f = L.BatchNormalization(name="bn")(f)
    f = L.ReLU(name="relu")(f)
    s = L.GlobalAveragePooling2D(keepdims=not reshape, name="squeeze")(f)
    s = tf_psp.PSPDense(3, activation="relu", structure="channel", name="se_reduce")(s)
    s = L.Dense(8, activation="sigmoid", name="se_expand")(s)
    if reshape:
        s = L.Reshape((1, 1, 8), name="se_reshape")(s)
    x = L.Multiply(name="excite")([f, s])
    x = tf_psp.PSPConv2D(4, 1, structure="channel", name="project")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    beta[[1, 2]], mean[[1, 2]] = -5.0, 0.0  # dead filters 1, 2 -> relu(bn(0)) = 0
    beta[[3]], mean[[3]] = 2.0, 0.0  # dead filter 3 -> a nonzero constant
    bn.set_weights([gamma, beta, mean, var])
    set_alpha(model.get_layer("conv"), _dead(8, {1, 2, 3}))
    set_alpha(model.get_layer("se_reduce"), _dead(8, {2, 5, 6}))
    set_alpha(model.get_layer("project"), _dead(8, {3, 6, 7}))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    # channel c goes when se_reduce ignores it or it is constant (folded into
    # se_reduce's bias) AND the product is ignored by project or is 0:
    # 1, 2 (constant 0 everywhere); 3: nonzero constant times a varying scale,
    # project ignores it; 6: ignored by both; 5, 7: read by one of them.
    expected = {"conv": 4, "bn": 4, "squeeze": 4, "se_reduce": 3, "se_expand": 4,
                "excite": 4, "project": 4}
    check_shrink(model, x, expected)
