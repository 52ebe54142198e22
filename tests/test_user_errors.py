"""What users see when an argument or a model is off: errors that name the argument
or layer, and no silent wrong numbers."""

import io

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import cli, regularizers

from conftest import randomize_weights
from conftest import set_alpha as _set_alpha

L = keras.layers


def _psp_model():
    inputs = keras.Input((6, 6, 3))
    x = tf_psp.PSPConv2D(4, 3, padding="same", structure="filter", name="c1")(inputs)
    x = L.ReLU(name="r")(x)
    x = tf_psp.PSPConv2D(3, 1, structure="channel", name="c2")(x)
    return keras.Model(inputs, L.GlobalAveragePooling2D(name="gap")(x), name="m")


def test_nan_alpha_is_not_counted_as_pruned():
    model = _psp_model()
    model.get_layer("c2").alpha.assign(np.array([1.0, np.nan, 1.0, 1.0], "float32"))
    with pytest.raises(ValueError, match=r"profile: PSP layers \['c2'\] have NaN"):
        tf_psp.profile(model)
    model.get_layer("c2").alpha.assign(np.ones(4, "float32"))
    prof = tf_psp.profile(model)
    model.get_layer("c1").alpha.assign(np.array([1.0, np.inf, 1.0, 1.0], "float32"))
    with pytest.raises(ValueError, match=r"\['c1'\]"):
        prof.refresh()


@pytest.mark.parametrize("epsilon", [None, "abc", True, [0.1]])
def test_bad_epsilon_names_the_argument(epsilon):
    with pytest.raises(ValueError, match=r"layer 'p': epsilon must be a positive finite threshold"):
        tf_psp.PSPConv2D(2, 1, epsilon=epsilon, name="p")
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)], name="seq")
    with pytest.raises(ValueError, match=r"parameterize\(model 'seq'\): epsilon must be"):
        tf_psp.parameterize(model, epsilon=epsilon)


@pytest.mark.parametrize("make, name", [
    (lambda: regularizers.L1("x"), "L1: l1"),
    (lambda: regularizers.L1(None), "L1: l1"),
    (lambda: regularizers.WeightDecay("x"), "WeightDecay: decay"),
    (lambda: regularizers.WeightDecay(float("nan")), "WeightDecay: decay"),
    (lambda: regularizers.WeightDecay(-1.0), "WeightDecay: decay"),
])
def test_bad_regularizer_strength_names_the_argument(make, name):
    with pytest.raises(ValueError, match=f"{name} must be >= 0 and finite"):
        make()


def test_bad_regularizer_weights_name_the_argument():
    with pytest.raises(ValueError, match="regularizer weights must be numbers"):
        regularizers.L1(1e-4, weights=["a", "b"])


@pytest.mark.parametrize("round_to", [None, "8", 0, 2.5, float("nan"), float("inf"), True])
def test_bad_round_to_names_the_argument(round_to):
    with pytest.raises(ValueError, match="strip_and_shrink: round_to must be a positive integer"):
        tf_psp.strip_and_shrink(_psp_model(), round_to=round_to)


def test_integral_round_to_is_accepted():
    tf_psp.strip_and_shrink(_psp_model(), round_to=np.int64(2))
    tf_psp.strip_and_shrink(_psp_model(), round_to=4.0)


@pytest.mark.parametrize("approximate", ["yes", 1, None])
def test_approximate_must_be_a_bool(approximate):
    with pytest.raises(TypeError, match="approximate must be True or False"):
        tf_psp.strip_and_shrink(_psp_model(), approximate=approximate)


def test_report_says_keep_one_channel_not_rounding():
    model = _psp_model()
    _set_alpha(model.get_layer("c2"), [0, 0, 0, 0])  # c1's whole output space is ignored
    with pytest.warns(UserWarning, match="every structure of layer 'c2'"):
        _, report = tf_psp.strip_and_shrink(model, return_report=True)
    assert report.readmitted == 1
    assert "every channel space keeps at least one channel" in str(report)
    assert "round" not in str(report)
    model = _psp_model()
    _set_alpha(model.get_layer("c2"), [0, 1, 1, 1])
    _, report = tf_psp.strip_and_shrink(model, round_to=4, return_report=True)
    assert report.readmitted == 1
    assert "round widths to multiples of 4" in str(report)


def test_cli_shrink_refuses_a_model_without_psp_layers(tmp_path):
    inputs = keras.Input((6, 6, 3))
    plain = keras.Model(inputs, L.Conv2D(2, 1)(inputs))
    randomize_weights(plain)
    path = tmp_path / "plain.keras"
    plain.save(path)
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["shrink", str(path), str(tmp_path / "small.keras")], out=out, err=err)
    assert status == 2
    assert not (tmp_path / "small.keras").exists()
    assert err.getvalue().startswith("tf-psp: error:") and str(path) in err.getvalue()
    assert "has no PSP layers" in err.getvalue() and "tf-psp prune" in err.getvalue()
    assert "tf_psp.parameterize" in err.getvalue()
    psp_path = tmp_path / "psp.keras"
    _psp_model().save(psp_path)
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["shrink", str(psp_path), str(tmp_path / "small2.keras")], out=out, err=err)
    assert status == 0, err.getvalue()
    assert "no PSP layers" not in err.getvalue()


def test_int8_export_result_says_int8(tmp_path):
    from tf_psp import export

    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, L.Conv2D(2, 1)(inputs))
    randomize_weights(model)
    calibration = np.random.default_rng(0).normal(size=(16, 6, 6, 3)).astype("float32")
    result = export.export_tflite(model, tmp_path / "m.tflite", quantization="int8",
                                  representative_data=calibration)
    assert (result.format, result.quantization) == ("tflite", "int8")
    assert "int8" in repr(result)
    result = export.export_tflite(model, tmp_path / "f.tflite")
    assert (result.format, result.quantization) == ("tflite", None)
