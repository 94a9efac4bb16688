"""A run directory, the one owner of its layout: every module that reads or writes a run goes through
`RunDir` (the trainer writes it; the CLI, evaluation, the server, the dashboard and the jobs runner read it).

    RUN/
      config.yaml       the resolved run config (written once, when the run starts)
      started.json      when it started (a copied run keeps its own start, not the copy's time)
      progress.json     where it is: step, total steps, ETA, tokens/s, updated_at (at each train log line)
      metrics.jsonl     one JSON object per logged step or evaluation
      checkpoints/      step-N/ folders (a temporary name, then renamed)
      final/            the model (or adapter) plain transformers / peft load, with its tokenizer
      summary.json      final metrics, tokens/s, peak memory, wall time: the run has finished
      failed.json       what stopped it, in the user's terms: the run has failed

A run is named by its path relative to the folder it was found in (`runs/nested/dpo-run` under `runs/`
is `nested/dpo-run`): one rule for the server, the dashboard and `--runs`; unique by construction.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.fs import atomic_write_text

RUNNING_FOR = 120.0  # seconds since the last progress.json (or the start) within which a run counts as running


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # --- its files -------------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.json"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def failure_file(self) -> Path:
        return self.path / "failed.json"

    @property
    def started_file(self) -> Path:
        return self.path / "started.json"

    # --- what it is --------------------------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether it is a tunelab run (a config.yaml, and not a Hugging Face model's config.json)."""
        return self.config.is_file() and not (self.path / "config.json").exists()

    def is_finished(self) -> bool:
        """It has a final model (something to serve, evaluate or export)."""
        return self.final.is_dir()

    def summary(self) -> dict | None:
        return read_json(self.summary_file)

    def progress(self) -> dict | None:
        return read_json(self.progress_file)

    def failure(self) -> dict | None:
        """{"error": what stopped it, "at": when}, or None."""
        return read_json(self.failure_file)

    def status(self, now: float | None = None) -> str:
        """finished (summary.json), failed (failed.json), running (progress within the last two minutes),
        or stopped (killed, or interrupted, before it finished)."""
        now = time.time() if now is None else now
        if self.summary_file.is_file():
            return "finished"
        if self.failure_file.is_file():
            return "failed"
        progress = self.progress()
        last = progress["updated_at"] if progress else self.started_at()
        return "running" if now - last < RUNNING_FOR else "stopped"

    def started_at(self) -> float:
        """When the run started, from its own record (a run from before the record: its config's time)."""
        record = read_json(self.started_file)
        if isinstance(record, dict) and isinstance(record.get("at"), (int, float)):
            return float(record["at"])
        try:
            return self.config.stat().st_mtime
        except OSError:
            return 0.0

    # --- what the trainer writes -------------------------------------------------------------------------

    def record_start(self) -> None:
        atomic_write_text(self.started_file, json.dumps({"at": round(time.time(), 3)}) + "\n")

    def record_failure(self, message: str) -> None:
        atomic_write_text(self.failure_file, json.dumps({"error": message, "at": round(time.time(), 3)}) + "\n")

    def clear_failure(self) -> None:
        self.failure_file.unlink(missing_ok=True)

    # --- finding runs ------------------------------------------------------------------------------------

    def name_under(self, root: Path) -> str:
        """Its name: the path relative to `root`, the folder it was found in."""
        return self.path.relative_to(root).as_posix()


def find_runs(root: Path | None) -> dict[str, RunDir]:
    """name -> run, for every run below `root` (not `root` itself, nor below a hidden folder)."""
    if root is None or not root.is_dir():
        return {}
    found = {}
    for config in sorted(root.rglob("config.yaml")):
        run = RunDir(config.parent)
        if (
            config.parent != root
            and run.is_run()
            and not any(part.startswith(".") for part in config.relative_to(root).parts)
        ):
            found[run.name_under(root)] = run
    return found


def read_json(path: Path):
    """A JSON file a run writes beside its metrics (summary.json, progress.json, ...), or None when it
    is not there (yet) or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
