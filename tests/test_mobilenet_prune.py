"""examples/mobilenet_prune.py end to end, flag errors, and resumption after a kill."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "mobilenet_prune.py"
REPORT_FILES = ("report.json", "report.md", "alpha_histogram.png", "layer_widths.png",
                "training.png")
STOP_STATUS = 75

# A tiny CIFAR-style ResNet-8 on 96 MNIST digits: seconds per run.
TINY_RESNET = ["--model=resnet", "--resnet_depth=8", "--image_size=32", "--train_limit=96",
               "--val_limit=32", "--batch_size=16", "--steps_per_epoch=3",
               "--recalibrate_steps=2", "--alpha_decay=0.5", "--learning_rate=0.05",
               "--verbose=0"]


def _run(args, timeout=900):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(SCRIPT)] + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _run_in_process(args, capsys):
    """Runs the script's `main` through absl's `app.run` here; returns (status, stdout, stderr).

    For checks that end before any training (flag errors, --helpfull): the same
    code path as the script, without a process start.
    """
    from absl import app

    sys.path.insert(0, str(ROOT / "examples"))
    import mobilenet_prune

    mobilenet_prune.FLAGS.unparse_flags()
    try:
        with pytest.raises(SystemExit) as exit_:
            app.run(mobilenet_prune.main, argv=[str(SCRIPT), *args])
    finally:
        mobilenet_prune.FLAGS.unparse_flags()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def _ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def _report(directory):
    return json.loads((directory / "report.json").read_text())


def _weights(path):
    import h5py

    arrays = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            arrays[name] = np.array(item)
        # returning None keeps h5py visiting

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


@pytest.mark.slow
def test_mobilenetv2_tiny_run_writes_every_report_file(tmp_path):
    out = tmp_path / "mnv2"
    result = _ok(_run(["--image_size=32", "--alpha_width=0.35", "--train_limit=32",
                       "--val_limit=16", "--batch_size=16", "--steps_per_epoch=1",
                       "--pretrain_epochs=0", "--epochs=1", "--recalibrate_steps=1",
                       "--alpha_decay=1.0", "--nofold_batchnorm", "--noexport",
                       "--nobenchmark", "--verbose=0",
                       f"--output_dir={out}"]))
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert "PSP sparsity" in result.stdout  # PSPMonitor's per-epoch line
    report = _report(out)
    assert report["model"] == "mobilenetv2"
    assert report["macs"]["dense"] >= report["macs"]["shrunk"] > 0
    assert report["max_rel_deviation"] < 1e-4
    # Kept BatchNorm would hide depthwise 'channel' alphas; the stem reads the input.
    assert "block_1_depthwise" in report["layers_without_alphas"]
    assert "Conv1" in report["layers_without_alphas"]
    assert "block_1_project" in report["parameterized_layers"]
    assert report["folded_batchnorms"] == []
    assert set(report["history"]["psp"]) == {"0"}
    assert "| accuracy before (dense) |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_keep_macs_prunes_to_the_budget(tmp_path):
    out = tmp_path / "budget"
    result = _ok(_run(TINY_RESNET + ["--epochs=2", "--pretrain_epochs=1", "--keep_macs=0.5",
                                     "--noexport", "--nobenchmark", f"--output_dir={out}"]))
    assert "PruneToBudget: selected" in result.stdout
    assert "budget: keeps" in result.stdout  # PSPMonitor's budget progress
    report = _report(out)
    kept = report["macs"]["shrunk"] / report["macs"]["dense"]
    assert 0.47 <= kept <= 0.5, kept
    assert report["max_rel_deviation"] < 1e-4


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = TINY_RESNET + ["--epochs=2", "--pretrain_epochs=1", "--finetune_epochs=1",
                            "--round_to=4"]
    # The uninterrupted run also covers export and benchmark (flags a resume may change).
    result = _ok(_run(common + [f"--output_dir={straight}", "--bench_rounds=2",
                                "--bench_threads=1", "--int8_calibration_steps=1"]))
    _check_exports_and_benchmark(straight, result)
    first = _run(common + [f"--output_dir={killed}", "--stop_after_epoch=1", "--noexport",
                           "--nobenchmark"])
    assert first.returncode == STOP_STATUS, first.stderr[-3000:]
    assert not (killed / "report.json").exists()
    assert set(json.loads((killed / "history.json").read_text())["psp"]) == {"0"}
    second = _ok(_run(common + [f"--output_dir={killed}", "--noexport", "--nobenchmark"]))
    assert "psp: resuming at epoch 2" in second.stdout
    a = _weights(straight / "state" / "psp.weights.h5")
    b = _weights(killed / "state" / "psp.weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    ra, rb = _report(straight), _report(killed)
    assert set(rb["history"]["psp"]) == {"0", "1"} and set(rb["history"]["pretrain"]) == {"0"}
    for phase in ("pretrain", "psp", "finetune"):
        for epoch, logs in ra["history"][phase].items():
            for key, value in logs.items():
                assert rb["history"][phase][epoch][key] == pytest.approx(value, rel=1e-4, abs=1e-5)
    for key, value in ra["accuracy"].items():
        assert rb["accuracy"][key] == pytest.approx(value, abs=1e-6), key
    # Resuming with different training flags is refused, naming them.
    changed = _run(common + [f"--output_dir={killed}", "--alpha_decay=0.1"])
    assert changed.returncode == 2 and "--alpha_decay=0.5" in changed.stderr


def _check_exports_and_benchmark(out, result):
    report = _report(out)
    assert set(report["exports"]) == {"dense.tflite", "shrunk.tflite", "shrunk_int8.tflite",
                                      "shrunk.onnx"}
    for name, export in report["exports"].items():
        assert (out / export["path"]).stat().st_size == export["size_bytes"]
        if "int8" not in name:
            assert export["max_rel_error"] < 1e-3, name
    (row,) = report["benchmark"]["tflite"]
    assert row["num_threads"] == 1 and row["runs"] == 2 and row["speedup"] > 0
    assert report["accuracy"]["finetuned"] is not None
    assert set(report["history"]["finetune"]) == {"0"}
    assert "TFLite speed-up" in result.stdout
    assert "s1b1_bn1" in report["folded_batchnorms"]  # --fold_batchnorm is the default
    for name in REPORT_FILES:
        assert (out / name).exists(), name


@pytest.mark.parametrize("args, flag", [
    (["--dataset=imagenet"], "--dataset"),
    (["--dataset=folder"], "--data_dir"),
    (["--image_size=0"], "--image_size"),
    (["--lr_boundaries=5,x"], "--lr_boundaries"),
])
def test_bad_flags_fail_with_a_message_naming_the_flag(args, flag, tmp_path, capsys):
    status, _, stderr = _run_in_process(args + [f"--output_dir={tmp_path}"], capsys)
    assert status != 0
    lines = [line for line in stderr.splitlines() if flag in line]
    assert lines, stderr[-2000:]
    assert "Traceback" not in stderr


def test_helpfull_documents_every_flag(capsys):
    _, stdout, _ = _run_in_process(["--helpfull"], capsys)  # absl exits with status 1 after help
    for flag in ("dataset", "data_dir", "weights", "alpha_width", "image_size", "structure",
                 "epsilon", "alpha_decay", "learning_rate", "momentum", "epochs", "batch_size",
                 "steps_per_epoch", "pretrain_epochs", "round_to", "finetune_epochs",
                 "bench_rounds", "benchmark", "output_dir", "stop_after_epoch", "model"):
        assert f"--{flag}" in stdout or f"--[no]{flag}" in stdout, flag


@pytest.mark.parametrize("name", ["demo.cfg", "cifar10-resnet56.cfg", "imagenette.cfg"])
def test_flagfiles_parse_and_pass_the_checks(name, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import mobilenet_prune  # registers its flags on absl's FLAGS

    flags = mobilenet_prune.FLAGS
    flags.unparse_flags()
    try:
        flags(["mobilenet_prune.py", f"--flagfile={ROOT / 'examples' / 'flags' / name}",
               f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}"])
        mobilenet_prune.check_flags()
        assert flags.output_dir == str(tmp_path / "out")
        if name == "cifar10-resnet56.cfg":
            assert (flags.model, flags.resnet_depth, flags.structure) == ("resnet", 56, "column")
            assert flags.learning_rate == 0.1 and flags.lr_boundaries == ["100", "150"]
        if name == "imagenette.cfg":
            assert (flags.dataset, flags.image_size) == ("folder", 160)
    finally:
        flags.unparse_flags()


def test_weights_file_is_loaded_and_bad_paths_are_named(tmp_path):
    import keras

    sys.path.insert(0, str(ROOT / "examples"))
    import models

    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None, pooling="avg")
    rng = np.random.default_rng(0)
    base.set_weights([rng.normal(size=w.shape).astype("float32") for w in base.get_weights()])
    path = str(tmp_path / "mobilenet_v2_0.35_no_top.weights.h5")
    base.save_weights(path)
    model = models.mobilenetv2(32, 10, alpha_width=0.35, weights=path)
    np.testing.assert_array_equal(model.get_layer("Conv1").kernel.numpy(),
                                  base.get_layer("Conv1").kernel.numpy())
    assert model.output_shape == (None, 10)
    with pytest.raises(ValueError, match="--weights=.*no such file"):
        models.mobilenetv2(32, 10, weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="--resnet_depth=9"):
        models.resnet_cifar(9)
