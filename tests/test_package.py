"""Packaging promises: light imports, the quickstart runs, the public API is complete."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_import_does_not_pull_tfmot_or_tf_keras():
    code = ("import sys, tf_psp; bad = [m for m in ('tensorflow_model_optimization', 'tf_keras') "
            "if m in sys.modules]; assert not bad, bad; "
            "import os; assert os.environ.get('TF_USE_LEGACY_KERAS') in (None, '0'), 'legacy keras'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_public_api():
    import tf_psp

    for name in tf_psp.__all__:
        assert hasattr(tf_psp, name), name


def test_quickstart_runs_and_prints_sparsity():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mnist_quickstart.py"), "--epochs=1", "--pretrain_epochs=1", "--limit=256"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "structure sparsity" in result.stdout and "test accuracy" in result.stdout
