"""A finished run's model as downloads, made on the server when the dashboard asks (its routes:
serve/routes/dashboard.py):

    adapter   a LoRA run's adapter: its final/ folder (peft's adapter files and the tokenizer), zipped
    merged    the adapter merged into its base, as plain transformers loads it (`tunelab export --format
              safetensors`), zipped
    gguf      one q8_0 GGUF for llama.cpp, Ollama and LM Studio, with its Ollama Modelfile (`tunelab export`)

They are kept in RUN/exports/, named after the run; one older than the run's final model is made again.
One export runs at a time, in a `tunelab export` subprocess that dies with the server (the server keeps
serving meanwhile); at most MAX_WAITING more wait behind it, and a request past that is refused (429).
Progress is the bytes written against what the model's weights make (from their safetensors headers).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import RequestError
from tunelab.rundir import RunDir

KINDS = ("adapter", "merged", "gguf")
LABELS = {
    "adapter": "LoRA adapter (peft)",
    "merged": "merged model (safetensors)",
    "gguf": "GGUF q8_0 (llama.cpp, Ollama)",
}
MAX_WAITING = 4
Q8_0_BYTES = 34 / 32  # a q8_0 block: 32 weights in 32 bytes and a 2-byte scale
FOLDER = "exports"


@dataclass
class Export:
    run: Path
    kind: str
    state: str = "queued"  # queued, running, done, failed
    stage: str = "waiting"
    written: int = 0
    expected: int = 0
    error: str | None = None

    def as_json(self, position: int | None) -> dict:
        progress = 1.0 if self.state == "done" else min(self.written / self.expected, 0.99) if self.expected else 0.0
        return {
            "state": self.state,
            "stage": f"waiting ({position} ahead)" if self.state == "queued" and position else self.stage,
            "progress": round(progress, 4),
            "written": self.written,
            "error": self.error,
        }


def files_of(run: Path, kind: str) -> dict[str, Path]:
    """What an export of `kind` leaves in RUN/exports/: part -> file (`file`, and the GGUF's `modelfile`)."""
    folder, name = run / FOLDER, _stem(run)
    if kind == "adapter":
        return {"file": folder / f"{name}-adapter.zip"}
    if kind == "merged":
        return {"file": folder / f"{name}-merged.zip"}
    return {"file": folder / f"{name}-q8_0.gguf", "modelfile": folder / f"{name}-q8_0.Modelfile"}


class Exports:
    def __init__(self, max_waiting: int = MAX_WAITING):
        self.max_waiting = max_waiting
        self.tasks: dict[tuple[Path, str], Export] = {}
        self.queue: deque[Export] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.process: subprocess.Popen | None = None
        self.closed = False
        self.thread: threading.Thread | None = None

    # --- what the routes ask ----------------------------------------------------------------------------

    def listing(self, run: Path) -> list[dict]:
        """Each kind of export of `run`: whether it can be made (and why not), and where it stands."""
        with self.lock:
            return [self._entry(run, kind) for kind in KINDS]

    def start(self, run: Path, kind: str) -> dict:
        """Queue an export of `run` (nothing new when it is done, queued or running); its entry."""
        if kind not in KINDS:
            raise RequestError(404, f"no export {kind!r}: expected {', '.join(KINDS)}", param="kind")
        with self.lock:
            entry = self._entry(run, kind)
            if not entry["available"]:
                raise RequestError(409 if entry["why"].startswith("the run") else 400, entry["why"], param="kind")
            if entry["state"] in ("queued", "running", "done"):
                return entry
            waiting = sum(task.state == "queued" for task in self.queue)  # behind the one running
            if waiting >= self.max_waiting:
                raise RequestError(
                    429,
                    f"the server makes one export at a time and {waiting} are waiting: ask again when one has finished",
                    code="too_many_exports",
                    kind="rate_limit_error",
                )
            task = Export(run, kind)
            self.tasks[(run, kind)] = task
            self.queue.append(task)
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="tunelab-exports", daemon=True)
                self.thread.start()
            self.wake.set()
            return self._entry(run, kind)

    def file(self, run: Path, kind: str, part: str = "file") -> Path:
        """A finished export's file (404 before it is made)."""
        with self.lock:
            entry = self._entry(run, kind) if kind in KINDS else None
        paths = files_of(run, kind) if entry else {}
        if entry is None or entry["state"] != "done" or part not in paths or not paths[part].is_file():
            raise RequestError(404, f"no {kind} {part} of this run yet: POST to make it first", param="kind")
        return paths[part]

    def close(self) -> None:
        self.closed = True
        self.wake.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _entry(self, run: Path, kind: str) -> dict:
        out = {"kind": kind, "label": LABELS[kind], "available": True, "why": None}
        final = RunDir(run).final
        if not final.is_dir():
            out.update(available=False, why="the run has not finished: its model is exported once it has")
        elif kind == "adapter" and not (final / "adapter_config.json").is_file():
            out.update(available=False, why="a full fine-tune has no adapter: the merged model is its whole model")
        task = self.tasks.get((run, kind))
        paths = files_of(run, kind)
        if task is not None and task.state != "done":
            position = next((i for i, t in enumerate(self.queue) if t is task), None)
            out.update(task.as_json(position))
        elif out["available"] and _current(paths["file"], final):
            out.update(state="done", stage="done", progress=1.0, written=0, error=None)
            out["size"] = paths["file"].stat().st_size
            out["parts"] = [part for part, path in paths.items() if path.is_file()]
            out["filename"] = paths["file"].name
        else:
            out.update(state="none", stage=None, progress=0.0, written=0, error=None)
        return out

    # --- the worker -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self.closed:
            with self.lock:
                task = self.queue[0] if self.queue else None
            if task is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            task.state = "running"
            try:
                self._make(task)
                task.state, task.stage = "done", "done"
            except Exception as e:  # noqa: BLE001 (whatever went wrong is the export's error, not the server's)
                task.state, task.stage = "failed", "failed"
                task.error = str(e) if isinstance(e, RequestError | OSError) else f"{type(e).__name__}: {e}"
            finally:
                with self.lock:
                    self.queue.popleft()
                    if task.state == "done":
                        self.tasks.pop((task.run, task.kind), None)  # the file on disk says it from now on

    def _make(self, task: Export) -> None:
        from tunelab.fs import atomic_file

        run, final = task.run, RunDir(task.run).final
        folder = run / FOLDER
        folder.mkdir(exist_ok=True)
        out = files_of(run, task.kind)["file"]
        if task.kind == "gguf":
            parameters = _parameters(final)
            task.expected = int(parameters * Q8_0_BYTES)
            self._export(task, [str(out), "--format", "gguf", "--type", "q8_0"], folder)
            return
        source = final
        if task.kind == "merged":
            source = folder / f".{out.stem}"  # dot-named: half-written, never mistaken for an export
            shutil.rmtree(source, ignore_errors=True)
            task.expected = _parameters(final) * 4  # merged in fp32, as `tunelab export` writes it
            try:
                self._export(task, [str(source), "--format", "safetensors"], folder)
                self._zip(task, source, out, atomic_file)
            finally:
                shutil.rmtree(source, ignore_errors=True)
            return
        self._zip(task, source, out, atomic_file)

    def _export(self, task: Export, args: list[str], folder: Path) -> None:
        """`tunelab export RUN ARGS --force` in a subprocess that dies with the server; the bytes it has
        written in `folder` counted every half second."""
        from tunelab.launch import last_error

        before = _size(folder)
        log = folder / "export.log"
        command = [sys.executable, "-m", "tunelab", "export", str(task.run), *args, "--force"]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tunelab.jobs.child", str(os.getpid()), "--", *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
            )
        task.stage = "loading the model"
        while self.process.poll() is None:
            if self.closed:
                self.process.kill()
            time.sleep(0.5)
            task.written = max(_size(folder) - before, 0)
            if task.written:
                task.stage = "writing"
        code = self.process.returncode
        self.process = None
        if code != 0:
            raise RequestError(500, f"the export failed: {last_error(log, code, 'the export')}")

    def _zip(self, task: Export, source: Path, out: Path, atomic_file) -> None:
        """`source` as a zip (stored: weights barely compress), counted as it is written."""
        files = sorted(p for p in source.rglob("*") if p.is_file())
        task.stage, task.written, task.expected = "packing", 0, sum(p.stat().st_size for p in files)
        with atomic_file(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for path in files:
                with (
                    open(path, "rb") as f,
                    archive.open(path.relative_to(source).as_posix(), "w", force_zip64=True) as z,
                ):
                    while chunk := f.read(1 << 22):
                        z.write(chunk)
                        task.written += len(chunk)
                        if self.closed:
                            raise RequestError(503, "the server stopped")


def _stem(run: Path) -> str:
    """The name an export's files take: the run's folder (a job's run: the job's id), plain characters only."""
    name = run.parent.name if run.name == "run" and run.parent.name.startswith("ftjob-") else run.name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"


def _current(path: Path, final: Path) -> bool:
    """An export made from the run's final model as it is now (a run trained again has a newer one)."""
    try:
        return path.stat().st_mtime >= final.stat().st_mtime
    except OSError:
        return False


def _size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):  # a file renamed or removed while we count
            total += path.stat().st_size if path.is_file() else 0
    return total


def _parameters(final: Path) -> int:
    """The model's parameter count, from the safetensors of the run's model (its base for an adapter)."""
    from safetensors import safe_open

    from tunelab.models.load import base_folder

    try:
        folder = base_folder(final, prepare=False)
    except Exception:  # noqa: BLE001 (an estimate only: progress then counts bytes without a total)
        return 0
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:  # the header only: no tensor is read
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total
