"""examples/coupling_front.py: per-layer vs group vs cost-aware PSP, end to end.

The script runs in a tiny configuration in a subprocess (as a user runs it):
every variant trains, is shrunk and timed in TFLite, the report files are
written, and a rerun skips the finished runs.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--models=resnet_small", "--variants=layer,group,group_macs", "--strengths=0.5",
        "--pretrain_epochs=1", "--epochs=2", "--finetune_epochs=1",
        "--steps_per_epoch=2", "--widths=4,4,8", "--latency_rounds=2"]


def _run_script(output_dir, *extra):
    pytest.importorskip("matplotlib")
    pytest.importorskip("ai_edge_litert")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "coupling_front.py"), *TINY, *extra,
         f"--output_dir={output_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )


@pytest.mark.slow
def test_script_compares_the_three_variants_and_resumes(tmp_path):
    first = _run_script(tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stdout.count(": running") == 4, first.stdout  # dense + 3 variants
    report = json.loads((tmp_path / "coupling.json").read_text())["resnet_small"]
    runs = {r["variant"]: r for r in report["runs"]}
    assert set(runs) == {"layer", "group", "group_macs"}
    for variant in ("group", "group_macs"):
        # group alphas: everything pruned is removed by strip_and_shrink
        assert runs[variant]["removable_share"] == 1.0
        assert runs[variant]["kept_zero_macs"] == 0
    for run in runs.values():
        assert run["max_deviation"] <= 1e-5
        assert run["macs_shrunk"] <= run["macs_dense"]
    assert set(report["tflite_ms"]) == {"dense", "layer_0.5", "group_0.5", "group_macs_0.5"}
    assert all(ms > 0 for ms in report["tflite_ms"].values())
    table = (tmp_path / "coupling.md").read_text()
    assert "group alphas, MAC-weighted decay" in table and "Removed MACs at equal accuracy" in table
    assert (tmp_path / "coupling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    second = _run_script(tmp_path, "--latency_rounds=0")
    assert second.returncode == 0, second.stderr[-4000:]
    assert ": running" not in second.stdout and "pre-training" not in second.stdout
    assert second.stdout.count("done before, skipped") == 4


# A subprocess: coupling_front's absl flags (--epochs ...) clash with mobilenet_prune's,
# which test_mobilenet_prune defines in this process.
@pytest.mark.slow
def test_unknown_variant_is_a_usage_error(tmp_path):
    proc = _run_script(tmp_path, "--variants=layer,grouped")
    assert proc.returncode != 0
    assert "--variants: unknown variant 'grouped'" in proc.stderr
