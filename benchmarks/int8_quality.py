"""What int8 decode steps (`tunelab serve --quantize int8`) cost in quality, against the model's own precision.

    .venv/bin/python benchmarks/int8_quality.py [--model smollm2-135m-instruct] [--max-instances N]

The int8 steps are weight-only up to 4 rows and quantize the activations too beyond, so each measure is
taken at both widths, against the same batcher's decode steps in the model's precision (prompts prefilled
in that precision either way), in one process:
- greedy answers on the held-out Super-NaturalInstructions suite (all 325 instances, 64 new tokens, the
  prompts of `tunelab eval --suite`) decoded 4 rows and 32 rows at a time: how many equal the unquantized
  ones, and both ROUGE-L;
- the reference answers of the last 100 Alpaca records (not among the 4,900 the shipped configs train on),
  each fed token by token through the decode steps (teacher forcing), 1 row and 16 rows at a time: their
  perplexity, and how often the most likely next token is the unquantized one's (top-1 agreement, as
  docs/export.md measures GGUF types).
For scale, the unquantized steps against themselves at the two widths (rounding moves with a batch's width).
The teacher-forced measures also take the written-out steps with the model's own weights (what `tunelab
serve` runs in bf16 for this family), and the model in fp32 as the reference all are rounded from.
`--skip-suite`: the teacher-forced measures only; `--widths 16`: at 16 rows only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch

from tunelab.eval.heldout import SuiteOptions, evaluate_suite
from tunelab.infer.decode import Batch, Row
from tunelab.infer.prompts import encode_prompt
from tunelab.infer.sampling import Sampling
from tunelab.infer.steps import Decoder
from tunelab.models import resolve_model
from tunelab.models.load import load_generator, weights_dtype
from tunelab.precision import resolve_precision

ALPACA = "../shared/data/instruct/alpaca_5000.json"
SUITE = "../shared/data/eval/super-natural-instructions/tasks"


def teacher_forced(model, tokenizer, decoder, records: list[dict], rows: int) -> tuple[float, list[int]]:
    """exp(mean negative log-likelihood) of each record's output given its instruction, fed through the
    batch's decode steps `rows` records at a time (`decoder` None: the model's own), and the most likely
    token at each position."""
    total, count, best = 0.0, 0, {}
    for start in range(0, len(records), rows):
        batch, targets, chunk = Batch(model, rows, decoder=decoder), {}, []
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
                best[start + row.tag, fed] = int(row.logits.argmax())
                count += 1
                row.tokens.append(target)
                row.done = fed + 1 == len(targets[row.tag])
            batch.advance()
            fed += 1
    return math.exp(total / count), [best[k] for k in sorted(best)]


def agreement(tokens: list[int], others: list[int]) -> float:
    """The share of positions where the two most-likely-token lists agree (top-1 agreement)."""
    return sum(a == b for a, b in zip(tokens, others)) / len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--max-instances", type=int, default=None, help="per task (default: all)")
    parser.add_argument("--skip-suite", action="store_true", help="the teacher-forced measures only")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 16], help="rows at a time, teacher-forced")
    args = parser.parse_args()
    precision = resolve_precision(args.precision)
    model, tokenizer = load_generator(resolve_model(args.model), weights_dtype(precision.name))[:2]
    exact = load_generator(resolve_model(args.model), torch.float32)[0]
    decoder = Decoder(model)
    with open(ALPACA, encoding="utf-8") as f:
        records = json.load(f)[-100:]
    suite_rows, bf16_answers = [], []
    for width in () if args.skip_suite else (4, 32):
        runs = {}
        for quantize in ("none", "int8"):
            options = SuiteOptions(max_instances=args.max_instances, batch_size=width, quantize=quantize)
            result = evaluate_suite(model, tokenizer, SUITE, options)
            runs[quantize] = ([p["prediction"] for p in result["predictions"]], result["scores"]["overall"]["rougeL"])
        bf16_answers.append(runs["none"][0])
        same = sum(a == b for a, b in zip(runs["none"][0], runs["int8"][0]))
        suite_rows.append((width, same, len(runs["none"][0]), runs["none"][1], runs["int8"][1]))
        print(suite_rows[-1], flush=True)
    forced_rows, bf16_best, own_rows, forward = [], [], [], {}
    for width in args.widths:
        plain, plain_best = forward[width] = teacher_forced(model, tokenizer, None, records, width)
        bf16_best.append(plain_best)
        int8, int8_best = teacher_forced(model, tokenizer, decoder, records, width)
        top1 = agreement(plain_best, int8_best)
        forced_rows.append((width, plain, int8, top1))
        print(forced_rows[-1], flush=True)
    own = Decoder(model, quantize=False)  # after the int8 packing: its projections become views, same values
    for width in args.widths:
        reference, reference_best = teacher_forced(exact, tokenizer, None, records, width)
        (plain, plain_best), (steps, steps_best) = forward[width], teacher_forced(model, tokenizer, own, records, width)
        agree = [agreement(best, reference_best) for best in (plain_best, steps_best)]
        own_rows.append((width, reference, plain, steps, *agree))
        print(own_rows[-1], flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{args.model}, {precision.name} against int8 decode steps, {machine}\n")
    if suite_rows:
        print(f"| held-out SNI, rows at a time | answers equal | ROUGE-L {precision.name} | ROUGE-L int8 |")
        print("|---|---:|---:|---:|")
    for width, same, n, plain_rouge, int8_rouge in suite_rows:
        print(f"| {width} | {same} / {n} ({same / n:.1%}) | {plain_rouge:.2f} | {int8_rouge:.2f} |")
    print(
        f"\n| Alpaca answers, rows at a time | perplexity {precision.name} | perplexity int8 | change | top-1 agreement |"
    )
    print("|---|---:|---:|---:|---:|")
    for width, plain, int8, top1 in forced_rows:
        print(f"| {width} | {plain:.3f} | {int8:.3f} | {int8 / plain - 1:+.2%} | {top1:.3f} |")
    name = precision.name
    print(
        f"\n| Alpaca answers, rows at a time | perplexity fp32 | {name} forward | {name} steps "
        f"| top-1 agreement with fp32: {name} forward | {name} steps |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for width, reference, plain, steps, plain_agree, steps_agree in own_rows:
        print(f"| {width} | {reference:.3f} | {plain:.3f} | {steps:.3f} | {plain_agree:.3f} | {steps_agree:.3f} |")
    # the unquantized model against itself: a batch's width alone changes its rounding (left padding, matmul shapes)
    if len(bf16_best) == 2:
        top1 = agreement(*bf16_best)
        print(f"\n{name} against itself, {args.widths[0]} rows against {args.widths[1]}: top-1 agreement {top1:.3f}")
    if bf16_answers:
        same = sum(a == b for a, b in zip(*bf16_answers))
        print(f"{name} against itself, 4 rows against 32: {same} / {len(bf16_answers[0])} held-out answers equal")


if __name__ == "__main__":
    main()
