"""strip_and_shrink(approximate=True): constants folded as if there were no padding."""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp.shrink import strip_and_shrink

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def _padded_reader(shape=(8, 8, 3)):
    """c1's pruned filter 2 is a nonzero constant (BatchNorm shift) read by a 3x3 'same' conv."""
    inputs = keras.Input(shape)
    x = tf_psp.PSPConv2D(6, 3, padding="same", structure="filter", name="c1")(inputs)
    x = L.BatchNormalization(name="c1_bn")(x)
    x = L.Conv2D(4, 3, padding="same", name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("c1"), [1, 1, 0, 1, 1, 1])
    return model


def test_exact_mode_keeps_constant_read_with_padding(check_shrink):
    model = _padded_reader()
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    _, report = check_shrink(model, x, {"c1": 6, "c2": 4})
    assert any(row["layer"] == "c2" and "cannot fold" in row["reason"] for row in report.blocked)
    assert report.approximation_error is None and "approximate" not in str(report)


def test_approximate_mode_removes_it_and_reports_the_deviation():
    model = _padded_reader()
    shrunk, report = strip_and_shrink(model, return_report=True, approximate=True)
    widths = {row["name"]: row["channels_after"] for row in report.layers}
    assert widths["c1"] == 5 and widths["c1_bn"] == 5 and widths["c2"] == 4
    # The documented probe: rng(0).normal, batch 4, the model's input shape.
    probe = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    ref = keras.ops.convert_to_numpy(model(probe, training=False))
    out = keras.ops.convert_to_numpy(shrunk(probe, training=False))
    expected = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert expected > 0
    assert report.approximation_error == pytest.approx(expected, rel=1e-6)
    assert report.to_dict()["approximation_error"] == report.approximation_error
    assert "approximate folding: max deviation" in str(report)


def test_approximate_mode_skips_measurement_on_unknown_shapes():
    model = _padded_reader(shape=(None, None, 3))
    shrunk, report = strip_and_shrink(model, return_report=True, approximate=True)
    assert shrunk.get_layer("c1").filters == 5
    assert report.approximation_error is None
    assert "deviation not measured" in report.approximation_note
    assert "deviation not measured" in str(report)
