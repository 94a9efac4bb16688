"""Packing vs length-grouped padding: which trains faster on this machine, for the real LLMs?

    .venv/bin/python benchmarks/batching.py                 # both LLMs, 256 Alpaca rows, 2 repeats
    .venv/bin/python benchmarks/batching.py --rows 64 --models smollm2-135m-instruct

The same Alpaca examples (rendered by tunelab, max_length 512) go through forward + backward once
per strategy, in the precision tunelab's `precision: auto` picks on this CPU (bf16 autocast where the
CPU does bf16 natively, else fp32), with the loss computed as
the training engine does it (`selective_cross_entropy`: logits only where labels are trained). The
optimizer step is left out: its cost does not depend on how the batch is laid out. Reported: real
(non-padding) tokens per second, the share of padding, and the ratio of each strategy to the best.
Strategies with about the same tokens per micro-batch (~1,024) are compared:
- pack 1x1024: one best-fit-decreasing row of up to 1,024 tokens per micro-batch
- pack 2x512: two rows of up to 512
- group: length-grouped padded batches of N examples, N = 1,024 / mean example length
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tunelab.data.batching import collate_packed, collate_padded, group_by_length, pack
from tunelab.data.formats import load_records
from tunelab.data.render import Renderer
from tunelab.losses import selective_cross_entropy
from tunelab.models import pull
from tunelab.precision import autocast, resolve_precision

_resolved = resolve_precision("auto")
PRECISION, WHY = _resolved.name, _resolved.reason

ALPACA = "../shared/data/instruct/alpaca_5000.json"


def step(model, batch: dict) -> None:
    """Forward + backward of one micro-batch, as the training engine does it."""
    with autocast(PRECISION):
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        hidden = model.model(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
        loss, n, _ = selective_cross_entropy(hidden, model.get_output_embeddings(), batch["labels"])
    (loss / max(n, 1)).backward()


def strategies(examples, pad_id: int) -> dict[str, list[dict]]:
    lengths = [len(e.input_ids) for e in examples]
    per_batch = max(1, round(1024 / statistics.mean(lengths)))
    rows_1024, rows_512 = pack(examples, 1024), pack(examples, 512)
    return {
        "pack 1x1024": [collate_packed([r], pad_id) for r in rows_1024],
        "pack 2x512": [collate_packed(rows_512[i : i + 2], pad_id) for i in range(0, len(rows_512), 2)],
        f"group {per_batch}/batch": [
            collate_padded([examples[i] for i in b], pad_id) for b in group_by_length(lengths, per_batch, seed=0)
        ],
    }


def measure(model, batches: list[dict]) -> float:
    step(model, batches[0])  # warm-up: first-call allocations and kernel selection
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for batch in batches:
        step(model, batch)
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--rows", type=int, default=256, help="Alpaca rows to train on")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"precision {PRECISION}: {WHY}; {torch.get_num_threads()} threads")
    records, _ = load_records(ALPACA)
    results = {}
    for name in args.models:
        folder = pull(name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        examples = [e for e in Renderer(tokenizer, max_length=512).chats(records[: args.rows]) if e.usable]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        real = sum(len(e.input_ids) for e in examples)
        print(f"{name}: {len(examples)} examples, {real} tokens, mean {real / len(examples):.0f}")
        for label, batches in strategies(examples, pad_id).items():
            seconds = statistics.median(measure(model, batches) for _ in range(args.repeats))
            slots = sum(b["input_ids"].numel() for b in batches)
            results[(name, label)] = real / seconds
            print(
                f"  {label:<16} {len(batches):>4} micro-batches  padding {1 - real / slots:6.1%}  "
                f"{seconds:7.1f} s  {real / seconds:7.0f} tokens/s",
                flush=True,
            )
        best = max(v for (n, _), v in results.items() if n == name)
        for (n, label), value in results.items():
            if n == name:
                print(f"  {label:<16} {value / best:.2f}x of the fastest")
    print(json.dumps({f"{n} | {label}": round(v) for (n, label), v in results.items()}))


if __name__ == "__main__":
    main()
