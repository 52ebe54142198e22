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
