"""Held-out evaluation speed: instances per second on the whole Super-NaturalInstructions suite, before and after.

    .venv/bin/python benchmarks/heldout_eval.py [--model gemma3-270m] [--suite PATH] [--max-instances N]

One process, one model, the same suite, each setting in turn: the path of tunelab before prefix caching (the
continuous batcher, 8 rows, every prompt computed whole), then prefix caching (a task's definition computed
once), then 32 rows, then bf16 weights. Prints a Markdown table of wall time, instances/s, ratio to the
first row, ROUGE-L and how many predictions equal the first row's (and, with --out, the rows as JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from tunelab.eval.heldout import SuiteOptions, evaluate_suite
from tunelab.models import resolve_model
from tunelab.models.load import load_generator

SETTINGS = [  # (label, options, weights)
    ("before: 8 rows, whole prompts, fp32", {"batch_size": 8, "prefix_cache": False}, torch.float32),
    ("+ prefix caching", {"batch_size": 8, "prefix_cache": True}, torch.float32),
    ("+ 32 rows, joining 4 at a time", {"batch_size": 32, "prefix_cache": True}, torch.float32),
    ("+ bf16 weights", {"batch_size": 32, "prefix_cache": True}, torch.bfloat16),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--suite", default="../shared/data/eval/super-natural-instructions/tasks")
    parser.add_argument("--max-instances", type=int, default=None, help="per task (default: all)")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    rows, first, loaded = [], None, {}
    for label, options, dtype in SETTINGS:
        if dtype not in loaded:  # loaded in its dtype, as `tunelab eval --precision` and `tunelab compare` load it
            loaded.clear()
            loaded[dtype] = load_generator(folder, dtype)[:2]
        model, tokenizer = loaded[dtype]
        started = time.perf_counter()
        result = evaluate_suite(model, tokenizer, args.suite, SuiteOptions(max_instances=args.max_instances, **options))
        seconds = time.perf_counter() - started
        predictions = [p["prediction"] for p in result["predictions"]]
        first = first or (predictions, seconds)
        rows.append(
            {
                "setting": label,
                "seconds": round(seconds, 1),
                "instances": len(predictions),
                "instances_per_s": round(len(predictions) / seconds, 2),
                "speedup": round(first[1] / seconds, 2),
                "rougeL": result["scores"]["overall"]["rougeL"],
                "same_predictions": sum(a == b for a, b in zip(first[0], predictions)),
            }
        )
        print(rows[-1], flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{args.model} on {args.suite} ({rows[0]['instances']} instances), {machine}\n")
    print("| setting | wall time | instances/s | speedup | ROUGE-L | predictions equal to the first row's |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['seconds']:.0f} s | {r['instances_per_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['rougeL']:.2f} | {r['same_predictions']} / {r['instances']} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "suite": args.suite, "machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
