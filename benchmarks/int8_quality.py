"""What int8 decode steps (`tunelab serve --quantize int8`) cost in quality, against the model's own precision.

    .venv/bin/python benchmarks/int8_quality.py [--model smollm2-135m-instruct] [--max-instances N]

Two measures, each with the model's decode steps as the server runs them (the continuous batcher, prompts
prefilled in the model's precision) and with int8 steps, in one process:
- greedy agreement on the held-out Super-NaturalInstructions suite (all 325 instances, 64 new tokens, the
  prompts of `tunelab eval --suite`): answers equal to the unquantized ones, and both ROUGE-L;
- perplexity of the reference answers of the last 100 Alpaca records (not among the 4,900 the shipped
  configs train on), each answer fed token by token through the decode steps (teacher forcing).
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch

from tunelab.eval.heldout import SuiteOptions, evaluate_suite
from tunelab.infer.decode import Batch, Row
from tunelab.infer.int8 import Int8Decoder
from tunelab.infer.prompts import encode_prompt
from tunelab.infer.sampling import Sampling
from tunelab.models import resolve_model
from tunelab.models.load import load_generator, weights_dtype
from tunelab.precision import resolve_precision

ALPACA = "../shared/data/instruct/alpaca_5000.json"
SUITE = "../shared/data/eval/super-natural-instructions/tasks"


def perplexity(model, tokenizer, decoder, records: list[dict], rows: int = 16) -> float:
    """exp(mean negative log-likelihood) of each record's output given its instruction, teacher-forced through
    the batch's decode steps (`decoder` None: the model's own)."""
    total, count = 0.0, 0
    for start in range(0, len(records), rows):
        batch, targets = Batch(model, rows, decoder=decoder), {}
        chunk = []
        for i, r in enumerate(records[start : start + rows]):
            text = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
            prompt = encode_prompt(tokenizer, text)[0].tolist()
            targets[i] = tokenizer(r["output"], add_special_tokens=False).input_ids[:128] + [tokenizer.eos_token_id]
            chunk.append(Row(i, prompt, Sampling(len(targets[i])), tokenizer, set()))
        batch.add(*chunk)
        fed = 0
        while batch.rows:
            for row in batch.rows:
                target = targets[row.tag][fed]
                total -= float(row.logits.float().log_softmax(-1)[target])
                count += 1
                row.tokens.append(target)
                row.done = fed + 1 == len(targets[row.tag])
            batch.advance()
            fed += 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--max-instances", type=int, default=None, help="per task (default: all)")
    args = parser.parse_args()
    precision = resolve_precision(args.precision)
    model, tokenizer = load_generator(resolve_model(args.model), weights_dtype(precision.name))[:2]
    with open(ALPACA, encoding="utf-8") as f:
        records = json.load(f)[-100:]
    results = {}
    for quantize in ("none", "int8"):
        suite = evaluate_suite(
            model, tokenizer, SUITE, SuiteOptions(max_instances=args.max_instances, quantize=quantize)
        )
        decoder = Int8Decoder(model) if quantize == "int8" else None
        results[quantize] = {
            "predictions": [p["prediction"] for p in suite["predictions"]],
            "rougeL": suite["scores"]["overall"]["rougeL"],
            "perplexity": perplexity(model, tokenizer, decoder, records),
        }
        print(quantize, {k: v for k, v in results[quantize].items() if k != "predictions"}, flush=True)
    plain, int8 = results["none"], results["int8"]
    same = sum(a == b for a, b in zip(plain["predictions"], int8["predictions"]))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{args.model}, prompts in {precision.name}, {machine}\n")
    print("| decode steps | held-out answers equal to the unquantized ones | ROUGE-L | Alpaca perplexity |")
    print("|---|---:|---:|---:|")
    n = len(plain["predictions"])
    for name, r in ((precision.name, plain), ("int8", int8)):
        agreement = f"{same} / {n} ({same / n:.1%})" if r is int8 else f"{n} / {n}"
        print(f"| {name} | {agreement} | {r['rougeL']:.2f} | {r['perplexity']:.3f} |")
    change = int8["perplexity"] / plain["perplexity"] - 1
    print(f"\nperplexity change {change:+.2%}; ROUGE-L change {int8['rougeL'] - plain['rougeL']:+.2f}")


if __name__ == "__main__":
    main()
