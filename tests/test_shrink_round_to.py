"""strip_and_shrink(round_to=N): widths rounded up by re-admitting pruned channels."""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp.shrink import strip_and_shrink

from conftest import randomize_biases_and_batchnorm

L = keras.layers


def _model():
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        tf_psp.PSPConv2D(10, 3, padding="same", structure="filter", name="c1"),
        L.BatchNormalization(name="bn1"),
        L.ReLU(name="r1"),
        tf_psp.PSPConv2D(7, 1, structure="channel", name="c2"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(2, name="head"),
    ])
    randomize_biases_and_batchnorm(model)
    # c1 filters 1..6 pruned with distinct |alpha| below epsilon (0.01):
    # the largest ones come back first when rounding.
    model.get_layer("c1").alpha.assign(
        [1.0, 0.001, 0.009, 0.002, 0.008, 0.003, 0.004, 1.0, 1.0, 1.0])
    model.get_layer("c2").alpha.assign(np.ones(10))
    return model


@pytest.mark.parametrize("round_to,expected,readmitted", [
    (1, [0, 7, 8, 9], []),
    (3, [0, 2, 4, 7, 8, 9], [2, 4]),
    (4, [0, 7, 8, 9], []),  # already a multiple
    (5, [0, 2, 7, 8, 9], [2]),
    (16, list(range(10)), list(range(1, 7))),  # capped at the original width
])
def test_round_to(round_to, expected, readmitted):
    model = _model()
    before = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    shrunk, report = strip_and_shrink(model, round_to=round_to, return_report=True)
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    out = keras.ops.convert_to_numpy(shrunk(x, training=False))
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    assert shrunk.get_layer("c1").filters == len(expected)
    # which channels came back: BatchNormalization's gamma is sliced with them
    gamma = model.get_layer("bn1").gamma.numpy()
    np.testing.assert_array_equal(
        np.sort(shrunk.get_layer("bn1").gamma.numpy()), np.sort(gamma[expected]))
    assert report.to_dict()["readmitted"] == len(readmitted)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_round_to_rejects_zero():
    with pytest.raises(ValueError, match="round_to"):
        strip_and_shrink(_model(), round_to=0)


def test_every_space_keeps_a_channel():
    model = _model()
    model.get_layer("c1").alpha.assign(np.zeros(10))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    shrunk = strip_and_shrink(model)
    assert shrunk.get_layer("c1").filters == 1
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    out = keras.ops.convert_to_numpy(shrunk(x, training=False))
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
