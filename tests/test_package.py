"""Packaging promises: light imports, the quickstart runs, the public API is complete."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


# Optional dependencies that tf_psp.export and tf_psp.bench import only inside the
# functions that need them: `import tf_psp` must not pay for them. (matplotlib is
# not listed: Keras 3.15 imports it itself.)
_HEAVY = ("tensorflow_model_optimization", "tf_keras", "tf2onnx", "onnx", "onnxruntime",
          "ai_edge_litert")


@pytest.mark.slow
def test_import_is_light_and_reaches_export_and_bench():
    code = ("import sys, tf_psp; "
            f"bad = [m for m in {_HEAVY!r} if m in sys.modules]; assert not bad, bad; "
            "assert tf_psp.export.export_tflite and tf_psp.bench.compare; "
            "import os; "
            "assert os.environ.get('TF_USE_LEGACY_KERAS') in (None, '0'), 'legacy keras'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_export_and_bench_are_attributes_of_the_package():
    import tf_psp

    assert tf_psp.export.__name__ == "tf_psp.export"
    assert tf_psp.bench.__name__ == "tf_psp.bench"
    assert {"export", "bench"} <= set(tf_psp.__all__)


def test_public_api():
    import tf_psp

    for name in tf_psp.__all__:
        assert hasattr(tf_psp, name), name


@pytest.mark.slow  # the quickstart end to end in a subprocess
def test_quickstart_runs_and_prints_sparsity():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mnist_quickstart.py"), "--epochs=1",
         "--pretrain_epochs=1", "--limit=256"],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "structure sparsity" in result.stdout and "test accuracy" in result.stdout
