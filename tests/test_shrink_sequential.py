"""strip / strip_and_shrink on Sequential and functional chains."""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp.shrink import strip

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def _chain(sequential):
    layers = [
        tf_psp.PSPConv2D(8, 3, padding="same", structure="filter", name="c1"),
        L.BatchNormalization(name="bn1"),
        L.ReLU(name="r1"),
        tf_psp.PSPConv2D(6, 3, padding="same", structure="channel", name="c2"),
        L.BatchNormalization(name="bn2"),
        L.Activation("relu", name="a2"),
        L.MaxPooling2D(2, name="pool"),
        L.ZeroPadding2D(1, name="pad"),
        L.AveragePooling2D(2, padding="same", name="avg"),
        tf_psp.PSPConv2D(5, 1, structure="filter", name="c3"),
        L.BatchNormalization(name="bn3"),
        L.ReLU(name="r3"),
        L.Dropout(0.5, name="drop"),
        L.GlobalAveragePooling2D(name="gap"),
        tf_psp.PSPDense(4, structure="channel", name="d1"),
        L.Dense(3, name="d2"),
    ]
    if sequential:
        model = keras.Sequential([keras.Input((8, 8, 3))] + layers)
    else:
        x = inputs = keras.Input((8, 8, 3))
        for layer in layers:
            x = layer(x)
        model = keras.Model(inputs, x)
    randomize_biases_and_batchnorm(model)
    # bn1: channel 1 maps the pruned constant 0 to a negative value (ReLU -> 0);
    # channel 6 to a positive one that a 3x3 'same' conv cannot absorb.
    bn1 = model.get_layer("bn1")
    gamma, beta, mean, var = bn1.get_weights()
    beta[1], mean[1] = -3.0, 0.0
    beta[6], mean[6] = 2.0, 0.0
    bn1.set_weights([gamma, beta, mean, var])
    set_alpha(model.get_layer("c1"), [1, 0, 1, 0, 1, 1, 0, 1])
    set_alpha(model.get_layer("c2"), [1, 1, 0, 0, 1, 1, 1, 0])
    set_alpha(model.get_layer("c3"), [1, 0, 1, 1, 0])
    set_alpha(model.get_layer("d1"), [1, 1, 0, 1, 1])
    return model


@pytest.mark.parametrize("sequential", [True, False])
def test_chain_shrinks_exactly(check_shrink, sequential):
    model = _chain(sequential)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    # c1 keeps {0, 4, 5, 6}: 2, 7 unread by c2; 3 pruned and unread; 1 is relu(bn(0)) = 0;
    # 6 is a nonzero constant before a 3x3 'same' conv.
    # c2 keeps all 6 (c3 is filter-pruned, reads every input).
    # c3 keeps {0, 3}: 2 is unread by d1; 1, 4 are constants folded into d1's bias.
    expected = {"c1": 4, "bn1": 4, "r1": 4, "c2": 6, "c3": 2, "gap": 2, "d1": 4, "d2": 3}
    shrunk, report = check_shrink(model, x, expected)
    assert "c2" in str(report)


def test_strip_keeps_widths_and_values():
    model = _chain(False)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    plain = strip(model)
    assert [type(layer).__name__ for layer in plain.layers][1] == "Conv2D"
    assert plain.get_layer("c1").filters == 8
    np.testing.assert_allclose(plain(x, training=False), model(x, training=False), atol=1e-5)
    assert model.get_layer("c1") is not plain.get_layer("c1")


@pytest.mark.parametrize("kernel_size,padding,absorbed", [
    (3, "valid", True),  # every window sees the constant: folded
    (1, "same", True),  # a 1x1 'same' conv pads nothing
    (3, "same", False),  # border windows see zero padding: kept
])
def test_constant_folding_into_conv(check_shrink, kernel_size, padding, absorbed):
    model = keras.Sequential([
        keras.Input((7, 7, 2)),
        tf_psp.PSPConv2D(4, 3, padding="same", structure="filter", name="c1"),
        L.BatchNormalization(name="bn"),
        L.Conv2D(3, kernel_size, strides=2, padding=padding, dilation_rate=1, name="c2"),
        L.GlobalMaxPooling2D(name="gmp"),
    ])
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("c1"), [1, 0, 1, 0])
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 2)).astype("float32")
    check_shrink(model, x, {"c1": 2 if absorbed else 4, "c2": 3})
