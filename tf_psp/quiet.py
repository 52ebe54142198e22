"""A quiet console: TensorFlow, absl, tf2onnx and LiteRT log lines off unless asked.

`import tf_psp` calls `quiet_environment()` before anything loads TensorFlow:
it sets `TF_CPP_MIN_LOG_LEVEL=2` unless the user set it, lowers the
`tensorflow` and `tf2onnx` Python loggers unless they already have a level,
and drops the records below ERROR that TensorFlow and tf2onnx log through the
shared `absl` logger (an absl app's own records stay).

Some lines come from C++ code that ignores those settings (TensorFlow's
"oneDNN custom operations are on" banner at import, the TFLite converter's
"Ignored output_format." and "fully_quantize: 0, ...", LiteRT's "Created
TensorFlow Lite XNNPACK delegate"). `native_stderr_filtered()` wraps such
calls: it sends the process's stderr (file descriptor 2) to a temporary
file, restores it, and writes back every captured line that is not known
noise; on an exception it writes back everything. (A crash that kills the
process inside such a call loses what it printed there: run again with
`--verbose`.)

`show_library_logs()` (the CLI's `--verbose`) turns all of this off.

This module imports only the standard library and `absl.logging` (30 ms).
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading

# Environment variables read when TensorFlow loads -> their quiet value.
_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2"}

# Python loggers of the libraries -> the level they get when quiet.
_LOGGER_LEVELS = {"tensorflow": logging.ERROR, "tf2onnx": logging.WARNING}

# Packages whose records on the shared `absl` logger are dropped below ERROR.
_LIBRARY_PACKAGES = ("tensorflow", "tf2onnx", "ai_edge_litert", "onnx", "onnxruntime")

# Lines of native stderr that are noise: glog/absl INFO and WARNING lines
# ("I0000 00:00:17... 1234 file.cc:12] ..."), absl's pre-init banner, TFLite's
# "INFO: ..." lines and the quantizer's parameter dump.
_NOISE = re.compile(
    r"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|INFO: "
    r"|fully_quantize: "
    r"|Estimated count of arithmetic ops"
    r"|\s*$)"
)


class _LibraryRecordFilter(logging.Filter):
    """Drops library records below ERROR from the `absl` logger while quiet.

    TensorFlow logs through absl (`signature_serialization.py:156] Function
    call contains input name(s) resource ...`); an absl app resets the absl
    logger's level when it parses its flags, and the app's own absl records
    must stay, so this filters by the file that logged.
    """

    def filter(self, record):
        if not _state["quiet"] or record.levelno >= logging.ERROR:
            return True
        parts = os.path.normpath(record.pathname or "").split(os.sep)
        return not any(package in parts for package in _LIBRARY_PACKAGES)


_lock = threading.RLock()
_state = {"quiet": True, "environment": {}, "levels": {}, "depth": 0}


def quiet_environment():
    """Sets the quiet defaults, keeping every variable and level already chosen.

    Call before TensorFlow loads (`import tf_psp` does). Idempotent.
    """
    with _lock:
        if not _state["quiet"]:
            return
        for name, value in _ENVIRONMENT.items():
            if name not in os.environ:
                os.environ[name] = value
                _state["environment"][name] = value
        for name, level in _LOGGER_LEVELS.items():
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(level)
                _state["levels"][name] = level
        try:
            # absl must create its logger (an ABSLLogger, which reports the file that
            # called it, not absl's own) before we look it up. A light import.
            import absl.logging  # noqa: F401  # pylint: disable=import-outside-toplevel
        except ImportError:
            return
        absl = logging.getLogger("absl")
        if not any(isinstance(f, _LibraryRecordFilter) for f in absl.filters):
            absl.addFilter(_LibraryRecordFilter())


def show_library_logs():
    """Undoes `quiet_environment()`: the libraries log as they would without tf_psp.

    Environment variables only take effect if TensorFlow has not loaded yet.
    A variable or logger level someone else changed since is left alone.
    """
    with _lock:
        _state["quiet"] = False
        for name, value in _state["environment"].items():
            if os.environ.get(name) == value:
                del os.environ[name]
        for name, level in _state["levels"].items():
            logger = logging.getLogger(name)
            if logger.level == level:
                logger.setLevel(logging.NOTSET)
        _state["environment"].clear()
        _state["levels"].clear()


def is_quiet():
    """True unless `show_library_logs()` was called."""
    return _state["quiet"]


def without_noise(text):
    """`text` without its known library log lines (see the module docstring)."""
    return "".join(
        line for line in text.splitlines(keepends=True) if not _NOISE.match(line)
    )


@contextlib.contextmanager
def native_stderr_filtered():
    """Filters known library log lines out of native stderr while the block runs.

    No-op after `show_library_logs()`, when the user set TF_CPP_MIN_LOG_LEVEL
    to 0 or 1, when nested, or when file descriptor 2 cannot be redirected.
    Lines that are not known noise are written back when the block ends (all
    of them if it raised), so no real error is lost.
    """
    with _lock:
        active = _state["quiet"] and _state["depth"] == 0 and not _user_wants_native_logs()
        saved = None
        if active:
            try:
                _flush_python_stderr()
                saved = os.dup(2)
                capture = tempfile.TemporaryFile()
                os.dup2(capture.fileno(), 2)
            except (OSError, ValueError):
                if saved is not None:
                    os.close(saved)
                saved = None
        _state["depth"] += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        with _lock:
            _state["depth"] -= 1
            if saved is not None:
                _flush_python_stderr()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                text = capture.read().decode("utf-8", errors="replace")
                capture.close()
                kept = text if failed else without_noise(text)
                if kept:
                    os.write(2, kept.encode("utf-8"))


def _user_wants_native_logs():
    """True when the user set TF_CPP_MIN_LOG_LEVEL to 0 or 1 (INFO or WARNING) themselves."""
    name = "TF_CPP_MIN_LOG_LEVEL"
    return name not in _state["environment"] and os.environ.get(name, "").strip() in ("0", "1")


def _flush_python_stderr():
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
