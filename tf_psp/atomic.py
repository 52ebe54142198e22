"""Atomic file output: write beside the target, then rename over it.

A reader (or a crash) never sees a half-written model, report or export.
"""

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def temp_file_beside(path, suffix=".tmp"):
    """Yields a temporary file path beside `path`; renames it to `path` on success.

    The file gets the mode `open()` would give a new file (not mkstemp's 0600).
    On failure the temporary file is removed and `path` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_bytes(path, content):
    """Writes `content` (bytes) to `path` atomically."""
    with temp_file_beside(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text):
    """Writes `text` to `path` atomically (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def directory_beside(path):
    """Yields a temporary directory beside `path`, moved to `path` on success.

    An existing directory at `path` is renamed away first and deleted once the
    new one is in place (restored if the move fails).
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".old")
            os.rmdir(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
