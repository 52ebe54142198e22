"""Nothing lost: public functions never modify the model they are given, and files are atomic.

Every public function that takes a model is called on a PSP model and its
weights are compared before and after (a guard test makes sure new functions
get a case here). Every file tf_psp writes goes through `tf_psp.atomic`, and a
write that fails leaves no partial file at the destination (and keeps what was
there before).
"""

import inspect
import io
import os
import pathlib
import re
import tokenize

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import atomic, bench, cli
from tf_psp import export as tf_psp_export

from conftest import assert_weights_unchanged, randomize_weights, weights_snapshot

L = keras.layers
ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="exports need the TensorFlow backend")


def _psp_model():
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(6, 1, name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(3, name="fc")(x), name="net")
    psp = tf_psp.parameterize(randomize_weights(model),
                              structure=lambda layer: "filter" if layer.name == "c1" else "channel")
    psp.get_layer("c1").alpha.assign(np.array([1, 0, 1, 1, 0, 1, 1, 1], "float32"))
    return psp


def _x(batch=4):
    return np.random.default_rng(0).normal(size=(batch, 8, 8, 3)).astype("float32")


def _monitor(model, _):
    callback = tf_psp.PSPMonitor(log_pruned_macs=True)
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_end(0, logs={})


# name -> call(model, directory): every public function taking a model.
CASES = {
    "parameterize": lambda m, d: tf_psp.parameterize(m, structure="column"),
    "parameterize_group": lambda m, d: tf_psp.parameterize(tf_psp.strip(m), coupling="group"),
    "profile": lambda m, d: tf_psp.profile(m),
    "removability": lambda m, d: tf_psp.removability(m),
    "strip": lambda m, d: tf_psp.strip(m),
    "strip_and_shrink": lambda m, d: tf_psp.strip_and_shrink(m, round_to=4, return_report=True),
    "recalibrate_batchnorm": lambda m, d: tf_psp.recalibrate_batchnorm(m, _x(8), batch_size=4),
    "batchnorm_statistics": lambda m, d: tf_psp.batchnorm.batchnorm_statistics(m, _x(8)),
    "fold_batchnorm": lambda m, d: tf_psp.batchnorm.fold_batchnorm(m),
    "balance_alphas": lambda m, d: tf_psp.balance_alphas(m, kernel_decay=1e-4),
    "PSPMonitor": _monitor,
    "pruning_plan": lambda m, d: tf_psp.pruning_plan(m).select(0.8),
    "latency_table": lambda m, d: tf_psp.latency_table(m, points=2, runs=2, cache_dir=d,
                                                       quantum=8, progress=False),
    "prune_to_budget": lambda m, d: tf_psp.prune_to_budget(m, keep_macs=0.8, return_report=True,
                                                           measure=True),
    "prune": lambda m, d: tf_psp.prune(m, (_x(8), np.zeros(8, "int32")),
                                       keep_macs=0.8, epochs=1, fine_tune_epochs=1,
                                       loss="sparse_categorical_crossentropy", verbose=0),
    "export": lambda m, d: tf_psp_export.export(m, os.path.join(d, "a.tflite"), "tflite"),
    "export_saved_model": lambda m, d: tf_psp_export.export_saved_model(m, os.path.join(d, "sm")),
    "export_tflite": lambda m, d: tf_psp_export.export_tflite(
        m, os.path.join(d, "b.tflite"), quantization="int8", representative_data=_x(8)),
    "export_onnx": lambda m, d: tf_psp_export.export_onnx(m, os.path.join(d, "c.onnx")),
    "keras_timer": lambda m, d: bench.keras_timer(m, _x(1))(),
    "time_keras": lambda m, d: bench.time_keras(m, _x(1), warmup=1, runs=1),
}
# Functions that take a model and change it on purpose.
MODIFIES_BY_DESIGN = {
    "assign_batchnorm_statistics": "writes the given statistics into the model",
}


def _public_functions_taking_a_model():
    modules = [tf_psp, tf_psp_export, bench, tf_psp.batchnorm]
    names = set()
    for module in modules:
        public = (getattr(module, "__all__", None)
                  or [n for n in dir(module) if not n.startswith("_")])
        for name in public:
            function = getattr(module, name, None)
            if not inspect.isfunction(function) or (
                    module is not tf_psp and function.__module__ != module.__name__):
                continue
            parameters = list(inspect.signature(function).parameters)
            if parameters and parameters[0] == "model":
                names.add(name)
    return names


def test_every_public_function_taking_a_model_has_a_case():
    missing = _public_functions_taking_a_model() - set(CASES) - set(MODIFIES_BY_DESIGN)
    assert not missing, f"add a case to CASES (or MODIFIES_BY_DESIGN, with why): {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_function_leaves_the_model_unchanged(name, tmp_path):
    model = _psp_model()
    before = weights_snapshot(model)
    names = [layer.name for layer in model.layers]
    reference = keras.ops.convert_to_numpy(model(_x(), training=False))
    CASES[name](model, str(tmp_path))
    assert_weights_unchanged(before, model)
    assert [layer.name for layer in model.layers] == names
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(_x(), training=False)),
                                  reference)


# --- atomic files -------------------------------------------------------------------

# Matched against the tokens of a line joined by single spaces.
_WRITES = re.compile(
    r"""\bopen \(.*["'][wax]b?\+?["']|\bnp \. save|\bjson \. dump \(|\. write_(text|bytes) \(|"""
    r"""\. (save|export|write_out|to_csv|savefig) \(|\bshutil \. (copy\w*|move)\b""")
# tf_psp.export's own functions (atomic themselves).
_TF_PSP_EXPORT = re.compile(r"\bexport \. export(_\w+)? \(")
# Writes into a temporary path that tf_psp.atomic (or a TemporaryDirectory) owns.
_INTO_TEMPORARY = {
    ("cli.py", "model.save(tmp, overwrite=True)"),
    ("export.py", 'model.export(tmp_dir, format="tf_saved_model", verbose=False)'),
    ("export.py", "archive.write_out(saved_model, verbose=False)"),
    ("latency_targets.py", "archive.write_out(saved, verbose=False)"),
    ("latency.py", 'fig.savefig(tmp, dpi=110, bbox_inches="tight")'),
    # methods that write through tf_psp.atomic themselves
    ("latency.py", "cache.save()  # a long build loses nothing when stopped"),
    ("latency.py", "table.save(path)"),
    ("cli.py", "table.save(args.output)"),
}


def _code_lines(path):
    """(line number, code) of `path` without comments and triple-quoted strings."""
    lines = {}
    with open(path, "rb") as f:
        for token in tokenize.tokenize(f.readline):
            docstring = (token.type == tokenize.STRING
                         and token.string.lstrip("rbuRBU")[:3] in ('"""', "'''"))
            if token.type in (tokenize.COMMENT, tokenize.ENCODING) or docstring:
                continue
            lines.setdefault(token.start[0], []).append(token.string)
    return [(number, " ".join(parts)) for number, parts in sorted(lines.items())]


def test_every_file_write_in_tf_psp_goes_through_atomic():
    direct = []
    for path in sorted((ROOT / "tf_psp").glob("*.py")):
        if path.name == "atomic.py":
            continue
        source = path.read_text().splitlines()
        for number, code in _code_lines(path):
            line = source[number - 1].strip() if number <= len(source) else ""
            if (_WRITES.search(code) and "atomic ." not in code
                    and not _TF_PSP_EXPORT.search(code)
                    and (path.name, line) not in _INTO_TEMPORARY):
                direct.append(f"{path.name}:{number}: {line}")
    assert not direct, "write through tf_psp.atomic instead:\n" + "\n".join(direct)


def _failing_fsync(fd):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_failed_file_export_keeps_the_old_file_and_leaves_no_partial_one(kind, tmp_path,
                                                                         monkeypatch):
    target = tmp_path / f"model.{kind}"
    target.write_bytes(b"the previous export")
    monkeypatch.setattr(atomic.os, "fsync", _failing_fsync)
    function = tf_psp_export.export_tflite if kind == "tflite" else tf_psp_export.export_onnx
    with pytest.raises(OSError, match="No space left"):
        function(tf_psp.strip(_psp_model()), str(target))
    assert target.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_failed_saved_model_export_keeps_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "saved_model"
    target.mkdir()
    (target / "marker.txt").write_text("previous")

    def failing_export(model, path, **kwargs):
        with open(os.path.join(path, "saved_model.pb"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("interrupted while writing")

    monkeypatch.setattr(keras.Model, "export", failing_export)
    with pytest.raises(RuntimeError, match="interrupted"):
        tf_psp_export.export_saved_model(_psp_model(), str(target))
    assert sorted(p.name for p in target.iterdir()) == ["marker.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["saved_model"]


def test_failed_cli_shrink_leaves_no_output_and_the_input_file_intact(tmp_path, monkeypatch):
    source, output = tmp_path / "psp.keras", tmp_path / "small.keras"
    _psp_model().save(source)
    original = source.read_bytes()
    real_save = keras.Model.save

    def failing_save(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", failing_save)
    err = io.StringIO()
    status = cli.main(["shrink", str(source), str(output)], out=io.StringIO(), err=err)
    assert status == 1 and "No space left" in err.getvalue()
    assert not output.exists()
    assert source.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["psp.keras"]
