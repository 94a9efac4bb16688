"""Tokenise + pack the 5,000 Alpaca rows for SmolLM2: cold (no cache) and warm (cached), in seconds.

    .venv/bin/python benchmarks/data_prep.py             # 3 repeats, median
    .venv/bin/python benchmarks/data_prep.py --model gemma3-270m

Cold: read the JSON, normalise the rows, render them through the chat template, tokenise them in one
batched call of the fast tokenizer, find the trained tokens, store the result in the cache, and pack
every example into 1,024-token rows (best-fit decreasing). Warm: the same call again, served from the
content-hash cache, then packed. The tokenizer is loaded once, before timing (as a run does, once).
Each repeat uses an empty cache directory.

Baseline, in the same run: TRL's `SFTTrainer` preparing the same rows (as conversational
prompt/completion, so that only the completion is trained, with BFD packing into the same
max_length), from an in-memory `datasets.Dataset`, so that no datasets cache is involved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

ALPACA = "../shared/data/instruct/alpaca_5000.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tunelab.data.batching import pack
    from tunelab.data.dataset import DataOptions, tokenize_file
    from tunelab.models import pull

    folder = pull(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    options = DataOptions(max_length=args.max_length)
    cold, warm = [], []
    home = os.environ.get("TUNELAB_HOME")
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as empty:
            os.environ["TUNELAB_HOME"] = empty  # an empty data cache
            for times in (cold, warm):
                start = time.perf_counter()
                data = tokenize_file(ALPACA, tokenizer, options)
                rows = pack([e for e in data.examples if e.usable], args.max_length)
                times.append(time.perf_counter() - start)
    os.environ.pop("TUNELAB_HOME") if home is None else os.environ.update(TUNELAB_HOME=home)
    trl = trl_seconds(tokenizer, folder, args.max_length, args.repeats)
    tokens = sum(len(e.input_ids) for e in data.examples)
    fill = tokens / (len(rows) * args.max_length)
    print(
        f"{args.model}: {len(data.examples)} examples, {tokens:,} tokens -> {len(rows)} rows of "
        f"{args.max_length} ({fill:.1%} full)"
    )
    print(
        f"cold (read, render, tokenise, pack): {statistics.median(cold):.2f} s  (runs: "
        + ", ".join(f"{t:.2f}" for t in cold)
        + ")"
    )
    print(
        f"warm (from the cache, pack):         {statistics.median(warm):.2f} s  (runs: "
        + ", ".join(f"{t:.2f}" for t in warm)
        + ")"
    )
    if trl:
        import trl as trl_module

        print(
            f"TRL {trl_module.__version__} SFTTrainer preparation: {statistics.median(trl):.2f} s  (runs: "
            + ", ".join(f"{t:.2f}" for t in trl)
            + f"); tunelab cold is {statistics.median(trl) / statistics.median(cold):.1f}x faster"
        )


def trl_seconds(tokenizer, folder, max_length: int, repeats: int) -> list[float]:
    """Seconds TRL's SFTTrainer takes to tokenise and pack the same rows (empty if TRL is not installed)."""
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        print("(TRL not installed: pip install -e '.[dev]' for the baseline)")
        return []
    from transformers import AutoModelForCausalLM

    from tunelab.data.formats import load_records

    records, _ = load_records(ALPACA)
    rows = [
        {
            "prompt": [{"role": m["role"], "content": m["content"]} for m in r.messages[:-1]],
            "completion": [{"role": "assistant", "content": r.messages[-1]["content"]}],
        }
        for r in records
    ]
    model = AutoModelForCausalLM.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, packing=True, max_length=max_length, report_to=[], use_cpu=True)
        trainer = SFTTrainer(model, args=config, train_dataset=Dataset.from_list(rows[:8]), processing_class=tokenizer)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dataset = Dataset.from_list(rows)
            trainer._prepare_dataset(dataset, tokenizer, config, True, None, "train")
            times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
