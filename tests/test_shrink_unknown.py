"""Layers the channel graph does not understand freeze the channels they touch."""

import keras
import numpy as np

import tf_psp

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def _dead(n, dead):
    return [0 if i in dead else 1 for i in range(n)]


def _model(middle):
    inputs = keras.Input((6, 6, 3))
    x = tf_psp.PSPConv2D(6, 3, padding="same", structure="filter", name="c1")(inputs)
    x = L.ReLU(name="r1")(x)
    x = middle(x)
    x = tf_psp.PSPConv2D(5, 1, structure="channel", name="c2")(x)
    x = L.ReLU(name="r2")(x)
    x = tf_psp.PSPConv2D(4, 1, structure="channel", name="c3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("c1"), _dead(6, {0, 4}))
    set_alpha(model.get_layer("c2"), _dead(6, {1, 4}))
    set_alpha(model.get_layer("c3"), _dead(5, {2, 3}))
    return model


def test_lambda_freezes_its_channels(check_shrink):
    model = _model(L.Lambda(lambda t: 2.0 * t + 1.0, name="lam"))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    # c1's space is frozen by the Lambda; c2's space is not.
    shrunk, report = check_shrink(model, x, {"c1": 6, "lam": 6, "c2": 3, "c3": 4})
    assert shrunk.get_layer("lam") is model.get_layer("lam")  # reused, not round-tripped
    blocked = report.to_dict()["blocked"]
    rows = {row["space"]: row for row in blocked if row["layer"] == "lam"}
    assert all(row["class"] == "Lambda" for row in rows.values()), str(report)
    # c1's dead filters {0, 4} before the Lambda, c2's ignored {1, 4} after it
    assert rows["output of 'c1'"]["channels"] == 2
    assert rows["output of 'lam'"]["channels"] == 2
    assert "layer 'lam' (Lambda) is not understood: keeps 2 channel(s) of output of 'c1'" in str(
        report)


def test_general_reshape_freezes(check_shrink):
    model = _model(L.Reshape((6, 6, 6), name="reshape"))  # not size-1 only: frozen
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    check_shrink(model, x, {"c1": 6, "reshape": 6, "c2": 3})


def test_without_unknown_layer_shrinks(check_shrink):
    model = _model(L.Identity(name="ident"))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    check_shrink(model, x, {"c1": 3, "c2": 3, "c3": 4})


class Scale(L.Layer):
    def call(self, x):
        return x * 3.0


def test_custom_layer_freezes(check_shrink):
    model = _model(Scale(name="custom"))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    _, report = check_shrink(model, x, {"c1": 6, "c2": 3})
    assert "custom" in str(report)


def test_bad_inputs_are_refused_with_clear_errors():
    import pytest

    inputs = keras.Input((4,))
    model = keras.Model(inputs, tf_psp.PSPDense(3, name="d")(inputs))
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        tf_psp.strip_and_shrink(model, round_to=0)
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        tf_psp.strip_and_shrink(model, round_to=2.5)
    model.get_layer("d").alpha.assign(np.array([1.0, np.nan, 1.0, 1.0], "float32"))
    with pytest.raises(ValueError, match=r"\['d'\] have NaN"):
        tf_psp.strip_and_shrink(model)
    with pytest.raises(ValueError, match="expected a keras.Model"):
        tf_psp.strip_and_shrink(keras.layers.Dense(2))
