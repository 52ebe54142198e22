"""examples/latency_front.py end to end on a few batches: both methods train, are timed, written."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_latency_front_tiny_run_writes_results(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore",
               TF_PSP_CACHE=str(tmp_path / "cache"))
    (tmp_path / "budget").mkdir()
    args = [sys.executable, str(ROOT / "examples" / "latency_front.py"), "--models=resnet8",
            "--seeds=0", "--latency_budgets=0.6", "--pretrain_epochs=1", "--epochs=2",
            "--steps_per_epoch=2", f"--out={tmp_path / 'budget'}", "--use_defaults",
            f"--front_out={tmp_path / 'front'}", "--measure", "--measure_runs=5"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=1200, env=env,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "front" / "resnet8.json").read_text())
    rows = {r["method"]: r for r in data["runs"]}
    assert set(rows) == {"psp_latency", "psp_macs"}
    assert rows["psp_latency"]["predicted_latency"] <= 0.6 + 1e-9
    for row in rows.values():
        assert 0 < row["measured_latency"] < 1.5 and 0 <= row["accuracy"] <= 1
    assert (tmp_path / "front" / "resnet8.png").stat().st_size > 0
    assert (tmp_path / "front" / "resnet8.md").read_text().count("|") > 10
