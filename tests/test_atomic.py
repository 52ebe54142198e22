"""Atomic writes: a failure leaves the old file intact and no temporary files behind."""

import os

import pytest

from tf_psp import atomic


def test_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    atomic.write_text(str(path), "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.temp_file_beside(str(path), suffix=".keras") as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.keras"]


def test_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "saved"
    target.mkdir()
    (target / "stale.txt").write_text("x")
    with atomic.directory_beside(str(target)) as tmp:
        with open(os.path.join(tmp, "fresh.txt"), "w") as f:
            f.write("y")
    assert sorted(os.listdir(target)) == ["fresh.txt"]
    assert os.listdir(tmp_path) == ["saved"]
