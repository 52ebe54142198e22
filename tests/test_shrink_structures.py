"""strip_and_shrink with 'column' and 'layer' structures."""

import keras
import numpy as np

import tf_psp
from shrink_helpers import _check, _randomize

L = keras.layers


def test_column_structure():
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        L.Conv2D(5, 3, padding="same", name="c1"),
        L.ReLU(name="r1"),
        tf_psp.PSPConv2D(4, 3, padding="same", structure="column", name="c2"),
        L.GlobalAveragePooling2D(name="gap"),
        tf_psp.PSPDense(2, structure="column", name="head"),
    ])
    _randomize(model)
    alpha = np.ones((3, 3, 5))
    alpha[:, :, 1] = 0.0  # every column of input channel 1: removable
    alpha[0, :, 3] = 0.0  # some columns of input channel 3: kept
    alpha[1, 1, 4] = 0.005
    model.get_layer("c2").alpha.assign(alpha)
    model.get_layer("head").alpha.assign([1.0, 0.0, 1.0, 1.0])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    _check(model, x, {"c1": 4, "r1": 4, "c2": 3, "gap": 3, "head": 2})


def test_layer_structure_in_residual_branch():
    inputs = keras.Input((6, 6, 3))
    h = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    b = tf_psp.PSPConv2D(6, 3, padding="same", structure="layer", name="ba")(h)
    b = L.BatchNormalization(name="ba_bn")(b)
    b = L.ReLU(name="ba_relu")(b)
    b = tf_psp.PSPConv2D(4, 1, structure="layer", name="bb")(b)
    h = L.Add(name="add")([h, b])
    h = L.GlobalAveragePooling2D(name="gap")(h)
    outputs = L.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    _randomize(model)
    model.get_layer("ba").alpha.assign(0.0)  # the branch's first conv is pruned
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    # ba's outputs are constants the 1x1 bb folds into its bias; one channel
    # stays so that the branch keeps a tensor to compute on.
    _check(model, x, {"stem": 4, "ba": 1, "ba_bn": 1, "bb": 4, "add": 4})
