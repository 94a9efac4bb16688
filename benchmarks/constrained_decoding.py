"""What structured outputs cost: decoding under a JSON schema against free decoding, on the server's batch.

    .venv/bin/python benchmarks/constrained_decoding.py                # SmolLM2-135M, 1 and 16 rows
    .venv/bin/python benchmarks/constrained_decoding.py --rows 1 4 16 --tokens 64 --repeats 3

The same Alpaca instructions (through the chat template) decode greedily on one `infer.decode.Batch`, the
server's continuous batch, for exactly `--tokens` new tokens: once free, once with every row constrained
by a JSON schema (an object whose one string needs more characters than the answer has, so no row ends
early), each row with its own xgrammar matcher, as `response_format` runs them. Reported: milliseconds a
decode step (median of the repeats) and the constrained run's extra cost (goal: at most 10% at 16 rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ALPACA = Path("../shared/data/instruct/alpaca_5000.json")
MODEL = "smollm2-135m-instruct"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}


def decode_steps(model, tokenizer, prompts: list[list[int]], tokens: int, grammar) -> float:
    """Seconds a decode step, over `tokens` steps of all rows (prefill excluded)."""
    from tunelab.infer.decode import Batch, Row
    from tunelab.infer.sampling import Sampling

    batch = Batch(model, len(prompts))
    stop = {tokenizer.eos_token_id} if grammar is not None else set()  # free rows: no end, so every row runs
    batch.add(*[Row(i, p, Sampling(tokens, 0.0, grammar=grammar), tokenizer, stop) for i, p in enumerate(prompts)])
    started, steps = time.perf_counter(), 0
    while batch.rows:
        batch.step()
        steps += 1
    assert steps == tokens, steps
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tunelab.infer.constrain import Constraint, Grammars
    from tunelab.infer.prompts import encode_prompt
    from tunelab.models import pull
    from tunelab.models.load import load_causal_lm

    model, tokenizer = load_causal_lm(pull(MODEL))
    model.eval()
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    instructions = [r["instruction"] for r in rows if not r["input"]][: max(args.rows)]
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}])[0].tolist() for q in instructions]
    grammars = Grammars(tokenizer, model.get_output_embeddings().weight.shape[0], {tokenizer.eos_token_id})
    compiled = grammars.compile(Constraint("json_schema", json.dumps(SCHEMA)))
    print(f"{MODEL}, fp32, greedy, {args.tokens} new tokens a row, median of {args.repeats}\n")
    print("| Rows | Free: ms a step | JSON schema: ms a step | Extra cost |\n|---:|---:|---:|---:|")
    with torch.no_grad():
        decode_steps(model, tokenizer, prompts[:1], 4, None)  # warm-up
        for n in args.rows:
            free, constrained = [], []
            for _ in range(args.repeats):
                free.append(decode_steps(model, tokenizer, prompts[:n], args.tokens, None))
                constrained.append(decode_steps(model, tokenizer, prompts[:n], args.tokens, compiled))
            a, b = statistics.median(free) * 1000, statistics.median(constrained) * 1000
            print(f"| {n} | {a:.1f} | {b:.1f} | {100 * (b / a - 1):+.1f}% |")


if __name__ == "__main__":
    main()
