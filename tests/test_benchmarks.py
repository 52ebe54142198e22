"""benchmarks/latency.py runs end to end in --quick mode and writes its results.

No timing is asserted: machines are shared and noisy. The script runs in a
subprocess, as a user would run it, on a tiny residual CNN.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,  # a subprocess runs the benchmark end to end
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="the benchmark exports to TFLite and ONNX with the TensorFlow backend",
    ),
]


def test_latency_quick_writes_results(tmp_path):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--quick", "--models=tiny",
         f"--output_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("latency.json", "latency.md", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    result = json.loads((tmp_path / "latency.json").read_text())
    assert {"meta", "models"} <= set(result)
    model = result["models"]["tiny"]
    runtimes = {"tflite_1t", "tflite_2t", "onnx_1t", "keras"}
    assert runtimes <= set(model["dense"]["latency_ms"])
    assert model["dense"]["macs"] > 0 and model["dense"]["tflite_bytes"] > 0
    variants = model["variants"]
    assert {v["round_to"] for v in variants} == {1, 8}
    for v in variants:
        assert v["kind"] == "psp" and v["target_reduction"] == 0.5
        assert 0 < v["macs"] < model["dense"]["macs"]
        assert v["mac_reduction"] == pytest.approx(model["dense"]["macs"] / v["macs"])
        assert v["max_rel_error_vs_psp"] <= 1e-5
        assert v["tflite_bytes"] > 0 and v["onnx_bytes"] > 0
        assert runtimes <= set(v["latency"])
        for lat in v["latency"].values():
            assert {"median_ms", "speedup", "fidelity"} <= set(lat)
            assert lat["fidelity"] == pytest.approx(lat["speedup"] / v["mac_reduction"])
    assert "| i50_r1 |" in proc.stdout


def test_prune_cost_writes_both_times_and_prunes_to_the_budget(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    output = tmp_path / "prune_cost.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "prune_cost.py"), "--samples=64",
         "--epochs=1", "--verbose=0", f"--output={output}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(output.read_text())
    (row,) = result["rounds"]
    assert row["fit_seconds"] > 0 and row["prune_seconds"] > 0
    assert result["ratio"] == pytest.approx(row["prune_seconds"] / row["fit_seconds"])
    assert 0.47 <= row["kept_macs"] <= 0.5
    assert {"parameterize", "budget training", "shrinking"} <= set(row["phase_seconds"])
    assert "prune / fit" in proc.stdout


def test_keras_hub_coverage_measures_a_class_and_writes_the_table(tmp_path):
    pytest.importorskip("keras_hub")
    output = tmp_path / "coverage.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "keras_hub_coverage.py"),
         "--classes=GPT2Backbone,SAMBackbone", f"--output={output}", "--timeout=300"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["class"]: r for r in json.loads(output.read_text())["rows"]}
    gpt2 = rows["GPT2Backbone"]  # a decoder: opened at the fixed length
    assert gpt2["status"] == "measured" and gpt2["ratio"] <= 0.55
    assert gpt2["max_rel_error"] <= 1e-5 and gpt2["flat_vs_dense"] <= 1e-5
    assert gpt2["pruned_vs_dense"] > 1e-6  # something was pruned
    assert gpt2["widths_shrunk"]["heads"] < gpt2["widths_dense"]["heads"]
    assert rows["SAMBackbone"]["status"] == "no config"
    table = (tmp_path / "coverage.md").read_text()
    assert "**1 reach <= 0.55 of their MACs exactly**" in table and "| GPT2Backbone |" in table
