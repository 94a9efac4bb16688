"""GRPO on a task a program checks, measured: multi-step arithmetic, SmolLM2-135M-Instruct before and after.

    .venv/bin/python benchmarks/grpo_arithmetic.py build [--out data/arithmetic]
    .venv/bin/python benchmarks/grpo_arithmetic.py measure [--config configs/grpo-smollm2-arithmetic.yaml]

No package on PyPI that installs here ships GSM8K's data, so the task is generated, in the spirit of
TinyZero's Countdown and BIG-bench's multi-step arithmetic: an expression of two or three whole numbers
from 2 to 60 joined by + and - (its result never below 0), asked as "What is 17 + 38 - 9? End your reply
with 'Answer: N'." `build` writes train.jsonl (3,000 problems) and test.jsonl (200), `{"prompt": ...,
"answer": "46"}` rows, from a fixed seed; no expression of the test set is in the training set.

The rewards are the functions below, with TRL's signature (the config names them as
benchmarks/grpo_arithmetic.py:correct and :formatted): `correct` is 1 when the last number of the reply is
the answer, `formatted` is 1 when the reply ends with "Answer: N". A completion is right by `correct` alone.

`measure` builds the data, trains the config (`tunelab train`, timed), and reads the run's held-out
evaluations: the starting policy's (eval_samples_start.jsonl, step 0) and the kept model's
(eval_samples.jsonl), both greedy on the 200 test problems. It prints a Markdown table: accuracy before
and after, each with its 95% bootstrap interval, the paired difference with its own, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 3000, "test": 200}
NUMBER = re.compile(r"-?\d+")
ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*\.?\s*$", re.IGNORECASE)


# --- the rewards (TRL's reward-function signature) --------------------------------------------------------


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def correct(completions, answer, **kwargs) -> list[float]:
    """1 when the reply's last number is the answer."""
    out = []
    for completion, expected in zip(completions, answer):
        numbers = NUMBER.findall(_text(completion))
        out.append(float(bool(numbers) and numbers[-1] == str(expected)))
    return out


def formatted(completions, **kwargs) -> list[float]:
    """1 when the reply ends with "Answer: N"."""
    return [float(bool(ANSWER.search(_text(c).strip()))) for c in completions]


# --- the task ---------------------------------------------------------------------------------------------


def problem(rng: random.Random) -> tuple[str, int]:
    """An expression of 2 or 3 numbers from 2 to 60 with + and -, never below 0 along the way."""
    while True:
        numbers = [rng.randint(2, 60) for _ in range(rng.choice((2, 3)))]
        signs = [rng.choice("+-") for _ in numbers[1:]]
        value, ok = numbers[0], True
        for sign, n in zip(signs, numbers[1:]):
            value = value + n if sign == "+" else value - n
            ok = ok and value >= 0
        if ok:
            text = str(numbers[0]) + "".join(f" {s} {n}" for s, n in zip(signs, numbers[1:]))
            return text, value


def build(out: Path, seed: int = 7) -> dict[str, int]:
    rng = random.Random(seed)
    seen: set[str] = set()
    written = {}
    for split in ("test", "train"):  # the test set first: the training set never repeats one of its expressions
        rows = []
        while len(rows) < SIZES[split]:
            text, value = problem(rng)
            if text in seen:
                continue
            seen.add(text)
            prompt = f"What is {text}? End your reply with 'Answer: N', where N is the number."
            rows.append({"prompt": prompt, "answer": str(value)})
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        written[f"{split}.jsonl"] = len(rows)
    return written


# --- the measurement --------------------------------------------------------------------------------------


def bootstrap(values: list[float], seed: int = 0, resamples: int = 10_000) -> tuple[float, float, float]:
    """The mean and its 95% percentile bootstrap interval."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return sum(values) / n, means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def measure(config: Path) -> None:
    import yaml

    build(ROOT / "data" / "arithmetic")
    run = ROOT / yaml.safe_load(config.read_text())["output_dir"]
    tunelab = str(Path(sys.executable).parent / "tunelab")
    started = time.perf_counter()
    if (run / "config.yaml").exists() and not (run / "summary.json").exists():
        subprocess.run([tunelab, "train", "--resume", str(run)], check=True, cwd=ROOT)
    elif not (run / "summary.json").exists():
        subprocess.run([tunelab, "train", str(config)], check=True, cwd=ROOT)
    seconds = time.perf_counter() - started

    def rights(name: str) -> list[float]:
        rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
        return [float(r["reward/correct"]) for r in rows]

    before, after = rights("eval_samples_start.jsonl"), rights("eval_samples.jsonl")
    difference = [a - b for a, b in zip(after, before)]
    summary = json.loads((run / "summary.json").read_text())
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; config {config}")
    print("| model | held-out accuracy (200 problems, greedy) | 95% bootstrap interval |")
    print("|---|---|---|")
    for name, values in (("SmolLM2-135M-Instruct", before), ("after GRPO", after), ("difference", difference)):
        mean, low, high = bootstrap(values)
        print(f"| {name} | {mean:.3f} | [{low:.3f}, {high:.3f}] |")
    print(
        f"\ntraining: {summary.get('steps')} steps, {summary.get('wall_seconds', seconds):.0f} s ({seconds:.0f} s here)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="write train.jsonl and test.jsonl")
    p.add_argument("--out", default=str(ROOT / "data" / "arithmetic"))
    p = sub.add_parser("measure", help="train the config, and print the before/after table")
    p.add_argument("--config", default=str(ROOT / "configs" / "grpo-smollm2-arithmetic.yaml"))
    args = parser.parse_args()
    if args.command == "build":
        print(build(Path(args.out)))
    else:
        measure(Path(args.config))


if __name__ == "__main__":
    main()
