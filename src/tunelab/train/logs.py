"""What a run logs, and reading it back: metrics.jsonl (one JSON object per logged step or evaluation),
the loss curve, and the overfitting check that reads the curve.

    {"step": 10, "split": "train", "loss": 1.83, "lr": 0.0002, "grad_norm": 0.9, "epoch": 0.25,
     "tokens": 40960, "trained_tokens": 11264, "tokens_per_s": 221.3}
    {"step": 10, "split": "eval", "loss": 1.97, "accuracy": 0.58}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunelab.eval.metrics import higher_is_better
from tunelab.rundir import RunDir


def read_metrics(run_dir: Path) -> list[dict]:
    """Every entry of a run's metrics.jsonl, in order ([] before the first)."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics_after(run_dir: Path, offset: int = 0, most: int | None = None) -> tuple[list[dict], int]:
    """The entries after byte `offset` of a metrics.jsonl that may still grow (complete lines only; at
    most `most` bytes of them) and the offset to read from next: what watches a run while it trains
    reads each line once. A file that shrank (a resume cuts it back to its checkpoint) is read again
    from the start."""
    path = RunDir(run_dir).metrics
    try:
        size = path.stat().st_size
    except OSError:
        return [], 0
    if offset > size:
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(-1 if most is None else most)
    complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
    rows = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
    return rows, offset + len(complete)


def plot_losses(run_dir: Path, out: Path, best_metric: str = "eval_loss") -> None:
    """Train and eval loss against the step. Where the evaluations have no loss (rlhf, whose training
    loss is a policy-gradient surrogate, not a fit), the train and eval values of the best metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_metrics(run_dir)
    if not entries:
        return
    evals = [e for e in entries if e["split"] == "eval"]
    key = "loss" if not evals or "loss" in evals[0] else best_metric.removeprefix("eval_")
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(e["step"], e[key]) for e in entries if e["split"] == split and key in e]
        if points:
            ax.plot(*zip(*points), style, label=f"{split} {key}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per trained token)" if key == "loss" else f"mean {key}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def overfitting_warning(entries: list[dict], best_metric: str) -> str | None:
    """A sentence when the evaluation metric got worse after its best step while the train loss kept
    falling (the model learns its training data, not the task), else None."""
    key = best_metric.removeprefix("eval_")
    evals = [(e["step"], e[key]) for e in entries if e["split"] == "eval" and key in e]
    if len(evals) < 3:
        return None
    sign = 1 if higher_is_better(best_metric) else -1
    best_step, best = max(evals, key=lambda p: sign * p[1])
    last_step, last = evals[-1]
    if best_step == last_step or sign * (best - last) <= 0.02 * max(abs(best), 1e-9):
        return None
    train = [(e["step"], e["loss"]) for e in entries if e["split"] == "train"]
    before = [loss for step, loss in train if step <= best_step]
    after = [loss for step, loss in train if step > best_step]
    if not before or not after or after[-1] >= before[-1]:
        return None
    return (
        f"{best_metric} was best at step {best_step} ({best:.4g}) and {last:.4g} at step {last_step} while the "
        "train loss kept falling: the model was overfitting; final/ holds the best step"
    )
