"""tunelab sft against TRL's SFTTrainer, at TRL's defaults and at its best settings on this machine: same
model, rows, LoRA, precision, max length and steps.

    .venv/bin/python benchmarks/sft_vs_trl.py                          # SmolLM2, 200 Alpaca rows, 6 steps
    .venv/bin/python benchmarks/sft_vs_trl.py --model gemma3-270m --steps 3
    .venv/bin/python benchmarks/sft_vs_trl.py --sweep                  # every TRL setting below, to pick its best

Each trainer runs in a fresh process (so that its peak RSS is its own): tunelab through `tunelab train`
(packed rows, 1 x 8 micro-batches; the command runs on jemalloc where it is installed, as a user's does:
`TUNELAB_ALLOCATOR=system` for glibc's malloc, `LD_PRELOAD=.../libjemalloc.so.2` on this script for TRL on
jemalloc too), TRL through `SFTTrainer` with completion-only loss on the same rows
(conversational prompt/completion, the model's chat template):
- **TRL defaults**: what SFTConfig does unless told otherwise: gradient checkpointing on, no packing
  (padded batches), here 2 sequences x 4 accumulation;
- **TRL best**: what an experienced user sets on a CPU: checkpointing off (it recomputes the forward,
  half the speed here), packing (BFD, padding-free position_ids, like tunelab's), 1 sequence x 8
  accumulation (the same split as tunelab). `--sweep` also runs checkpointing off with 2 x 4 and
  checkpointing on with packing, which were slower.
Both take the same rows, LoRA r 16 / alpha 32 / dropout 0 (peft's default) on all linear layers, lr 1e-3
cosine without warmup, max_length 512, 8 sequences (packed rows) per optimizer step, and `precision: auto`
(bf16 autocast where the CPU or GPU does bf16 natively, fp32 otherwise; TRL gets the same choice).
tunelab's accumulation is normalised by the step's tokens, so its update is the same whatever the split.
Reported: real (non-padding) tokens/s of the training loop, peak RSS of the process, the mean train loss
of the last 2 steps, model FLOPs utilisation (the FLOPs a token needs, from the model's config, times
tokens/s, over this machine's matmul peak measured in the same run: benchmarks/mfu.py), and the ratios
tunelab / TRL best (the headline) and tunelab / TRL defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ALPACA = Path("../shared/data/instruct/alpaca_5000.json")

TRL_RUN = r"""
import json, resource, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from tunelab.precision import resolve_precision

folder, data, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
setting = json.loads(sys.argv[5])  # packing, gradient_checkpointing, batch (sequences per micro-batch)
rows = [json.loads(line) for line in open(data)]
tokenizer = AutoTokenizer.from_pretrained(folder)
if tokenizer.chat_template is None:
    from tunelab.data.render import chat_template_for
    tokenizer.chat_template = chat_template_for(tokenizer, "alpaca")
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
precision = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu").name
config = SFTConfig(output_dir=out, packing=setting["packing"], gradient_checkpointing=setting["gradient_checkpointing"],
                   max_length=512, per_device_train_batch_size=setting["batch"],
                   gradient_accumulation_steps=8 // setting["batch"], learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0,
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


def run_tunelab(model: str, data: Path, tmp: Path, steps: int, batch: int, overrides: list[str]) -> dict:
    config = tmp / "tunelab.yaml"
    config.write_text(
        TUNELAB_CONFIG.format(
            model=model, out=tmp / "tunelab-run", data=data, steps=steps, batch=batch, accum=8 // batch
        )
    )
    subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(config), *overrides], check=True, stdout=subprocess.DEVNULL
    )
    summary = json.loads((tmp / "tunelab-run" / "summary.json").read_text())
    train = [json.loads(line) for line in (tmp / "tunelab-run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in train if e["split"] == "train"]
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "seconds": summary["train_seconds"],
        "peak_rss_mb": summary["peak_memory_mb"],
        "final_loss": sum(losses[-2:]) / 2,
        "tokens": summary["tokens"],
        "trained_tokens": summary["trained_tokens"],
    }


# name -> TRL's settings: packing, gradient checkpointing, sequences per micro-batch (of 8 per step)
TRL_DEFAULTS = {"TRL defaults": {"packing": False, "gradient_checkpointing": True, "batch": 2}}
TRL_BEST = {"TRL best": {"packing": True, "gradient_checkpointing": False, "batch": 1}}
TRL_SWEEP = {
    "TRL no checkpointing, packed 2 x 4": {"packing": True, "gradient_checkpointing": False, "batch": 2},
    "TRL checkpointing, packed 2 x 4": {"packing": True, "gradient_checkpointing": True, "batch": 2},
}


def main() -> None:
    from against_trl import add_options, run_trl

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--batch",
        type=int,
        choices=(1, 2, 4, 8),
        default=1,
        help="tunelab's packed rows per micro-batch (8 per optimizer step in all)",
    )
    add_options(parser, "to measure one setting: --set train.frozen_weights=fp32")
    args = parser.parse_args()
    from mfu import lora_training_flops_per_token, matmul_peak

    from tunelab.models import pull
    from tunelab.models.load import weights_dtype
    from tunelab.precision import resolve_precision, training_device

    folder = pull(args.model)
    precision = resolve_precision("auto", training_device()).name
    dtype = weights_dtype(precision)
    peak = matmul_peak(dtype)
    rows = json.loads(ALPACA.read_text())[: args.rows]
    rows = [r for r in rows if r["output"].strip()]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = tmp / "rows.jsonl"
        # One file for both: tunelab reads it as Alpaca; TRL gets the same rows as prompt/completion.
        (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

        def prompt(r):
            return f"{r['instruction']}\n\n{r['input']}" if r["input"].strip() else r["instruction"]

        data.write_text(
            "".join(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": prompt(r)}],
                        "completion": [{"role": "assistant", "content": r["output"]}],
                    }
                )
                + "\n"
                for r in rows
            )
        )
        results = {"tunelab": run_tunelab(args.model, tmp / "alpaca.jsonl", tmp, args.steps, args.batch, args.set)}
        settings = {} if args.no_trl else {**TRL_BEST, **TRL_DEFAULTS, **(TRL_SWEEP if args.sweep else {})}
        for label, setting in settings.items():
            results[label] = run_trl(TRL_RUN, tmp, setting, folder, data, args.steps)
    peak = max(peak, matmul_peak(dtype))  # again after the runs: the machine's speed drifts
    ours = results["tunelab"]
    flops = lora_training_flops_per_token(folder, ours["trained_tokens"] / ours["tokens"], r=16)
    for r in results.values():
        r["flops_per_s"] = r["tokens_per_s"] * flops.per_token
        r["mfu"] = r["flops_per_s"] / peak
    print(
        f"{args.model}: {len(rows)} Alpaca rows, {args.steps} steps of 8 sequences, max_length 512, LoRA r 16, "
        f"{precision}; {torch.get_num_threads()} threads"
    )
    print(
        f"training FLOPs per token {flops.per_token / 1e9:.3f} G (linear {flops.linear / 1e9:.3f}, attention "
        f"{flops.attention / 1e9:.3f}, output layer {flops.output / 1e9:.3f}, LoRA {flops.lora / 1e9:.3f}); "
        f"{precision} matmul peak {peak / 1e9:.0f} GFLOP/s (2048 x 2048)"
    )
    print(f"{'':<36} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6} {'peak RSS MB':>12} {'final loss':>11} {'seconds':>8}")
    for label, r in results.items():
        print(
            f"{label:<36} {r['tokens_per_s']:>9.1f} {r['flops_per_s'] / 1e9:>8.0f} {r['mfu']:>6.1%} "
            f"{r['peak_rss_mb']:>12.0f} {r['final_loss']:>11.4f} {r['seconds']:>8.1f}"
        )
    for label in (*TRL_BEST, *TRL_DEFAULTS):
        if label in results:
            trl = results[label]
            print(
                f"tunelab / {label}: throughput {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x, peak memory "
                f"{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x, final loss {ours['final_loss'] / trl['final_loss']:.3f}x"
            )
    print(json.dumps({"peak_flops": peak, "flops_per_token": flops.per_token, **results}))


if __name__ == "__main__":
    main()
