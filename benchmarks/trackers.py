"""What logging to the trackers costs a training step: the SmolLM2 SFT config with `train.report_to` all
four (TensorBoard, MLflow, W&B offline, Trackio) against none, in one process, one after the other.

    .venv/bin/python benchmarks/trackers.py [--config configs/sft-smollm2-alpaca.yaml] [--steps 8] [--tracked-first]

Every step logs (`log_every: 1`) and every fourth evaluates (40 held-out rows), so each tracker gets more entries than a
usual run gives it. Reported: the time spent inside the trackers' `log` calls per step against the step
time (the overhead itself, measured where it happens), the trackers' opening and closing (once a run),
and tokens/s of the two runs (which also holds the machine's noise). W&B runs offline and MLflow and
Trackio write to a scratch folder; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL = ["tensorboard", "mlflow", "wandb", "trackio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sft-smollm2-alpaca.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tracked-first", action="store_true", help="run the tracked run first (the order's effect)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tunelab-trackers-"))
    os.environ.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        MLFLOW_TRACKING_URI=f"sqlite:///{scratch / 'mlflow.db'}",
        TRACKIO_DIR=str(scratch / "trackio"),
    )
    os.chdir(ROOT)
    from tunelab import recipes
    from tunelab.config import load_config
    from tunelab.train import trackers

    spent = {"log": 0.0, "open": 0.0, "finish": 0.0, "calls": 0}

    def timed(name, function):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[name] += time.perf_counter() - started
                spent["calls"] += name == "log"

        return wrapper

    trackers.Trackers.log = timed("log", trackers.Trackers.log)
    trackers.Trackers.finish = timed("finish", trackers.Trackers.finish)
    trackers.Trackers.__init__ = timed("open", trackers.Trackers.__init__)
    rows = []
    for report_to in [ALL, []] if args.tracked_first else [[], ALL]:
        overrides = [
            f"output_dir={scratch / ('tracked' if report_to else 'plain')}",
            f"train.max_steps={args.steps}",
            "train.log_every=1",
            "train.eval_every=4",
            "data.eval_split=40",
            f"train.report_to=[{','.join(report_to)}]",
        ]
        cfg = load_config(ROOT / args.config, overrides).resolved()
        recipes.run(cfg)
        summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
        rows.append((report_to, summary))
    plain, tracked = (next(s for r, s in rows if bool(r) == want) for want in (False, True))
    step = tracked["train_seconds"] / tracked["steps"]
    per_step = spent["log"] / tracked["steps"]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.config}, {args.steps} steps")
    print("| | tokens/s | train s | in the trackers' log calls, per step | share of the step |")
    print("|---|---:|---:|---:|---:|")
    print(f"| none | {plain['tokens_per_s']} | {plain['train_seconds']} | | |")
    print(
        f"| {', '.join(ALL)} | {tracked['tokens_per_s']} | {tracked['train_seconds']} | "
        f"{1000 * per_step:.1f} ms ({spent['calls']} entries) | {100 * per_step / step:.3f}% |"
    )
    print(f"opening the four: {spent['open']:.1f} s; closing: {spent['finish']:.2f} s (once a run)")
    print(f"tokens/s ratio, tracked / none: {tracked['tokens_per_s'] / plain['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
