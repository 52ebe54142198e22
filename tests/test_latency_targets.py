"""Latency tables on each runtime (tf_psp.latency_targets): int8 TFLite and ONNX Runtime.

The oracle of a table is the shrunk model itself: `table.predict` reads the
shrunk model's own layer shapes, independently of the plan that chose them;
and each runtime's points live in their own cache (a float point is never
read as an int8 one).
"""

import json
import os

import keras
import pytest

import tf_psp
from tf_psp import cli, latency, latency_targets

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="TFLite and tf2onnx convert TensorFlow functions")
L = keras.layers


def _model():
    keras.utils.set_random_seed(0)
    x = keras.Input((32, 32, 16))
    h = L.Conv2D(64, 3, padding="same", activation="relu", name="stem")(x)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.Conv2D(96, 1, activation="relu", name="pw")(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(x, L.Dense(10, name="fc")(h), name="small")


def test_targets_say_what_they_cannot_do():
    with pytest.raises(ValueError, match="runtime must be one of"):
        latency_targets.target("tensorrt")
    with pytest.raises(ValueError, match="tabulated for runtime='tflite' only"):
        latency_targets.target("onnxruntime", quantization="int8")
    with pytest.raises(ValueError, match="quantization must be one of"):
        latency_targets.target("tflite", quantization="int4")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        latency_targets.target("onnxruntime", threads=0)
    assert latency_targets.target("tflite", 2, "int8").describe() == "tflite int8, 2 thread(s)"
    with pytest.raises(ValueError, match="tabulated for runtime='tflite' only"):
        tf_psp.PruneToBudget(keep_latency=0.5, runtime="onnxruntime", quantization="int8")
    with pytest.raises(ValueError, match="runtime must be one of"):
        tf_psp.prune_to_budget(_model(), keep_latency=0.5, runtime="gpu")


@pytest.mark.parametrize("runtime, quantization", [("onnxruntime", None), ("tflite", "int8")])
def test_a_latency_budget_on_each_runtime(tmp_path, runtime, quantization):
    model = _model()
    table = tf_psp.latency_table(model, runtime=runtime, quantization=quantization, points=2,
                                 runs=3, cache_dir=tmp_path, progress=False, quantum=8)
    assert (table.runtime, table.quantization) == (runtime, quantization)
    assert set(table.layers) == {"stem", "dw", "pw", "fc"}
    assert table.dense_seconds > 0 and table.calibration
    if runtime == "onnxruntime":  # a finer alignment is looked for: one that divides 8, or none
        assert table.fine_quantum in (0, 2, 4)
    else:
        assert table.fine_quantum == 0
    assert {e.fine for e in table.layers.values()} == {table.fine_quantum}
    loaded = latency.LatencyTable.load(_save(table, tmp_path))
    assert loaded.quantization == quantization and loaded.describe() == table.describe()
    pruned, report = tf_psp.prune_to_budget(model, keep_latency=0.8, importance="random",
                                            latency_table=table, return_report=True)
    assert (report.runtime, report.quantization) == (runtime, quantization)
    shrunk = tf_psp.strip_and_shrink(pruned)
    predicted = table.predict(shrunk) / table.predict(model)  # the shrunk model's own shapes
    assert predicted == pytest.approx(report.kept_latency, rel=1e-6)
    assert predicted <= 0.8 + 1e-9
    assert shrunk.count_params() < model.count_params()
    # the runtime's points are cached in a file of their own
    caches = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    label = latency_targets.target(runtime, 1, quantization).label
    assert caches and all(n.startswith(f"{label}-1t-") for n in caches)


def _save(table, directory):
    path = str(directory / "saved" / "table.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table.save(path)
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["quantization"] == table.quantization
    return path


def test_int8_and_float_points_are_not_mixed(tmp_path):
    call = latency.kernel_calls(_model())[2]  # pw, 64 -> 96
    float_s, = latency.measure_points([(call, 64, 96)], runs=2, cache_dir=tmp_path,
                                      progress=False)
    int8_s, = latency.measure_points([(call, 64, 96)], runs=2, cache_dir=tmp_path,
                                     progress=False, quantization="int8")
    files = sorted(n for n in os.listdir(tmp_path) if n.endswith(".json"))
    assert [n.split("-1t-")[0] for n in files] == ["tflite", "tflite-int8"]
    assert float_s > 0 and int8_s > 0


def test_whole_models_are_timed_as_exported(tmp_path):
    """Whole models: NHWC inputs (as `export_onnx` writes them), int8 inputs for int8."""
    model = _model()
    for runtime, quantization in (("onnxruntime", None), ("tflite", "int8")):
        seconds = latency.measure_latency(model, runtime=runtime, quantization=quantization,
                                          runs=3)
        assert seconds > 0
    (s,) = latency_targets.target("onnxruntime").time_models([model], 3)
    assert s > 0


def test_cli_latency_table_on_onnxruntime(tmp_path):
    import io

    path = str(tmp_path / "m.keras")
    _model().save(path)
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["latency-table", path, "--runtime", "onnxruntime", "--points", "2",
                       "--runs", "2", "--cache-dir", str(tmp_path / "cache")], out=out, err=err)
    assert status == 0, err.getvalue()
    assert "onnxruntime, 1 thread(s)" in out.getvalue()
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["latency-table", path, "--runtime", "onnxruntime", "--quantization",
                       "int8"], out=out, err=err)
    assert status == 2 and "tabulated for runtime='tflite' only" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["prune", path, "--data", "unused.npz", "--keep-latency", "0.5",
                       "--runtime", "onnxruntime", "--quantization", "int8", "-o",
                       str(tmp_path / "small.keras")], out=out, err=err)
    assert status == 2 and "--quantization int8" in err.getvalue()  # before loading anything
