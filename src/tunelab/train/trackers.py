"""The trackers teams already watch (`train.report_to`): what metrics.jsonl holds, also logged to
TensorBoard, MLflow, Weights & Biases or Trackio, through each library's own logging API.

    train:
      report_to: [tensorboard, mlflow, wandb, trackio]      # or `tunelab train CONFIG --report-to wandb`

Every entry of metrics.jsonl is logged at its step, its numbers named `SPLIT/KEY` as transformers'
Trainer names them (`train/loss`, `train/lr`, `train/tokens_per_s`, `eval/loss`, `eval/rougeL`); the
resolved run config goes in as the run's hyperparameters (flattened: `train.lr`, `tuning.lora.r`), and
summary.json's numbers at the end (`summary/...`). Where each one writes:

    tensorboard   RUN_DIR/tensorboard/ (event files; `tensorboard --logdir RUN_DIR/tensorboard`)
    mlflow        MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db here); experiment
                  MLFLOW_EXPERIMENT_NAME, else tunelab
    wandb         W&B's own settings (WANDB_PROJECT, else tunelab; WANDB_MODE=offline keeps it local
                  under RUN_DIR/wandb, for `wandb sync` later)
    trackio       Trackio's local store (TRACKIO_DIR; project TRACKIO_PROJECT, else tunelab)

The run's name is its directory's. A resumed run logs into the same run (the trackers' run ids are kept
in RUN_DIR/trackers.json); its steps after the checkpoint are logged again, as metrics.jsonl has them
again. Only the main process logs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from tunelab.errors import UserError
from tunelab.fs import atomic_write_text

# name -> (the modules it needs, the pip command's packages that bring them)
PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
    "trackio": (("trackio",), "trackio"),
}
# MLflow's default store (sqlite:///mlflow.db since MLflow 3) and every database one need SQLAlchemy and
# Alembic, which mlflow brings and mlflow-skinny does not
DATABASE: tuple[tuple[str, ...], str] = (("sqlalchemy", "alembic"), "sqlalchemy alembic")
PROJECT = "tunelab"  # the default project / experiment where the tracker has one


def check_installed(names: Sequence[str]) -> None:
    """A missing library is said before anything loads, with the command that installs it."""
    needed = [PACKAGES[n] for n in names]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:")
    if "mlflow" in names and not uri.startswith(("file:", "http:", "https:", "databricks")):
        needed.append(DATABASE)
    missing = [pip for modules, pip in needed if any(importlib.util.find_spec(m) is None for m in modules)]
    if missing:
        raise UserError(f"train.report_to: not installed; pip install {' '.join(missing)}")


def scalars(entry: dict) -> dict[str, float]:
    """A metrics.jsonl entry's numbers as the trackers get them: {"train/loss": 1.83, ...}."""
    return {
        f"{entry['split']}/{key}": float(value)
        for key, value in entry.items()
        if key not in ("step", "split") and _number(value)
    }


def flat(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as hyperparameters: {"train.lr": 0.001, "tuning.lora.r": 16, "data.mix": "[...]"}."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[name] = "null" if value is None else value
        else:
            out[name] = json.dumps(value)
    return out


class Tracker(Protocol):
    id: str | None  # what a resumed run reopens it by (None: nothing to reopen)

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, float], failed: bool) -> None: ...


class Trackers:
    """The run's trackers: `log` each metrics.jsonl entry, `finish` with summary.json."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: dict, resume: bool):
        """`names`' libraries installed (`check_installed`, which the run calls before the model loads)."""
        self.path = run_dir / "trackers.json"
        ids = json.loads(self.path.read_text()) if resume and self.path.is_file() else {}
        opened: dict[str, Tracker] = {name: OPEN[name](run_dir, config, ids.get(name)) for name in names}
        self.trackers = list(opened.values())
        atomic_write_text(self.path, json.dumps({n: t.id for n, t in opened.items() if t.id}, indent=1) + "\n")

    def log(self, entry: dict) -> None:
        values = scalars(entry)
        for tracker in self.trackers:
            tracker.log(entry["step"], values)

    def finish(self, summary: dict | None, failed: bool = False) -> None:
        values = {f"summary/{k}": float(v) for k, v in (summary or {}).items() if _number(v)}
        for tracker in self.trackers:
            tracker.finish(values, failed)
        self.trackers = []


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.id: str | None = None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crash keeps what was logged; a flush a log line costs little

    def finish(self, summary: dict[str, float], failed: bool) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(key, value, 0)
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, config: dict, id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
        if id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            self.id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            # MLflow caps a parameter's value at 6,000 characters
            params = [Param(k, str(v)[:6000]) for k, v in flat(config).items()]
            for start in range(0, len(params), 100):  # log_batch takes at most 100 parameters
                self.client.log_batch(self.id, params=params[start : start + 100])
        else:
            self.id = id
            self.client.update_run(id, status="RUNNING")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, summary: dict[str, float], failed: bool) -> None:
        if summary:
            self.log(0, summary)
        self.client.set_terminated(self.id, status="FAILED" if failed else "FINISHED")


class WandB:
    def __init__(self, run_dir: Path, config: dict, id: str | None):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=os.environ.get("WANDB_NAME") or run_dir.name,
            dir=str(run_dir),
            config=config,
            id=id,
            resume="allow" if id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.id: str | None = self.run.id
        # the run's own step axis, so that a resumed run's repeated steps are not dropped as W&B's are
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "train/global_step": step})

    def finish(self, summary: dict[str, float], failed: bool) -> None:
        self.run.summary.update(summary)
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    def __init__(self, run_dir: Path, config: dict, id: str | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT") or PROJECT,
            name=id or run_dir.name,
            config=config,
            resume="allow" if id else "never",
        )
        self.id: str | None = id or run_dir.name

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def finish(self, summary: dict[str, float], failed: bool) -> None:
        if summary:
            self.trackio.log(summary)
        self.trackio.finish()


OPEN: dict[str, Callable[[Path, dict, str | None], Tracker]] = {
    "tensorboard": TensorBoard,
    "mlflow": MLflow,
    "wandb": WandB,
    "trackio": Trackio,
}
