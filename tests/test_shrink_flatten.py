"""strip_and_shrink through Flatten after NHWC (channel c at c + k*C)."""

import keras
import numpy as np

import tf_psp

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def test_flatten_dense(check_shrink):
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        tf_psp.PSPConv2D(4, 3, structure="filter", name="conv"),
        L.BatchNormalization(name="bn"),
        L.ReLU(name="relu"),
        L.MaxPooling2D(2, name="pool"),  # 2 x 2 x 4
        L.Flatten(name="flat"),
        tf_psp.PSPDense(5, structure="channel", name="fc"),
        L.Dense(3, name="head"),
    ])
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("conv"), [1, 1, 1, 0])
    fc_alive = np.ones(16)
    fc_alive[[2, 6, 10, 14]] = 0  # every position of channel 2
    fc_alive[[1, 9]] = 0  # half of the positions of channel 1
    set_alpha(model.get_layer("fc"), fc_alive)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype("float32")
    # channel 3 is a constant (dead filter through BN/ReLU/pooling) folded
    # into fc's bias; channel 2 is ignored by fc; channel 1 is still read.
    shrunk, _ = check_shrink(model, x, {"conv": 2, "bn": 2, "flat": 8, "fc": 5})
    assert shrunk.get_layer("fc").kernel.shape == (8, 5)
