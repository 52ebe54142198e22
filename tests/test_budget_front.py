"""examples/budget_front.py end to end on a few batches: every method writes its row."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_budget_front_tiny_run_writes_results(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    args = [sys.executable, str(ROOT / "examples" / "budget_front.py"), "--models=resnet8",
            "--seeds=0", "--budgets=0.4", "--pretrain_epochs=1", "--epochs=2",
            "--finetune_epochs=1", "--steps_per_epoch=2", f"--out={tmp_path}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "resnet8.json").read_text())["runs"]
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "psp_budget", "l1_norm", "network_slimming", "group_lasso",
                       "random", "scratch"}
    for row in rows:
        assert set(row) >= {"model", "method", "keep_macs", "seed", "macs_kept", "accuracy"}
        if row["method"] == "dense":
            assert row["keep_macs"] == 1.0 and row["macs_kept"] == 1.0
        else:
            assert 0.37 <= row["macs_kept"] <= 0.4, row
    assert (tmp_path / "resnet8.md").read_text().count("|") > 10
    assert (tmp_path / "resnet8.png").stat().st_size > 0
    # resumable: a second run trains nothing
    again = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert again.returncode == 0 and "accuracy" not in again.stdout


@pytest.mark.slow
def test_bad_flags_are_refused():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "budget_front.py"), "--epochs=2",
         "--finetune_epochs=2"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode != 0 and "--finetune_epochs" in result.stderr
