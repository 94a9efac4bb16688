"""tunelab grpo against TRL's GRPOTrainer with the same settings: completions/s and peak memory.

    .venv/bin/python benchmarks/grpo_vs_trl.py                 # SmolLM2-135M-Instruct, 8 steps each
    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 4 --sweep

The task is benchmarks/grpo_arithmetic.py's (generated multi-step arithmetic), with its reward functions
(`correct` weight 1, `formatted` weight 0.2) passed to both trainers unchanged: they have TRL's signature.
Both train SmolLM2-135M-Instruct with LoRA r 16 / alpha 32 / dropout 0 on every linear layer, lr 1e-4
constant (no warmup), DAPO's loss with clip-higher (epsilon 0.2, epsilon_high 0.28), no KL (beta 0), one
optimizer step on each batch of completions, and at each step 8 completions of up to 48 tokens sampled at
temperature 0.7 to each of 4 prompts (32 completions a step), `precision: auto` (bf16 autocast where the CPU
does bf16 natively, fp32 otherwise; TRL gets the same choice). Each trainer runs in a fresh process, so
that its peak RSS is its own; evaluation and checkpoints are off in both.

- **tunelab**: `tunelab train`: the continuous batcher samples the step's 32 completions as one batch, and
  they train as one batch (`train.batch_size: 4`);
- **tunelab, 8 x 4**: the same sampling, the update in 4 micro-batches of 8 as TRL's (`train.batch_size: 1`,
  `train.grad_accum: 4`): less memory.
- **TRL defaults**: what GRPOConfig does unless told otherwise: gradient checkpointing on, 8 completions a
  micro-batch (x 4 accumulation, one generation batch of 32 a step), `model.generate` to sample.
- **TRL best**: the fastest setting measured here (`--sweep`): checkpointing off (it recomputes the forward),
  8 x 4. The sweep also runs the 32 completions as one micro-batch (slower and twice the memory: padded to
  the longest) and that with TRL's transformers continuous-batching generation
  (`use_transformers_continuous_batching`, slower still on a CPU).

Reported: completions/s and completion tokens/s over the training loop's wall time (sampling, rewards and the
update; the model's loading excluded), the completions' mean length (the two samplers draw different
completions, so their lengths differ: tokens/s is the fairer speed), peak RSS of the process, and the mean
reward; with the ratios of each tunelab setting to TRL best (the headline) and TRL defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "benchmarks" / "grpo_arithmetic.py"

TRL_RUN = r"""
import importlib.util, json, resource, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
from tunelab.precision import resolve_precision

folder, data, task, steps, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
setting = json.loads(sys.argv[6])  # gradient_checkpointing, batch (completions a micro-batch), continuous
spec = importlib.util.spec_from_file_location("grpo_arithmetic", task)
rewards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rewards)
rows = [json.loads(line) for line in open(data)]
rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
precision = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu").name
config = GRPOConfig(
    output_dir=out, max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
    per_device_train_batch_size=setting["batch"], gradient_accumulation_steps=32 // setting["batch"],
    gradient_checkpointing=setting["gradient_checkpointing"], num_generations=8, max_completion_length=48,
    temperature=0.7, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, num_iterations=1,
    reward_weights=[1.0, 0.2], scale_rewards="group", bf16=precision == "bf16",
    use_cpu=not torch.cuda.is_available(), use_transformers_continuous_batching=setting.get("continuous", False),
    logging_steps=1, save_strategy="no", report_to=[], seed=42, dataloader_num_workers=0,
)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = GRPOTrainer(model, reward_funcs=[rewards.correct, rewards.formatted], args=config,
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora)
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
logs = [e for e in trainer.state.log_history if "reward" in e]
length = sum(e["completions/mean_length"] for e in logs) / len(logs)
print(json.dumps({"seconds": seconds, "completions": steps * 32, "mean_length": length,
                  "reward": sum(e["reward"] for e in logs) / len(logs),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TUNELAB_CONFIG = """\
method: grpo
model: {model}
output_dir: {out}
data:
  train: {data}
  max_length: 96
tuning:
  mode: lora
  lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
grpo:
  rewards: [{task}:correct, {task}:formatted]
  reward_weights: [1.0, 0.2]
  num_generations: 8
  max_new_tokens: 48
  temperature: 0.7
  loss: dapo
  epsilon_high: 0.28
train:
  batch_size: 4
  max_steps: {steps}
  lr: 1.0e-4
  scheduler: constant
  warmup_ratio: 0
  log_every: 1
  seed: 42
"""


def run_tunelab(model: str, data: Path, tmp: Path, steps: int, overrides: list[str]) -> dict:
    run = tmp / f"tunelab-{len(list(tmp.glob('tunelab-*.yaml')))}"
    config = run.with_suffix(".yaml")
    config.write_text(TUNELAB_CONFIG.format(model=model, out=run, data=data, task=TASK, steps=steps))
    subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(config), *overrides],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )
    summary = json.loads((run / "summary.json").read_text())
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in train if e["split"] == "train"]
    return {
        "seconds": summary["train_seconds"],
        "completions": summary["trained_responses"],
        "mean_length": sum(e["completion_length"] for e in train) / len(train),
        "reward": sum(e["reward"] for e in train) / len(train),
        "peak_rss_mb": summary["peak_memory_mb"],
    }


# name -> TRL's settings: gradient checkpointing, completions a micro-batch (of 32 a step), generation
TRL_DEFAULTS = {"TRL defaults": {"gradient_checkpointing": True, "batch": 8}}
TRL_BEST = {"TRL best": {"gradient_checkpointing": False, "batch": 8}}
TRL_SWEEP = {
    "TRL no checkpointing, 32 x 1": {"gradient_checkpointing": False, "batch": 32},
    "TRL no checkpointing, 32 x 1, continuous-batching generation": {
        "gradient_checkpointing": False,
        "batch": 32,
        "continuous": True,
    },
}


def main() -> None:
    from against_trl import add_options, run_trl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    add_options(parser, "micro-batches as TRL's: --set train.batch_size=1 --set train.grad_accum=4")
    args = parser.parse_args()
    sys.path.insert(0, str(TASK.parent))
    from grpo_arithmetic import build

    from tunelab.models import pull
    from tunelab.precision import resolve_precision, training_device

    folder = pull(args.model)
    precision = resolve_precision("auto", training_device()).name
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        build(tmp / "arithmetic")
        data = tmp / "arithmetic" / "train.jsonl"
        results = {"tunelab": run_tunelab(args.model, data, tmp, args.steps, args.set)}
        split = ["train.batch_size=1", "train.grad_accum=4"]  # the update in TRL's 4 micro-batches of 8
        results["tunelab, 8 x 4"] = run_tunelab(args.model, data, tmp, args.steps, [*args.set, *split])
        settings = {} if args.no_trl else {**TRL_BEST, **TRL_DEFAULTS, **(TRL_SWEEP if args.sweep else {})}
        for label, setting in settings.items():
            results[label] = run_trl(TRL_RUN, tmp, setting, folder, data, TASK, args.steps, cwd=ROOT)
    for r in results.values():
        r["completions_per_s"] = r["completions"] / r["seconds"]
        r["tokens_per_s"] = r["completions"] * r["mean_length"] / r["seconds"]
    print(
        f"\n{args.model}, {args.steps} steps of 32 completions, precision {precision}; "
        f"machine: {platform.processor() or platform.machine()}"
    )
    print("| trainer | completions/s | completion tokens/s | mean length | peak RSS | mean reward | seconds |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['completions_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['mean_length']:.1f} | "
            f"{r['peak_rss_mb'] / 1024:.2f} GB | {r['reward']:.3f} | {r['seconds']:.0f} |"
        )
    for mine in ("tunelab", "tunelab, 8 x 4"):
        ours = results[mine]
        for label in ("TRL best", "TRL defaults"):
            if label in results:
                theirs = results[label]
                print(
                    f"{mine} / {label}: completions/s x{ours['completions_per_s'] / theirs['completions_per_s']:.2f}, "
                    f"completion tokens/s x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}, "
                    f"peak RSS x{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}"
                )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
