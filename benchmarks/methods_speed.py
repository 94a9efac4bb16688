"""How fast the other methods that share the training loop train: classify (MiniLM-L6, SST-2), reward and
dpo (SmolLM2-135M with LoRA r 16 on all linear layers, HH-RLHF pairs), each from its shipped config for a
few optimizer steps in a fresh process, evaluation off.

    .venv/bin/python benchmarks/methods_speed.py                        # this checkout
    git worktree add /tmp/before 275a332
    PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/methods_speed.py   # the same at another commit

Reported per method: real (non-padding) tokens/s of the training loop and peak RSS, from the run's
summary.json, and the mean train loss of the last two steps (the speed changes must not change it beyond
bf16 rounding). Run alone: anything else on the CPU changes the timings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

NO_EVAL = ["train.eval_every=null", "train.best_metric=null", "train.patience=null"]
METHODS = {  # method -> (shipped config, optimizer steps, overrides that turn evaluation off)
    "classify": ("configs/classify-minilm-sst2.yaml", 60, ["data.eval=null", *NO_EVAL]),
    "reward": ("configs/reward-smollm2-hh.yaml", 6, ["data.eval_split=null", *NO_EVAL]),
    "dpo": ("configs/dpo-smollm2-hh.yaml", 4, ["data.eval_split=null", *NO_EVAL]),
}


def run(method: str, tmp: Path) -> dict:
    config, steps, overrides = METHODS[method]
    out = tmp / method
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelab",
            "train",
            config,
            f"output_dir={out}",
            f"train.max_steps={steps}",
            "train.log_every=1",
            *overrides,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    summary = json.loads((out / "summary.json").read_text())
    losses = [
        e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["split"] == "train"
    ]
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "seconds": summary["train_seconds"],
        "peak_rss_mb": summary["peak_memory_mb"],
        "final_loss": sum(losses[-2:]) / 2,
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=list(METHODS), action="append", help="(repeatable) default: all")
    args = parser.parse_args()
    import tunelab

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.method or list(METHODS):
            results[method] = run(method, Path(tmp))
    print(f"tunelab from {Path(tunelab.__file__).parent}")
    print(f"{'method':<10} {'steps':>5} {'tokens/s':>9} {'peak RSS MB':>12} {'final loss':>11} {'seconds':>8}")
    for method, r in results.items():
        print(
            f"{method:<10} {r['steps']:>5} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f} {r['final_loss']:>11.4f} "
            f"{r['seconds']:>8.1f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
