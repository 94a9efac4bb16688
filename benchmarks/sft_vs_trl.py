"""tunelab sft against TRL's SFTTrainer: same model, rows, LoRA, precision, max length and steps.

    .venv/bin/python benchmarks/sft_vs_trl.py                          # SmolLM2, 200 Alpaca rows, 6 steps
    .venv/bin/python benchmarks/sft_vs_trl.py --model gemma3-270m --steps 3

Each trainer runs in a fresh process (so that its peak RSS is its own): tunelab through `tunelab train`,
TRL through `SFTTrainer` with completion-only loss on the same rows (conversational prompt/completion,
the model's chat template), once with `packing=True` (BFD, padding-free position_ids, like tunelab's
default) and once with `packing=False` (padded batches); the faster of the two is TRL's figure.
Both take the same rows, LoRA r 16 / alpha 32 / dropout 0 (peft's default) on all linear layers, lr 1e-3
cosine without warmup, max_length 512, 8 sequences (packed rows) per optimizer step, and `precision: auto` (bf16 autocast
where the CPU or GPU does bf16 natively, fp32 otherwise; TRL gets the same choice). Reported: real
(non-padding) tokens/s of the training loop, peak RSS of the process, the mean train loss of the last
2 steps, and the ratios tunelab / TRL. Each runs its micro-batches its own way: TRL with 2 sequences x 4
accumulation and its default gradient checkpointing (SFTConfig turns it on), tunelab with 1 x 8 (`--batch`),
which needs no checkpointing to stay small (its accumulation is normalised by the step's tokens, so the
update is the same whatever the split).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ALPACA = Path("../shared/data/instruct/alpaca_5000.json")

TRL_RUN = r"""
import json, resource, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from tunelab.train.precision import resolve_precision

folder, data, out, packing, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
rows = [json.loads(line) for line in open(data)]
tokenizer = AutoTokenizer.from_pretrained(folder)
if tokenizer.chat_template is None:
    from tunelab.data.render import chat_template_for
    tokenizer.chat_template = chat_template_for(tokenizer, "alpaca")
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
precision = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu").name
config = SFTConfig(output_dir=out, packing=packing, max_length=512, per_device_train_batch_size=2 if packing else 8,
                   gradient_accumulation_steps=4, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0,
                   max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], bf16=precision == "bf16",
                   use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=42,
                   include_num_input_tokens_seen="non_padding")
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                     peft_config=lora)
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print(json.dumps({"tokens_per_s": trainer.state.num_input_tokens_seen / seconds, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "final_loss": sum(losses[-2:]) / len(losses[-2:]), "tokens": trainer.state.num_input_tokens_seen}))
"""

TUNELAB_CONFIG = """\
method: sft
model: {model}
output_dir: {out}
data:
  train: {data}
  max_length: 512
tuning:
  mode: lora
  lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
train:
  max_steps: {steps}
  batch_size: {batch}
  grad_accum: {accum}
  lr: 1.0e-3
  warmup_ratio: 0
  log_every: 1
"""


def run_tunelab(model: str, data: Path, tmp: Path, steps: int, batch: int) -> dict:
    config = tmp / "tunelab.yaml"
    config.write_text(TUNELAB_CONFIG.format(model=model, out=tmp / "tunelab-run", data=data, steps=steps, batch=batch,
                                            accum=8 // batch))
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(config)], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((tmp / "tunelab-run" / "summary.json").read_text())
    train = [json.loads(line) for line in (tmp / "tunelab-run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in train if e["split"] == "train"]
    return {"tokens_per_s": summary["tokens_per_s"], "seconds": summary["train_seconds"],
            "peak_rss_mb": summary["peak_memory_mb"], "final_loss": sum(losses[-2:]) / 2, "tokens": summary["tokens"]}


def run_trl(folder: Path, data: Path, tmp: Path, packing: bool, steps: int) -> dict:
    cmd = [sys.executable, "-c", TRL_RUN, str(folder), str(data), str(tmp / f"trl-{packing}"), "1" if packing else "0",
           str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, choices=(1, 2, 4, 8), default=1,
                        help="tunelab's packed rows per micro-batch (8 per optimizer step in all)")
    parser.add_argument("--no-trl", action="store_true", help="tunelab only (to check a change quickly)")
    args = parser.parse_args()
    from tunelab.models import pull

    folder = pull(args.model)
    rows = json.loads(ALPACA.read_text())[: args.rows]
    rows = [r for r in rows if r["output"].strip()]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = tmp / "rows.jsonl"
        # One file for both: tunelab reads it as Alpaca; TRL gets the same rows as prompt/completion.
        (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        prompt = lambda r: f"{r['instruction']}\n\n{r['input']}" if r["input"].strip() else r["instruction"]  # noqa: E731
        data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": prompt(r)}],
                                            "completion": [{"role": "assistant", "content": r["output"]}]}) + "\n"
                                for r in rows))
        results = {"tunelab": run_tunelab(args.model, tmp / "alpaca.jsonl", tmp, args.steps, args.batch)}
        for packing in (True, False) if not args.no_trl else ():
            results[f"TRL packing={packing}"] = run_trl(folder, data, tmp, packing, args.steps)
    if args.no_trl:
        print(json.dumps(results))
        return
    trl = max((v for k, v in results.items() if k.startswith("TRL")), key=lambda v: v["tokens_per_s"])
    print(f"{args.model}: {len(rows)} Alpaca rows, {args.steps} steps of 8 sequences, max_length 512, LoRA r 16")
    print(f"{'':<20} {'tokens/s':>9} {'peak RSS MB':>12} {'final loss':>11} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<20} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f} {r['final_loss']:>11.4f} {r['seconds']:>8.1f}")
    ours = results["tunelab"]
    print(f"tunelab / TRL (its faster run): throughput {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x, "
          f"peak memory {ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x, final loss {ours['final_loss'] / trl['final_loss']:.3f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
