"""Instruction-tuning (`method: sft`): a causal LM learns to answer, with the loss on the answers only.

    tunelab train configs/sft-smollm2-alpaca.yaml
    tunelab train --resume runs/sft-smollm2          # after a crash or kill: continues exactly

setup() builds the model (full, LoRA/DoRA or freeze), renders and batches the data; train() runs the
shared loop; finish() writes `final/` (loadable by plain transformers, or peft for an adapter, with
the tokenizer and the chat template used in training) and `summary.json`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.data.batching import collate_packed, collate_padded, group_by_length, pack
from tunelab.data.dataset import DataOptions, Tokenized, renderer_for, tokenize_file
from tunelab.errors import UserError
from tunelab.recipes.common import (
    check_new_run,
    read_metrics,
    restore_best,
    run_loop,
    split_records,
    write_final,
    write_summary,
)
from tunelab.train.loop import BatchPlan, Loop, shuffled_groups

SHOWN_PROBLEMS = 20


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    template: str
    train: Tokenized
    eval: Tokenized | None
    plan: BatchPlan
    eval_batches: list[dict] | None
    precision: tuple[str, str]
    train_count: int = 0
    eval_count: int = 0


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """Train as `cfg` says into `cfg.output_dir`; with `resume`, continue from its last checkpoint."""
    run_dir = Path(cfg.output_dir)
    check_new_run(run_dir, resume)
    started = time.perf_counter()
    s = setup(cfg)
    from tunelab.train.causal_lm import CausalLMObjective

    # Creating the loop starts the process group under `accelerate launch`: every process has checked
    # the run directory above before the first one writes into it below.
    loop = Loop(CausalLMObjective(s.model), s.model, cfg.train, run_dir, s.plan, s.eval_batches, s.precision[0],
                cfg.train.best_metric)  # fmt: skip
    state = run_loop(loop, cfg, resume, lambda: _announce(cfg, s, loop))
    return finish(cfg, s, loop, state, time.perf_counter() - started)


def setup(cfg: RunConfig) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bars would interleave with ours

    from tunelab.inference import check_causal_lm
    from tunelab.models import resolve_model
    from tunelab.models.tuning import apply_tuning
    from tunelab.train.precision import resolve_precision

    folder = resolve_model(cfg.model)
    check_causal_lm(folder, "instruction-tuning (method sft)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    options = DataOptions.from_config(cfg.data)
    train = _load(cfg.data.train, tokenizer, options)
    held_out = _load(cfg.data.eval, tokenizer, options) if cfg.data.eval else None
    template = renderer_for(tokenizer, options).template
    torch.manual_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = apply_tuning(model, cfg.tuning)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples, eval_examples = split_examples(train, held_out, cfg)
    plan = batch_plan(train_examples, cfg, pad_id)
    eval_batches = _eval_batches(eval_examples, cfg, pad_id) if eval_examples else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Setup(model, tokenizer, template, train, held_out, plan, eval_batches,
                 resolve_precision(cfg.train.precision, device), len(train_examples), len(eval_examples))  # fmt: skip


def split_examples(train: Tokenized, held_out: Tokenized | None, cfg: RunConfig) -> tuple[list, list]:
    """(training, evaluation) examples: data.eval, or data.eval_split held out of the training data
    (a seeded shuffle, so the same rows every time); then at most data.max_examples for training."""
    examples = [e for e in train.examples if e.usable]
    evaluation = [e for e in held_out.examples if e.usable] if held_out else []
    return split_records(examples, evaluation, cfg)


def batch_plan(examples: list, cfg: RunConfig, pad_id: int) -> BatchPlan:
    """Micro-batches per epoch: packed rows or length-grouped examples, shuffled by seed + epoch."""
    if not examples:
        raise UserError(f"{cfg.data.train}: no example left to train on (see `tunelab data validate`)")
    size, seed = cfg.train.batch_size, cfg.train.seed
    if cfg.data.batching == "pack":
        rows = pack(examples, cfg.data.max_length)
        return BatchPlan(len(rows), lambda epoch: [collate_packed([rows[i] for i in g], pad_id)
                                                   for g in shuffled_groups(len(rows), size, seed + epoch)])  # fmt: skip
    lengths = [len(e.input_ids) for e in examples]
    return BatchPlan(len(examples), lambda epoch: [collate_padded([examples[i] for i in g], pad_id)
                                                   for g in group_by_length(lengths, size, seed + epoch)])  # fmt: skip


def _eval_batches(examples, cfg: RunConfig, pad_id: int) -> list[dict]:
    if cfg.data.batching == "pack":
        rows = pack(examples, cfg.data.max_length)
        return [collate_packed(rows[i : i + cfg.train.batch_size], pad_id) for i in range(0, len(rows), cfg.train.batch_size)]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    size = cfg.train.batch_size
    return [collate_padded([examples[i] for i in order[k : k + size]], pad_id) for k in range(0, len(order), size)]


def _load(spec: str, tokenizer, options: DataOptions) -> Tokenized:
    data = tokenize_file(spec, tokenizer, options)
    if data.errors:
        lines = [str(p) for p in data.errors[:SHOWN_PROBLEMS]]
        if len(data.errors) > SHOWN_PROBLEMS:
            lines.append(f"... and {len(data.errors) - SHOWN_PROBLEMS} more (tunelab data validate {spec} lists them)")
        raise UserError(*lines)
    invalid = [e for e in data.examples if e.status == "invalid"]
    if invalid:
        raise UserError(*[f"{e.where}: {e.problem}" for e in invalid[:SHOWN_PROBLEMS]])
    return data


def _announce(cfg: RunConfig, s: Setup, loop: Loop) -> None:
    from tunelab.models.tuning import count_parameters

    trainable, total = count_parameters(s.model)
    counts = {k: sum(e.status == k for e in s.train.examples) for k in ("truncated", "dropped", "untrained")}
    skipped = sum(p.severity == "warning" for p in s.train.problems)
    print(f"tunelab: {cfg.method} on {cfg.model} ({cfg.tuning.mode}): {trainable:,} of {total:,} parameters train",
          file=sys.stderr)  # fmt: skip
    print(f"  data: {s.train_count:,} training examples, {s.eval_count:,} for evaluation (of the file's rows: {skipped} skipped when read; "
          f"{counts['truncated']} truncated, {counts['dropped']} dropped, {counts['untrained']} with nothing to "
          f"train{'; cached' if s.train.cached else ''}) -> {loop.plan.items:,} {cfg.data.batching} items, "
          f"{loop.total_steps} steps", file=sys.stderr)  # fmt: skip
    print(f"  precision {s.precision[0]} ({s.precision[1]})", file=sys.stderr)


def finish(cfg: RunConfig, s: Setup, loop: Loop, state: dict, wall: float) -> dict:
    """final/ (the best checkpoint if there was an evaluation), summary.json; returns the summary."""
    run_dir = Path(cfg.output_dir)
    best = restore_best(loop, s.model)
    if not loop.accelerator.is_main_process:
        return {}
    write_final(run_dir, s.model, s.tokenizer, s.template)
    last_eval = next((e for e in reversed(read_metrics(run_dir)) if e["split"] == "eval"), None)
    return write_summary(cfg, loop, state, s.model, s.precision[0], wall, best, train_examples=s.train_count,
                         final_eval=last_eval)
