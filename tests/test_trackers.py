"""`train.report_to`: a run logs to TensorBoard, MLflow, W&B (offline) and Trackio, and each library's own
reader gives back the numbers of metrics.jsonl at its steps, the config as hyperparameters, and the
summary; a resumed run logs into the same tracker runs; a missing library is one line naming the pip
command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from helpers import wandb_history, wandb_records
from tiny_models import tiny_llama_dir

CONFIG = """\
method: sft
model: {model}
output_dir: {run}
data: {{train: {data}, eval_split: 4, max_length: 64}}
train:
  max_steps: {steps}
  batch_size: 2
  lr: 3e-3
  log_every: 1
  eval_every: 2
  save_every: 2
  precision: fp32
  report_to: [tensorboard, mlflow, wandb, trackio]
"""


@pytest.fixture
def trackers_env(tmp_path, monkeypatch):
    """Every tracker kept inside the test's folder, and W&B offline (no network here)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    # Trackio reads TRACKIO_DIR once, when first imported: a project of its own keeps each test's runs apart
    monkeypatch.setenv("TRACKIO_PROJECT", tmp_path.name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _workspace(root: Path, steps: int) -> tuple[Path, Path]:
    tiny_llama_dir(root / "model")
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(24)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = root / "run"
    path = root / "run.yaml"
    path.write_text(CONFIG.format(model=root / "model", run=run, data=root / "train.jsonl", steps=steps))
    return path, run


def _logged(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers should have it: {"train/loss": [(step, value), ...], ...}."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key, value in entry.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                out.setdefault(f"{entry['split']}/{key}", []).append((entry["step"], float(value)))
    return out


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    return [s for s, _ in got] == [s for s, _ in want] and all(
        abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, want)
    )


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tunelab")
    [run] = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics
    }
    return run, history


def test_every_tracker_reads_back_what_metrics_jsonl_holds(trackers_env):
    config, run = _workspace(trackers_env, steps=4)
    code, _, err = run_cli("train", str(config))
    assert code == 0, err
    want = _logged(run)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss", "eval/accuracy"} <= set(want)
    summary = json.loads((run / "summary.json").read_text())

    # TensorBoard: its own event reader
    scalars = tensorboard_scalars(run / "tensorboard")
    for key, points in want.items():
        assert _same(scalars[key], points), key
    assert scalars["summary/train_seconds"][0][1] == pytest.approx(summary["train_seconds"], rel=1e-6)

    # MLflow: its client, against the tracking URI the run was given
    mlflow, history = mlflow_run(f"sqlite:///{trackers_env / 'mlflow.db'}", "run")
    for key, points in want.items():
        assert _same(sorted(history[key]), points), key
    assert mlflow.data.params["train.lr"] == "0.003" and mlflow.data.params["method"] == "sft"
    assert mlflow.info.status == "FINISHED"

    # W&B offline: the run's own .wandb file, read with W&B's datastore
    history = wandb_history(run / "wandb")
    for key, points in want.items():
        assert _same(history[key], points), key

    # Trackio: its local store
    logs = trackio_logs(trackers_env.name, "run")
    for key, points in want.items():
        assert _same(logs[key], points), key


def trackio_logs(project: str, run: str) -> dict[str, list[tuple[int, float]]]:
    from trackio.sqlite_storage import SQLiteStorage

    out: dict[str, list[tuple[int, float]]] = {}
    for row in SQLiteStorage.get_logs(project, run):
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, (int, float)) and not key.startswith("_"):
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


def test_a_resumed_run_logs_into_the_same_tracker_runs(trackers_env):
    config, run = _workspace(trackers_env, steps=2)
    assert run_cli("train", str(config))[0] == 0
    first = json.loads((run / "trackers.json").read_text())
    code, _, err = run_cli("train", "--resume", str(run), "train.max_steps=4")
    assert code == 0, err
    assert json.loads((run / "trackers.json").read_text()) == first
    want = _logged(run)
    assert [s for s, _ in want["train/loss"]] == [1, 2, 3, 4]
    mlflow, history = mlflow_run(f"sqlite:///{trackers_env / 'mlflow.db'}", "run")  # one run, not two
    assert mlflow.info.run_id == first["mlflow"] and _same(sorted(history["train/loss"]), want["train/loss"])
    assert _same(tensorboard_scalars(run / "tensorboard")["train/loss"], want["train/loss"])
    assert _same(trackio_logs(trackers_env.name, "run")["train/loss"], want["train/loss"])
    # W&B offline writes each attempt's file, both of the one run (`wandb sync` sends them as one)
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = {r.run.run_id for f in files for r in wandb_records(f) if r.WhichOneof("record_type") == "run"}
    assert len(files) == 2 and runs == {first["wandb"]}


def test_a_missing_tracker_is_one_line_naming_the_pip_command(trackers_env, monkeypatch):
    import importlib.util

    config, _ = _workspace(trackers_env, steps=2)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else found(name, *a))
    code, _, err = run_cli("train", str(config))
    assert code == 1 and err.strip() == "error: train.report_to: not installed; pip install wandb", err
    code, _, err = run_cli("train", str(config), "train.report_to=[tensorboard]", "--report-to", "neptune")
    assert code == 1 and "train.report_to" in err and "neptune" in err and "Traceback" not in err
