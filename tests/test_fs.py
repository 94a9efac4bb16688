"""Atomic writes leave files and folders with the modes any other write would give them."""

from __future__ import annotations

import os

from tunelab.fs import atomic_dir, atomic_write_text


def test_atomic_outputs_get_the_umasks_modes_not_tempfiles_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "b.txt").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a.txt").read_text() == "x" and (tmp_path / "folder" / "b.txt").read_text() == "y"
