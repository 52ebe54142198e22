"""Bad input gets a clear error that names the layer, model or file; nothing is lost.

One test per kind of bad input, each checking the error type and that the
message names what is wrong.
"""

import io
import re
import warnings
import zipfile

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import cli
from tf_psp import export as tf_psp_export
from tf_psp.functional import relative_error

from conftest import assert_weights_unchanged, randomize_weights, weights_snapshot

L = keras.layers


def _plain_model():
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(5, 3, padding="same", name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(2, name="fc")(x), name="small")
    return randomize_weights(model)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed_net")
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


def _export_tflite(model):
    return tf_psp_export.export_tflite(model, "unused.tflite")


_MODEL_FUNCTIONS = {
    "parameterize": tf_psp.parameterize,
    "strip": tf_psp.strip,
    "strip_and_shrink": tf_psp.strip_and_shrink,
    "profile": tf_psp.profile,
    "export_tflite": _export_tflite,
}


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=(2, 8, 8, 3)).astype("float32")


def _rel_error(a, b):
    return relative_error(a, b)


def test_unknown_structure_names_the_layer():
    model = _plain_model()
    choose = lambda layer: "rows" if layer.name == "c2" else "channel"  # noqa: E731
    with pytest.raises(ValueError, match=r"layer 'c2': unknown PSP structure 'rows'"):
        tf_psp.parameterize(model, structure=choose)
    with pytest.raises(ValueError, match=r"layer 'k': unknown PSP structure 'rows'"):
        tf_psp.PSPConv2D(4, 3, structure="rows", name="k")
    with pytest.raises(ValueError, match=r"unknown PSP structure 'rows'; expected one of"):
        tf_psp.parameterize(model, structure="rows")


@pytest.mark.parametrize("epsilon", [0.0, -0.1, float("nan"), float("inf")])
def test_epsilon_must_be_positive_and_finite(epsilon):
    with pytest.raises(ValueError, match=r"model 'small'\): epsilon must be a positive finite"):
        tf_psp.parameterize(_plain_model(), epsilon=epsilon)
    with pytest.raises(ValueError, match=r"layer 'd': epsilon must be a positive finite"):
        tf_psp.PSPDense(3, epsilon=epsilon, name="d")


@pytest.mark.parametrize("function", sorted(_MODEL_FUNCTIONS))
def test_unbuilt_model_is_refused_naming_the_model(function):
    model = keras.Sequential([L.Dense(2)], name="never_built")
    with pytest.raises(ValueError, match=r"'never_built'.*(not built|no defined inputs)"):
        _MODEL_FUNCTIONS[function](model)


@pytest.mark.parametrize("function", sorted(_MODEL_FUNCTIONS))
def test_subclassed_model_is_refused_with_what_to_do(function):
    model = _Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError) as info:
        _MODEL_FUNCTIONS[function](model)
    message = str(info.value)
    assert "'subclassed_net'" in message
    assert "subclassed" in message and "functional" in message


@pytest.mark.parametrize("function", ["strip", "strip_and_shrink"])
def test_nan_or_inf_alphas_name_the_layers(function):
    psp = tf_psp.parameterize(_plain_model())
    alpha = np.ones(psp.get_layer("c1").alpha.shape, "float32")
    alpha[1] = np.nan
    psp.get_layer("c1").alpha.assign(alpha)
    alpha = np.ones(psp.get_layer("fc").alpha.shape, "float32")
    alpha[0] = np.inf
    psp.get_layer("fc").alpha.assign(alpha)
    with pytest.raises(ValueError, match=r"\['c1', 'fc'\] have NaN or infinite alphas"):
        getattr(tf_psp, function)(psp)


@pytest.mark.parametrize("reader_kernel", [1, 3])
def test_fully_pruned_plain_conv_is_kept_and_named_in_a_warning(reader_kernel):
    # Not in a residual branch, so the layer stays. Its output is constant
    # (bias 0 -> BatchNorm shift -> ReLU). A 1x1 reader folds the constants
    # into its bias: one channel is kept, to keep the graph connected. A padded
    # 3x3 reader sees zero padding at the borders, so the channels with a
    # nonzero constant are kept (exactness first).
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(5, reader_kernel, padding="same", name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = randomize_weights(keras.Model(inputs, L.Dense(2, name="fc")(x)))
    psp = tf_psp.parameterize(model, structure="filter")
    psp.get_layer("c1").alpha.assign(np.zeros(6, "float32"))
    before = weights_snapshot(psp)
    with pytest.warns(UserWarning, match=r"every structure of layer 'c1' \(keeps \d of 6"):
        shrunk = tf_psp.strip_and_shrink(psp)
    constant = np.maximum(keras.ops.convert_to_numpy(psp.get_layer("bn1")(
        np.zeros((1, 1, 1, 6), "float32"), training=False)).ravel(), 0)
    expected = 1 if reader_kernel == 1 else max(int(np.count_nonzero(constant)), 1)
    assert shrunk.get_layer("c1").filters == expected
    assert _rel_error(psp(_x(), training=False), shrunk(_x(), training=False)) <= 1e-5
    assert_weights_unchanged(before, psp)


def test_fully_pruned_residual_branch_is_removed_without_warning():
    inputs = keras.Input((8, 8, 4))
    h = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    b = L.Conv2D(4, 3, padding="same", name="b1")(h)
    b = L.ReLU(name="b1_relu")(b)
    b = L.Conv2D(4, 3, padding="same", name="b2")(b)
    h = L.Add(name="add")([h, b])
    model = keras.Model(inputs, L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(h)))
    psp = tf_psp.parameterize(randomize_weights(model), structure="layer")
    psp.get_layer("b2").alpha.assign(0.0)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="strip_and_shrink")
        shrunk, report = tf_psp.strip_and_shrink(psp, return_report=True)
    names = {layer.name for layer in shrunk.layers}
    assert not names & {"b1", "b1_relu", "b2"}
    assert report.removed_branches[0]["layers"] == ["b1", "b1_relu", "b2"]
    assert _rel_error(psp(x, training=False), shrunk(x, training=False)) <= 1e-5


def test_invalid_options_name_the_model_or_file(tmp_path):
    psp = tf_psp.parameterize(_plain_model())
    target = str(tmp_path / "out.tflite")
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        tf_psp.strip_and_shrink(psp, round_to=0)
    with pytest.raises(ValueError, match=r"no layers named \['nope'\]"):
        tf_psp.parameterize(_plain_model(), layers=["nope"])
    with pytest.raises(ValueError, match=re.escape(f"'{target}'")):
        tf_psp_export.export(psp, target, "pdf")
    with pytest.raises(ValueError, match=re.escape(f"'{target}'")):
        tf_psp_export.export_tflite(psp, target, quantization="int4")
    with pytest.raises(ValueError, match=re.escape(f"'{target}'") + ".*representative_data"):
        tf_psp_export.export_tflite(psp, target, quantization="int8")
    assert not list(tmp_path.iterdir())


# --- the command line -----------------------------------------------------------


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    status = cli.main([str(a) for a in argv], out=out, err=err)
    return status, err.getvalue()


def _assert_one_line_naming(err, path):
    lines = [line for line in err.strip().splitlines() if line.startswith("tf-psp:")]
    assert len(lines) == 1 and lines[0].startswith("tf-psp: error:"), err
    assert str(path) in lines[0] and "Traceback" not in err


@pytest.fixture(scope="module")
def good_keras(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_input") / "good.keras"
    inputs = keras.Input((4,))
    keras.Model(inputs, L.Dense(2)(inputs)).save(path)
    return path


@pytest.mark.parametrize("command", ["profile", "shrink", "export", "bench"])
def test_cli_wrong_file_type_is_a_usage_error_naming_the_file(tmp_path, good_keras, command):
    wrong = tmp_path / "model.h5"
    wrong.write_bytes(b"\x89HDF\r\n")
    argv = {
        "profile": ["profile", wrong],
        "shrink": ["shrink", good_keras, tmp_path / "small.h5"],
        "export": ["export", good_keras, tmp_path / "out.pb"],
        "bench": ["bench", wrong],
    }[command]
    status, err = _run(argv)
    assert status == 2
    _assert_one_line_naming(err, argv[-1] if command in ("shrink", "export") else wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5"]


@pytest.mark.parametrize("corruption", ["not_zip", "zip_without_model", "truncated"])
def test_cli_corrupt_keras_file_fails_naming_the_file(tmp_path, good_keras, corruption):
    bad = tmp_path / "bad.keras"
    if corruption == "not_zip":
        bad.write_text("this is not a Keras model\n")
    elif corruption == "zip_without_model":
        with zipfile.ZipFile(bad, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        bad.write_bytes(good_keras.read_bytes()[:200])
    for argv in (["profile", bad], ["shrink", bad, tmp_path / "small.keras"],
                 ["export", bad, tmp_path / "out.tflite"]):
        status, err = _run(argv)
        assert status == 1, err
        _assert_one_line_naming(err, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.keras"]


def test_cli_corrupt_tflite_file_fails_naming_the_file(tmp_path, good_keras):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"garbage" * 16)
    for argv in (["bench", bad, "--runs", 1, "--warmup", 0],
                 ["bench", good_keras, "--compare", bad, "--runs", 1, "--warmup", 0]):
        status, err = _run(argv)
        assert status == 1, err
        _assert_one_line_naming(err, bad)
