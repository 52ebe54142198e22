"""The `tf-psp` command line: profile, shrink, export, bench and its errors.

The tests call `tf_psp.cli.main(argv)` in-process; one (slow) runs the real
`python -m tf_psp.cli --help` in a subprocess.
"""

import io
import json
import os
import re
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import bench, cli
from tf_psp import export as tf_psp_export
from tf_psp.functional import relative_error

from conftest import randomize_weights

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the CLI exports and benchmarks with the TensorFlow backend",
)

_PRUNED = {"c2": 8, "c3": 8, "fc": 8}  # PSP layer -> alphas set below epsilon


def _psp_model():
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="c2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.Conv2D(16, 1, name="c3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, name="fc")(x)
    model = keras.Model(inputs, outputs, name="small_cnn")
    randomize_weights(model)
    psp = tf_psp.parameterize(model, structure="channel")
    for name, count in _PRUNED.items():
        layer = psp.get_layer(name)
        alpha = np.array(layer.alpha.numpy())
        alpha.reshape(-1)[:count] = 0.5 * layer.epsilon  # below the threshold, not zero
        layer.alpha.assign(alpha)
    return psp


def _run(argv):
    """Runs `main(argv)` in-process; returns (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def _rel_error(reference, output):
    return relative_error(reference, output)


def _probe():
    return np.random.default_rng(1).normal(size=(3, 12, 12, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def psp_path(workdir):
    path = str(workdir / "psp.keras")
    _psp_model().save(path)
    return path


@pytest.fixture(scope="module")
def shrunk(workdir, psp_path):
    path = str(workdir / "shrunk.keras")
    report = str(workdir / "shrunk.json")
    status, out, err = _run(["shrink", psp_path, path, "--report", report])
    return {"path": path, "report": report, "status": status, "out": out, "err": err}


@pytest.fixture(scope="module")
def tflite_path(workdir, psp_path):
    path = str(workdir / "psp.tflite")
    status, out, err = _run(["export", psp_path, path, "--format", "tflite"])
    assert status == 0, err
    assert "Wrote" in out and "max rel error" in out
    return path


# --- profile ------------------------------------------------------------------


def test_profile_prints_the_table(psp_path, capsys):
    assert cli.main(["profile", psp_path]) == 0
    out = capsys.readouterr().out
    assert 'Profile of model "small_cnn"' in out
    assert re.search(r"c2 \(PSPConv2D\).*\b8/16\b", out)
    assert "expected MAC reduction" in out


def test_profile_json_parses_and_matches_profile(psp_path, capsys):
    assert cli.main(["profile", psp_path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = tf_psp.profile(keras.models.load_model(psp_path)).to_dict()
    assert data["total_macs"] == expected["total_macs"]
    assert data["structures_pruned"] == sum(_PRUNED.values())
    assert {row["name"] for row in data["layers"]} >= set(_PRUNED)


# --- shrink -------------------------------------------------------------------


def test_shrink_writes_a_plain_smaller_model(shrunk, psp_path):
    assert shrunk["status"] == 0, shrunk["err"]
    out = shrunk["out"]
    assert "strip_and_shrink report" in out
    assert re.search(r"MACs: [\d,]+ -> [\d,]+ \(\d+\.\d+x fewer", out)
    assert re.search(r"Max relative error.*: \S+", out)

    # The saved file holds no tf_psp class, only Keras layers.
    with zipfile.ZipFile(shrunk["path"]) as archive:
        config = archive.read("config.json").decode()
    assert "tf_psp" not in config and "PSP" not in config
    small = keras.models.load_model(shrunk["path"])
    assert not any(tf_psp.is_psp_layer(layer) for layer in small.layers)
    assert all(type(layer).__module__.startswith("keras.") for layer in small.layers)
    assert small.get_layer("c2").filters < 16

    psp = keras.models.load_model(psp_path)
    x = _probe()
    reference = keras.ops.convert_to_numpy(psp(x, training=False))
    output = keras.ops.convert_to_numpy(small(x, training=False))
    assert _rel_error(reference, output) <= 1e-5

    report = json.loads(open(shrunk["report"]).read())
    assert report["macs_after"] < report["macs_before"]
    assert report["max_rel_error"] <= 1e-5
    assert report["report"]["layers"]


def test_shrink_rejects_a_non_keras_output(psp_path, workdir):
    status, _, err = _run(["shrink", psp_path, str(workdir / "out.h5")])
    assert status == 2
    assert err.startswith("tf-psp: error:") and "out.h5" in err


# --- export -------------------------------------------------------------------


def test_export_tflite_runs_like_keras(tflite_path, psp_path):
    assert os.path.getsize(tflite_path) > 0
    x = _probe()
    reference = keras.models.load_model(psp_path)(x, training=False)
    (output,) = tf_psp_export.run_tflite(tflite_path, x)
    assert _rel_error(reference, output) <= 1e-5


def test_export_onnx_runs_like_keras(psp_path, workdir):
    path = str(workdir / "psp.onnx")
    status, out, err = _run(["export", psp_path, path, "--format", "onnx"])
    assert status == 0, err
    assert "onnx" in out
    x = _probe()
    reference = keras.models.load_model(psp_path)(x, training=False)
    (output,) = tf_psp_export.run_onnx(path, x)
    assert _rel_error(reference, output) <= 1e-5


@pytest.mark.parametrize("calibrated", [True, False], ids=["npy", "random"])
def test_export_tflite_int8(psp_path, workdir, calibrated):
    path = str(workdir / f"int8_{calibrated}.tflite")
    argv = ["export", psp_path, path, "--format", "tflite-int8"]
    if calibrated:
        calibration = str(workdir / "calibration.npy")
        np.save(calibration, np.random.default_rng(2).normal(size=(16, 12, 12, 3)))
        argv += ["--calibration", calibration]
    status, out, err = _run(argv)
    assert status == 0, err
    assert ("random-normal" in err) != calibrated
    x = _probe()
    reference = keras.models.load_model(psp_path)(x, training=False)
    (output,) = tf_psp_export.run_tflite(path, x)
    assert _rel_error(reference, output) < 0.1  # int8: coarse, but the same function


def test_export_unknown_format_is_a_usage_error(psp_path, workdir):
    status, out, err = _run(["export", psp_path, str(workdir / "m.bin"), "--format", "coreml"])
    assert status == 2
    assert out == ""
    assert err.startswith("tf-psp: error:") and "coreml" in err
    assert "Traceback" not in err


# --- bench --------------------------------------------------------------------


def test_bench_compares_two_models(psp_path, shrunk):
    assert shrunk["status"] == 0, shrunk["err"]
    status, out, err = _run(
        ["bench", psp_path, "--compare", shrunk["path"], "--runs", "3", "--warmup", "1",
         "--threads", "1,2"]
    )
    assert status == 0, err
    ratios = re.findall(r"threads=\d: .*speed-up A/B (\d+\.\d+)x", out)
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios)
    assert "MACs: A" in out


def test_bench_module_times_tflite_files(tflite_path):
    times = bench.time_tflite(tflite_path, None, num_threads=1, warmup=1, runs=3)
    assert len(times) == 3 and all(t > 0 for t in times)
    result = bench.compare(tflite_path, tflite_path, runs=3, warmup=1)
    assert result["a_median_s"] > 0 and result["b_median_s"] > 0
    assert result["speedup"] == pytest.approx(result["a_median_s"] / result["b_median_s"])


def test_interleaved_alternates_and_returns_medians():
    calls = []

    def timer(name, seconds):
        def run():
            calls.append(name)
            return seconds.pop(0)

        return run

    medians = bench.interleaved(
        {"A": timer("A", [9.0, 1.0, 2.0, 3.0]), "B": timer("B", [9.0, 5.0, 4.0, 6.0])},
        rounds=3,
        warmup=1,
    )
    assert calls == ["A", "B"] * 4
    assert medians == {"A": 2.0, "B": 5.0}


# --- errors -------------------------------------------------------------------


def test_missing_file_names_the_file(workdir):
    missing = str(workdir / "does_not_exist.keras")
    status, out, err = _run(["profile", missing])
    assert status in (1, 2)
    assert out == ""
    assert err.startswith("tf-psp: error:") and missing in err
    assert len(err.strip().splitlines()) == 1


def test_corrupt_keras_file_fails_with_one_line(workdir):
    corrupt = workdir / "corrupt.keras"
    corrupt.write_text("this is not a Keras model\n")
    status, _, err = _run(["profile", str(corrupt)])
    assert status == 1
    assert err.startswith("tf-psp: error:") and str(corrupt) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_wrong_suffix_is_a_usage_error(workdir):
    text = workdir / "model.txt"
    text.write_text("x")
    status, _, err = _run(["bench", str(text)])
    assert status == 2
    assert "not a .keras or .tflite" in err and str(text) in err


def test_bad_option_value_is_a_usage_error(psp_path):
    status, _, err = _run(["bench", psp_path, "--threads", "0"])
    assert status == 2
    assert err.startswith("tf-psp: error: argument --threads")


# --- the real program ---------------------------------------------------------


def _subprocess(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "tf_psp.cli", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )


@pytest.mark.slow  # the real program in a subprocess
def test_help_lists_the_commands():
    result = _subprocess("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: tf-psp")
    for command in ("profile", "shrink", "export", "bench"):
        assert command in result.stdout


def test_error_exits_without_traceback(workdir):
    corrupt = workdir / "corrupt_sub.keras"
    corrupt.write_text("not a zip archive")
    status, _, err = _run(["export", str(corrupt), str(workdir / "x.tflite")])
    assert status == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tf-psp:")]
    assert lines == [
        f"tf-psp: error: not a valid .keras file (it is not a zip archive) ({corrupt})"
    ]


def test_shrink_approximate_flag_is_recorded(psp_path, workdir):
    out_path = str(workdir / "approx.keras")
    report_path = str(workdir / "approx.json")
    status, _, err = _run(["shrink", psp_path, out_path, "--approximate", "--report", report_path])
    assert status == 0, err
    report = json.loads(open(report_path).read())
    assert report["approximate"] is True
    assert report["macs_after"] <= report["macs_before"]


# --- latency-table ---------------------------------------------------------------


@pytest.mark.slow
def test_latency_table_writes_table_and_plot(psp_path, workdir):
    table_path, plot_path = str(workdir / "table.json"), str(workdir / "table.png")
    status, out, err = _run(["latency-table", psp_path, "--points", "2", "--runs", "2",
                             "--cache-dir", str(workdir / "cache"), "--output", table_path,
                             "--plot", plot_path])
    assert status == 0, err
    table = tf_psp.latency.LatencyTable.load(table_path)
    assert set(table.layers) == {"c1", "c2", "c3", "fc"}
    assert f"quantum {table.quantum}" in out and "slowest layers" in out
    assert os.path.getsize(plot_path) > 1000
    shrunk_model = tf_psp.strip_and_shrink(keras.models.load_model(psp_path))
    assert table.predict(shrunk_model) < table.predict_widths({})


def test_latency_table_rejects_bad_points(psp_path):
    status, _, err = _run(["latency-table", psp_path, "--points", "1"])
    assert status == 2 and "--points" in err


# --- --version, --verbose and a light start ----------------------------------------


def test_version_prints_the_package_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"tf-psp {tf_psp.__version__}\n"


_LIGHT_START = """
import contextlib, io, sys
from tf_psp import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [cli.main(["--help"]), cli.main(["--version"]), cli.main(["prune", "--help"])]
heavy = [m for m in ("tensorflow", "keras") if m in sys.modules]
print(codes, heavy, "usage: tf-psp prune" in out.getvalue())
"""


def test_help_and_version_do_not_load_tensorflow():
    result = subprocess.run([sys.executable, "-c", _LIGHT_START], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[0, 0, 0] [] True"
    assert result.stderr == ""


def test_verbose_is_accepted_before_and_after_the_command(workdir):
    for argv in (["--verbose", "profile", "missing.keras"], ["profile", "missing.keras",
                                                               "--verbose"]):
        args = cli.build_parser().parse_args(argv)
        assert args.verbose is True and args.command == "profile"
    assert cli.build_parser().parse_args(["profile", "m.keras"]).verbose is False


# --- prune ----------------------------------------------------------------------------

_CLASSES = 3


def _plain_model(compiled=False):
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(_CLASSES, name="fc")(x)
    model = keras.Model(inputs, outputs, name="two_convs")
    randomize_weights(model)
    if compiled:
        model.compile(keras.optimizers.SGD(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    return model


def _samples(n=64, shape=(12, 12, 3), classes=_CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + shape).astype(np.float32)
    return x, rng.integers(0, classes, n)


@pytest.fixture(scope="module")
def plain_path(workdir):
    path = str(workdir / "plain.keras")
    _plain_model().save(path)
    return path


@pytest.fixture(scope="module")
def npz_path(workdir):
    path = str(workdir / "data.npz")
    x, y = _samples()
    np.savez(path, x=x, y=y)
    return path


def _macs(path):
    return tf_psp.profile(keras.models.load_model(path)).total_macs


def test_prune_npz_writes_a_plain_model_within_the_budget(plain_path, npz_path, workdir):
    output, report = str(workdir / "pruned.keras"), str(workdir / "pruned.json")
    before = open(plain_path, "rb").read()
    status, out, err = _run(["prune", plain_path, "--data", npz_path, "--keep-macs", "0.5",
                             "--epochs", "1", "--validation-split", "0.25", "-o", output,
                             "--report", report, "--quiet-training"])
    assert status == 0, err
    assert "48 samples of shape (12, 12, 3) + 16 for validation" in out
    assert re.search(r"prune: MACs [\d,]+ -> [\d,]+", out) and f"Wrote {output}" in out
    assert "sparse categorical cross-entropy (from_logits=True)" in err  # said once, on stderr
    assert open(plain_path, "rb").read() == before
    small = keras.models.load_model(output)
    assert not any(tf_psp.is_psp_layer(layer) for layer in small.layers)
    assert _macs(output) <= 0.5 * _macs(plain_path)
    x, _ = _samples(4, seed=5)
    assert small.predict(x, verbose=0).shape == (4, _CLASSES)
    data = json.loads(open(report).read())
    assert data["shrunk_macs"] == _macs(output) and data["dense_macs"] == _macs(plain_path)
    assert set(data["evaluation"]) >= {"dense", "pruned"}


def test_prune_image_folder(workdir):
    folder = workdir / "images"
    rng = np.random.default_rng(3)
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(8):
            image = rng.integers(0, 256, size=(16, 20, 3)).astype("uint8")  # resized to 12x12
            keras.utils.save_img(str(folder / label / f"{i}.png"), image)
    model = _plain_model(compiled=True)
    model_path, output = str(workdir / "compiled.keras"), str(workdir / "from_images.keras")
    model.save(model_path)
    status, out, err = _run(["prune", model_path, "--data", str(folder), "--keep-macs", "0.6",
                             "--epochs", "1", "--batch-size", "8", "-o", output,
                             "--quiet-training"])
    assert status == 0, err
    assert "16 images in 2 classes, resized to 12x12" in out
    assert "not compiled" not in err  # the model's own loss is used
    assert _macs(output) <= 0.6 * _macs(model_path)


def test_prune_keep_macs_and_keep_latency_exclude_each_other(plain_path, npz_path, workdir):
    status, _, err = _run(["prune", plain_path, "--data", npz_path, "--keep-macs", "0.5",
                           "--keep-latency", "0.5", "-o", str(workdir / "x.keras")])
    assert status == 2 and "not allowed with argument" in err


@pytest.mark.parametrize("case", ["missing", "no_y", "shape", "classes", "split", "regression",
                                  "output", "budget"])
def test_prune_bad_input_is_one_line_before_any_training(case, plain_path, workdir):
    data = str(workdir / f"{case}.npz")
    x, y = _samples(8)
    argv_extra, expected = [], None
    if case == "missing":
        data = str(workdir / "no_such_data.npz")
        expected = f"no such data file or folder ({data})"
    elif case == "no_y":
        np.savez(data, x=x, labels=y)
        expected = "has no array 'y' (it holds 'x', 'labels')"
    elif case == "shape":
        np.savez(data, x=x[:, :10, :10], y=y)
        expected = "x holds samples of shape (10, 10, 3), model 'two_convs' takes (12, 12, 3)"
    elif case == "classes":
        np.savez(data, x=x, y=np.arange(8) % 5)
        expected = "the labels name 5 classes, model 'two_convs' has 3 outputs"
    elif case == "split":
        np.savez(data, x=x, y=y)
        argv_extra = ["--validation-split", "0.01"]
        expected = "a validation split of 0.01 leaves 8 training and 0 validation samples"
    elif case == "regression":
        np.savez(data, x=x, y=np.linspace(0.1, 0.9, 8))
        expected = "pass --loss"
    elif case == "output":
        np.savez(data, x=x, y=y)
        argv_extra = ["-o", str(workdir / "model.h5")]
        expected = "the output must be a .keras file"
    else:
        np.savez(data, x=x, y=y)
        argv_extra = ["--keep-macs", "1.5"]
        expected = "argument --keep-macs: expected a fraction in (0, 1]"
    output = str(workdir / f"{case}.keras")
    argv = ["prune", plain_path, "--data", data, "-o", output, "--epochs", "1"] + argv_extra
    if "-o" in argv_extra:
        argv = ["prune", plain_path, "--data", data, "--epochs", "1"] + argv_extra
    status, out, err = _run(argv)
    assert status == 2, (out, err)
    assert err.startswith("tf-psp: error:") and len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert "Traceback" not in err and not os.path.exists(output)


# --- a quiet console, in the real program ------------------------------------------------

_LOG_LINE = re.compile(
    r"^[IWE]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\]|absl::InitializeLog|oneDNN custom operations"
    r"|XNNPACK delegate|fully_quantize|Optimizing ONNX model|Ignored output_format"
    r"|input name\(s\) resource|^INFO:|^WARNING:tensorflow", re.M)


def _program(*args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "tf_psp.cli", *args],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow  # the real program, four times, in subprocesses
def test_the_program_prints_no_library_log_line_unless_verbose(plain_path, npz_path, workdir):
    small = str(workdir / "quiet.keras")
    outputs = [
        _program("prune", plain_path, "--data", npz_path, "--epochs", "1", "-o", small),
        _program("export", small, str(workdir / "quiet.tflite"), "--format", "tflite-int8"),
        _program("export", small, str(workdir / "quiet.onnx")),
    ]
    for output in outputs:
        assert not _LOG_LINE.search(output), _LOG_LINE.search(output).group(0)
    assert "Wrote" in outputs[0] and "Wrote" in outputs[1] and "Wrote" in outputs[2]
    verbose = _program("--verbose", "export", small, str(workdir / "verbose.tflite"))
    assert len(_LOG_LINE.findall(verbose)) >= 3  # the detector above finds them when shown
