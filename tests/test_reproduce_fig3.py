"""examples/reproduce_fig3.py and examples/pruning_experiments.py.

The script runs end to end in a tiny configuration in a subprocess (as a user
runs it) and resumes from its saved runs; l1-norm pruning removes exactly the
filters with the smallest l1-norm (numpy oracle); the BatchNorm rescaling used
by the frozen-BN recipe keeps the model's function.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import randomize_weights

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import pruning_experiments  # noqa: E402

TINY = ["--methods=wd,magnitude", "--strengths=0.5", "--sparsities=0.5",
        "--pretrain_epochs=1", "--epochs=2", "--finetune_epochs=1", "--steps_per_epoch=2",
        "--widths=4,4,8"]


def _run_script(output_dir):
    pytest.importorskip("matplotlib")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "reproduce_fig3.py"), *TINY,
         f"--output_dir={output_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow  # the script end to end in a subprocess
def test_script_writes_results_and_resumes(tmp_path):
    first = _run_script(tmp_path)
    assert first.count(": running") == 3, first  # dense baseline, wd 0.5, magnitude 0.5
    assert (tmp_path / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "fig3.md").read_text()
    assert "PSP, weight decay on alpha" in table and "l1-norm pruning" in table
    result = json.loads((tmp_path / "fig3.json").read_text())
    assert [(r["method"], r["value"]) for r in result["runs"]] == [("wd", 0.5),
                                                                   ("magnitude", 0.5)]
    magnitude = result["runs"][1]
    assert magnitude["macs_shrunk"] < magnitude["macs_dense"]
    assert 0 < magnitude["mac_reduction"] < 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    second = _run_script(tmp_path)
    assert ": running" not in second and "== pre-training" not in second, second
    assert second.count("done before, skipped") == 3
    assert json.loads((tmp_path / "fig3.json").read_text())["runs"] == result["runs"]


def _tiny_resnet():
    model = pruning_experiments.resnet_small(widths=(6, 8, 10))
    randomize_weights(model, seed=3)
    return model


def test_magnitude_pruning_removes_the_smallest_l1_filters():
    model = _tiny_resnet()
    plan = pruning_experiments.magnitude_pruning_plan(model, sparsity=0.5)
    # Only the first conv of each block: every other producer feeds a residual Add
    # or the model output.
    assert sorted(plan) == ["s1b1_conv1", "s2b1_conv1", "s3b1_conv1"]
    assert pruning_experiments.independent_consumers(model) == [
        "s1b1_conv2", "s2b1_conv2", "s3b1_conv2"]
    for name, entry in plan.items():
        kernel = model.get_layer(name).get_weights()[0]
        norms = np.abs(kernel).sum(axis=(0, 1, 2))
        expected = np.argsort(norms)[: len(norms) // 2]
        assert entry["prune"] == sorted(expected.tolist()), name
        assert entry["consumers"] == [name.replace("conv1", "conv2")]

    shrunk, _ = pruning_experiments.magnitude_prune(model, sparsity=0.5)
    for name, entry in plan.items():
        kept = np.setdiff1d(np.arange(model.get_layer(name).filters), entry["prune"])
        np.testing.assert_array_equal(shrunk.get_layer(name).get_weights()[0],
                                      model.get_layer(name).get_weights()[0][..., kept])
        conv2 = name.replace("conv1", "conv2")
        np.testing.assert_array_equal(shrunk.get_layer(conv2).get_weights()[0],
                                      model.get_layer(conv2).get_weights()[0][:, :, kept])


def test_normalize_batchnorm_scale_keeps_the_function():
    model = _tiny_resnet()
    x = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype("float32")
    before = keras.ops.convert_to_numpy(model(x, training=False))
    normalized = pruning_experiments.normalize_batchnorm_scale(model)
    after = keras.ops.convert_to_numpy(model(x, training=False))
    assert "s1b1_bn1" in normalized and "s2b1_proj_bn" in normalized
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    gamma = model.get_layer("s1b1_bn1").get_weights()[0]
    np.testing.assert_array_equal(gamma, np.ones_like(gamma))


def test_balance_alphas_keeps_the_function_and_balances_the_decays():
    import tf_psp

    model = _tiny_resnet()
    psp = tf_psp.parameterize(model, layers=pruning_experiments.independent_consumers(model),
                              alpha_regularizer=tf_psp.regularizers.WeightDecay(0.1))
    x = np.random.default_rng(1).normal(size=(2, 28, 28, 1)).astype("float32")
    before = keras.ops.convert_to_numpy(psp(x, training=False))
    pruning_experiments.balance_alphas(psp)
    after = keras.ops.convert_to_numpy(psp(x, training=False))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    layer = psp.get_layer("s2b1_conv2")
    alpha = keras.ops.convert_to_numpy(layer.alpha.value)
    kernel = keras.ops.convert_to_numpy(layer.kernel.value)
    # Balanced: lambda * alpha_i**2 == 2 * kd * ||v_i||**2 for every input channel i.
    v_norms = np.sum(np.square(kernel), axis=(0, 1, 3))
    np.testing.assert_allclose(0.1 * alpha ** 2, 2 * 5e-4 * v_norms, rtol=1e-4)
