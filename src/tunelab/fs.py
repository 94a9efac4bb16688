"""Atomic writes (a crash leaves either the old file, or nothing, or the complete new one, never half), and
folder scans kept for a few seconds (`Rescanned`)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_jsonl(path: str | Path, rows) -> None:
    """`rows` (JSON values) one a line, written as atomic_write_text writes text."""
    import json

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def atomic_save_tensors(path: str | Path, tensors: dict) -> None:
    """A safetensors file written as atomic_write_text writes text."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, tmp)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; the file written there replaces `path` (fsynced,
    renamed) only if the block succeeds, and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private to its writer
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it to `final` only if the block succeeds.

    The temporary name starts with a dot and carries the process id, so a half-written directory
    left by a killed process is never mistaken for a finished one (see `remove_stale`).
    If `final` appeared meanwhile (another process finished first), ours is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=partial_prefix(final.name) + f"{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700, as for atomic_file
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.rename(tmp, final)  # atomic on POSIX; fails if `final` exists and is not empty
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def partial_prefix(name: str) -> str:
    return f".partial-{name}-"


def remove_stale(parent: Path, prefix: str) -> None:
    """Delete `PREFIX<pid>-*` temporary directories whose process is gone (it crashed or was killed)."""
    if not parent.is_dir():
        return
    for tmp in parent.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


class Rescanned:
    """A dict that `scan` reads (a folder's runs), read again when it is older than `max_age` seconds, or
    at once for a key it lacks (a run that just appeared); one scan at a time, the others wait for it."""

    def __init__(self, scan, max_age: float):
        self.scan, self.max_age = scan, max_age
        self.found: dict = {}
        self.scanned_at = float("-inf")
        self.lock = threading.Lock()

    def all(self) -> dict:
        if time.monotonic() - self.scanned_at > self.max_age:
            self.rescan()
        return self.found

    def get(self, key, rescan_on_miss: bool = True):
        found = self.all().get(key)
        return self.rescan().get(key) if found is None and rescan_on_miss else found

    def rescan(self) -> dict:
        started = time.monotonic()
        with self.lock:
            if self.scanned_at < started:  # else a scan that began while we waited has just read everything
                self.found, self.scanned_at = self.scan(), time.monotonic()
            return self.found

    def expire(self) -> None:
        self.scanned_at = float("-inf")
