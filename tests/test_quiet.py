"""A quiet console (tf_psp.quiet) and a light `import tf_psp` (lazy public names)."""

import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest

import tf_psp
from tf_psp import quiet

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lines TensorFlow, the TFLite converter and LiteRT print to stderr (copied from real runs).
_NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796469912.067421    4756 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results.\n",
    "W0000 00:00:1796469916.610732    4756 tf_tfl_flatbuffer_helpers.cc:364] Ignored "
    "output_format.\n",
    "I0000 00:00:1796469916.611141    4756 reader.cc:83] Reading SavedModel from: /tmp/x\n",
    "fully_quantize: 0, inference_type: 6, input_inference_type: INT8, "
    "output_inference_type: INT8\n",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
]
# Lines a user must see.
_REAL = [
    "E0000 00:00:1796469916.610732    4756 kernel.cc:12] a real TensorFlow error\n",
    "Traceback (most recent call last):\n",
    "ValueError: something the user must read\n",
]


def _mixed():
    lines = []
    for i, noise in enumerate(_NOISE):
        lines.append(noise)
        if i < len(_REAL):
            lines.append(_REAL[i])
    return "".join(lines)


def test_without_noise_keeps_exactly_the_real_lines():
    assert quiet.without_noise(_mixed()) == "".join(_REAL)


def test_native_stderr_filtered_drops_noise_and_writes_back_the_rest(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # 0 or 1 would ask for the logs
    before = os.fstat(2)
    with quiet.native_stderr_filtered():
        os.write(2, _mixed().encode())
        with quiet.native_stderr_filtered():  # nested: no second redirection
            os.write(2, _NOISE[0].encode())
    os.write(2, b"after the block\n")
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    assert capfd.readouterr().err == "".join(_REAL) + "after the block\n"


def test_native_stderr_filtered_writes_everything_back_on_an_exception(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # 0 or 1 would ask for the logs
    with pytest.raises(RuntimeError, match="boom"):
        with quiet.native_stderr_filtered():
            os.write(2, _mixed().encode())
            raise RuntimeError("boom")
    assert capfd.readouterr().err == _mixed()


def _library_record(pathname, level):
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_absl_records_of_libraries_are_dropped_below_error():
    (record_filter,) = [f for f in logging.getLogger("absl").filters
                        if type(f).__name__ == "_LibraryRecordFilter"]
    tf_file = os.path.join(os.sep, "venv", "site-packages", "tensorflow", "python", "saved.py")
    app_file = os.path.join(os.sep, "home", "me", "my_app.py")
    assert not record_filter.filter(_library_record(tf_file, logging.INFO))
    assert not record_filter.filter(_library_record(tf_file, logging.WARNING))
    assert record_filter.filter(_library_record(tf_file, logging.ERROR))
    assert record_filter.filter(_library_record(app_file, logging.INFO))


# --- in a fresh interpreter (no TensorFlow loaded: fast) ---------------------------


def _python(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_changes)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_sets_the_log_level_unless_the_user_chose_one():
    code = "import os, tf_psp; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    assert _python(code).strip() == "2"
    assert _python(code, TF_CPP_MIN_LOG_LEVEL="0").strip() == "0"


def test_a_user_asking_for_tensorflow_logs_gets_them_unfiltered():
    code = ("import os, tf_psp; "
            "with_filter = tf_psp.quiet.native_stderr_filtered(); "
            "with_filter.__enter__(); os.write(2, b'I0000 00:00:17.5 1 port.cc:1] info\\n'); "
            "with_filter.__exit__(None, None, None)")
    for level, shown in (("0", True), ("1", True), ("3", False), (None, False)):
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        if level is not None:
            env["TF_CPP_MIN_LOG_LEVEL"] = level
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=120, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert ("port.cc:1] info" in result.stderr) == shown, (level, result.stderr)


def test_import_keeps_a_logger_level_the_user_chose():
    code = ("import logging; logging.getLogger('tensorflow').setLevel(logging.DEBUG); "
            "import tf_psp; "
            "print(logging.getLogger('tensorflow').level, logging.getLogger('tf2onnx').level)")
    assert _python(code).split() == [str(logging.DEBUG), str(logging.WARNING)]


def test_absl_keeps_its_own_logger_class_when_tf_psp_comes_first():
    # A plain logging.Logger named 'absl' would report absl's own file as the caller
    # of every record, so the library filter could not tell TensorFlow's records.
    code = "import logging, tf_psp; print(type(logging.getLogger('absl')).__name__)"
    assert _python(code).strip() == "ABSLLogger"


def test_show_library_logs_undoes_the_defaults():
    code = ("import logging, os, tf_psp; tf_psp.quiet.show_library_logs(); "
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), "
            "logging.getLogger('tensorflow').level, tf_psp.quiet.is_quiet())")
    assert _python(code).split() == ["None", "0", "False"]


def test_import_is_lazy_yet_every_public_name_is_there():
    code = ("import sys, tf_psp; "
            "heavy = [m for m in ('keras', 'tensorflow', 'numpy') if m in sys.modules]; "
            "missing = sorted(set(tf_psp.__all__) - set(dir(tf_psp))); "
            "print(heavy, missing, tf_psp.__version__)")
    assert _python(code).strip() == f"[] [] {tf_psp.__version__}"


def test_public_names_resolve_to_their_modules():
    for name in tf_psp.__all__:
        value = getattr(tf_psp, name)
        module = getattr(value, "__module__", None) or value.__name__
        assert module.startswith("tf_psp."), (name, module)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        tf_psp.no_such_name  # noqa: B018


def _imports_of(module):
    """The tf_psp modules `module` imports at its top level."""
    text = (ROOT / "tf_psp" / f"{module}.py").read_text()
    names = set(re.findall(r"^from tf_psp\.(\w+) import", text, re.M))
    for group in re.findall(r"^from tf_psp import \(?([\w, \n]+?)\)?$", text, re.M):
        names |= {part.split(" as ")[0].strip() for part in group.split(",") if part.strip()}
    return names


def test_every_module_that_registers_keras_classes_is_imported_with_keras():
    registering = {
        path.stem for path in (ROOT / "tf_psp").glob("*.py")
        if "register_keras_serializable" in path.read_text()}
    imported = set(tf_psp._SERIALIZABLE_MODULES)
    for module in tf_psp._SERIALIZABLE_MODULES:
        imported |= _imports_of(module)
    assert {"layers", "group_alphas", "regularizers"} <= registering
    assert registering <= imported, sorted(registering - imported)


def test_setup_reads_the_version_from_the_package():
    setup = (ROOT / "setup.py").read_text()
    assert not re.search(r"""version\s*=\s*["']""", setup), "setup.py repeats the version"
    result = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == tf_psp.__version__


@pytest.mark.slow  # loads TensorFlow in a fresh interpreter
@pytest.mark.parametrize("first_import", ["tf_psp", "tf_psp.compat"])
def test_a_psp_model_loads_after_import_tf_psp_before_keras(tmp_path, first_import):
    import keras

    inputs = keras.Input((6, 6, 3))
    outputs = keras.layers.Conv2D(4, 3, name="c")(inputs)
    psp = tf_psp.parameterize(keras.Model(inputs, outputs), structure="channel")
    path = tmp_path / "psp.keras"
    psp.save(path)
    code = (f"import {first_import}, keras; "
            f"model = keras.models.load_model({str(path)!r}); "
            "print(type(model.get_layer('c')).__name__)")
    assert _python(code).strip() == type(psp.get_layer("c")).__name__ == "PSPConv2D"
