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
            "--finetune_epochs=1", "--steps_per_epoch=2", f"--out={tmp_path}", "--use_defaults"]
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
def test_a_missing_search_file_is_refused_unless_defaults_are_asked_for(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "budget_front.py"), "--models=resnet8",
         "--methods=psp_budget", f"--out={tmp_path}", "--lr_override=0.05"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "search_resnet8.json holds no searched setting of psp_budget" in result.stderr
    assert "--use_defaults" in result.stderr and not list(tmp_path.glob("runs/*.json"))


@pytest.mark.slow
def test_bad_flags_are_refused():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "budget_front.py"), "--epochs=2",
         "--finetune_epochs=2"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode != 0 and "--finetune_epochs" in result.stderr


@pytest.mark.slow
def test_budget_front_on_fashion_mnist_with_distillation(tmp_path):
    from conftest import write_fashion_mnist

    write_fashion_mnist(tmp_path / "fm", n_train=100, n_test=30)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    args = [sys.executable, str(ROOT / "examples" / "budget_front.py"), "--models=resnet8",
            "--methods=dense,psp_budget_kd,network_slimming_kd,scratch_kd", "--seeds=0",
            "--budgets=0.4", "--pretrain_epochs=1", "--epochs=2", "--finetune_epochs=1",
            "--steps_per_epoch=2",
            "--dataset=fashion_mnist", f"--data_dir={tmp_path / 'fm'}", "--train_examples=80",
            f"--out={tmp_path / 'out'}", "--use_defaults"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "resnet8.json").read_text())
    assert results["protocol"]["dataset"] == "fashion_mnist"
    assert {r["method"] for r in results["runs"]} == {"dense", "psp_budget_kd",
                                                       "network_slimming_kd", "scratch_kd"}
    for row in results["runs"]:
        # every test image, none of the training subset's
        assert row["dataset"] == "fashion_mnist" and row["test_examples"] == 30, row
        if row["method"] != "dense":  # distilled from the dense model, within the budget
            assert row["config"]["distill_weight"] == 0.5, row
            assert 0.37 <= row["macs_kept"] <= 0.4, row
    runs = list((tmp_path / "out" / "runs").glob("*.json"))
    assert runs and all("fashion_mnist80" in p.name for p in runs)
    assert all(json.loads(p.read_text())["train_examples"] == 80 for p in runs)
    assert "Fashion-MNIST" in (tmp_path / "out" / "resnet8.md").read_text()
