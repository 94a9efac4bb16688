"""What the dashboard shows about runs, read from the files every run writes (config.yaml, progress.json,
metrics.jsonl, summary.json, failed.json, checkpoints/, eval_metrics.json, ...); nothing is kept in memory
between requests but where the reading of a metrics file got to, which the page sends back.

A run is known by its name: its path relative to the runs directory (`compare-quick/task`), and a job's
run by its job id. A name is only ever a key of `find_runs`' answer, never joined to a path.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunelab.rundir import RunDir, read_json


def find_reports(root: Path | None) -> dict[str, Path]:
    """name -> folder of every comparison below `root` (`tunelab compare`'s output: a report.html)."""
    if root is None or not root.is_dir():
        return {}
    return {
        ("." if r.parent == root else r.parent.relative_to(root).as_posix()): r.parent
        for r in sorted(root.rglob("report.html"))
        if not RunDir(r.parent).is_run()
    }


def read_config(run: Path) -> dict:
    try:
        return yaml.safe_load(RunDir(run).config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def run_row(name: str, run: Path) -> dict:
    """The runs table's row: what a person scans a list of runs for."""
    rundir = RunDir(run)
    config, summary, progress = read_config(run), rundir.summary() or {}, rundir.progress() or {}
    best_metric = (config.get("train") or {}).get("best_metric") or "eval_loss"
    return {
        "name": name,
        "method": config.get("method"),
        "model": config.get("model"),
        "tuning": (config.get("tuning") or {}).get("mode"),
        "status": rundir.status(),
        "step": summary.get("steps", progress.get("step", 0)),
        "total_steps": summary.get("planned_steps", progress.get("total_steps")),
        "best_metric": best_metric,
        "best": summary.get(f"best_{best_metric}"),
        "tokens_per_s": summary.get("tokens_per_s", progress.get("tokens_per_s")),
        "wall_seconds": summary.get("wall_seconds"),
        "started_at": rundir.started_at(),
    }


def run_detail(name: str, run: Path) -> dict:
    """A run's page: its row, resolved config, summary, checkpoints, evaluations and the files beside them."""
    from tunelab.train.checkpoint import list_checkpoints

    evaluation = read_json(run / "eval_metrics.json")
    return {
        **run_row(name, run),
        "config": read_config(run),
        "summary": RunDir(run).summary(),
        "failure": RunDir(run).failure(),
        "checkpoints": [
            {"name": c.name, "step": int(c.name.split("-")[-1])} for c in list_checkpoints(RunDir(run).checkpoints)
        ],
        "evaluation": evaluation,
        "predictions": _head_jsonl(run / "eval_predictions.jsonl", 20) or _head_jsonl(run / "eval_samples.jsonl", 20),
        "evaluations": evaluations(run),
        "files": [f for f in FILES if (run / f).is_file()],
    }


def evaluations(run: Path, folder: Path | None = None) -> list[dict]:
    """The run's `tunelab eval` results (RUN/eval/*.json, or `folder`'s: a comparison keeps an arm's in
    results/ARM/): a held-out suite's scores per task, or a data file's metrics, each with a sample of
    its predictions."""
    out = []
    for path in sorted((folder or run / "eval").glob("*.json")):
        result = read_json(path)
        if not isinstance(result, dict):
            continue
        entry = {"name": path.stem, "data": result.get("suite") or result.get("data")}
        if isinstance(result.get("scores"), dict):  # a held-out suite
            entry.update(overall=result["scores"].get("overall"), per_task=result["scores"].get("per_task"))
        else:
            flat = {**result, **(result["metrics"] if isinstance(result.get("metrics"), dict) else {})}
            entry["metrics"] = {
                k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        predictions = result.get("predictions")
        if isinstance(predictions, list):
            entry["predictions"] = [
                {
                    k: v
                    for k, v in p.items()
                    if k in ("task", "prediction", "references", "reference", "source", "rougeL", "label", "predicted")
                }
                for p in predictions[:10]
                if isinstance(p, dict)
            ]
        out.append(entry)
    return out


FILES = ("loss_curve.png", "confusion_matrix.png", "report.html", "report.md", "results.json", "eval_metrics.json")
MEDIA = {
    ".png": "image/png",
    ".html": "text/html; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
}


def differing_keys(configs: dict[str, dict]) -> dict[str, dict[str, object]]:
    """dotted key -> {run: value} for the config keys whose values are not the same in every run."""
    flat = {name: _flatten(config) for name, config in configs.items()}
    keys = sorted(set().union(*flat.values())) if flat else []
    out = {}
    for key in keys:
        values = {name: f.get(key) for name, f in flat.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out[key] = values
    return out


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _head_jsonl(path: Path, count: int) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) == count:
                    break
    except (OSError, ValueError):
        return []
    return rows
