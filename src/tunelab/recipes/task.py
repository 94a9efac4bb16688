"""Generative task fine-tuning (`method: task`): summarise, translate, answer, on (source, target) pairs.

    tunelab train configs/task-smollm2-dialogsum.yaml
    tunelab eval runs/task-smollm2-dialogsum --data ../shared/data/summarize/dialogsum.test.jsonl

A decoder-only model gets each source as the user turn `data.prompt` (through its chat template, or
the Alpaca layout) and learns the target only; an encoder-decoder model (T5, BART) reads the source
and learns the target as its decoder output. During training the evaluation data is scored by loss
and by generation (ROUGE-1/2/L, BLEU, chrF, exact match against every reference), on at most
`generation.max_examples` examples; at the end on all of them, with the predictions kept in
`eval_predictions.jsonl`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.data.dataset import DataOptions, renderer_for
from tunelab.data.records import Pair
from tunelab.data.render import Example, Renderer
from tunelab.errors import UserError
from tunelab.fs import atomic_write_text
from tunelab.metrics import generation_metrics
from tunelab.recipes.common import (
    check_new_run,
    final_step,
    read_records,
    restore_best,
    run_loop,
    split_records,
    write_final,
    write_summary,
)
from tunelab.train.loop import BatchPlan, Loop


class Seq2SeqObjective(torch.nn.Module):
    """forward(input_ids, attention_mask, labels) -> (summed target-token loss, target tokens, hits)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(self, input_ids, attention_mask, labels):
        decoder_input_ids = self.base.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            decoder_input_ids=decoder_input_ids).logits.float()  # fmt: skip
        trained = labels != -100
        loss = F.cross_entropy(logits[trained], labels[trained], reduction="sum")
        return loss, int(trained.sum()), int((logits[trained].argmax(-1) == labels[trained]).sum())


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    renderer: Renderer
    encoder_decoder: bool
    eval_records: list[Pair]
    train: list[Example]
    plan: BatchPlan
    eval_batches: list[dict] | None
    precision: tuple[str, str]


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    check_new_run(run_dir, resume)
    started = time.perf_counter()
    s = setup(cfg)
    limit = cfg.generation.max_examples
    evaluations: dict[int, tuple[dict, list[str]]] = {}  # step -> scores and predictions on all eval records

    def evaluator() -> dict:
        metrics, predictions = score(s, cfg, s.eval_records[:limit], "evaluating")
        if limit is None or limit >= len(s.eval_records):  # the end need not generate for that step again
            evaluations[loop.state["step"]] = metrics, predictions
        return {f"eval_{k}": v for k, v in metrics.items()}

    loop = Loop(objective(s), s.model, cfg.train, run_dir, s.plan, s.eval_batches, s.precision[0],
                cfg.train.best_metric, evaluator=evaluator if s.eval_records else None)  # fmt: skip

    def announce():
        print(f"tunelab: task on {cfg.model} ({cfg.tuning.mode}, {'encoder-decoder' if s.encoder_decoder else 'decoder'}"
              f"): {len(s.train):,} training pairs, {len(s.eval_records):,} for evaluation -> {loop.total_steps} steps",
              file=sys.stderr)  # fmt: skip

    state = run_loop(loop, cfg, resume, announce)
    return finish(cfg, s, loop, state, evaluations, time.perf_counter() - started)


def objective(s: Setup) -> torch.nn.Module:
    from tunelab.train.causal_lm import CausalLMObjective

    return Seq2SeqObjective(s.model) if s.encoder_decoder else CausalLMObjective(s.model)


# --- data and model --------------------------------------------------------------------------------


def read_pairs(spec: str, cfg: RunConfig, held_out: bool = False) -> list[Pair]:
    return read_records(spec, cfg, Pair, "method task needs (source, target) pairs (e.g. dialogue/summary, "
                        "source/target, or parallel text dir/train.{en,de})", held_out)  # fmt: skip


def is_encoder_decoder(folder: Path) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(folder), "is_encoder_decoder", False))


def load_task_model(folder: Path):
    """(model, tokenizer, encoder_decoder) for generation tasks, in eval mode; a peft adapter on its base."""
    from transformers import AutoModelForSeq2SeqLM

    from tunelab.inference import base_folder, load_causal_lm, load_model

    if is_encoder_decoder(base_folder(folder)):
        return (*load_model(folder, AutoModelForSeq2SeqLM), True)
    return (*load_causal_lm(folder), False)


def setup(cfg: RunConfig) -> Setup:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tunelab.models import resolve_model
    from tunelab.models.tuning import apply_tuning
    from tunelab.recipes import sft
    from tunelab.train.precision import resolve_precision

    hf_logging.disable_progress_bar()
    folder = resolve_model(cfg.model)
    encoder_decoder = is_encoder_decoder(folder)
    if not encoder_decoder:
        from tunelab.inference import check_causal_lm

        check_causal_lm(folder, "method task (a decoder-only or an encoder-decoder model)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_records = read_pairs(cfg.data.train, cfg)
    eval_records = read_pairs(cfg.data.eval, cfg, held_out=True) if cfg.data.eval else []
    train_records, eval_records = split_records(train_records, eval_records, cfg)
    renderer = renderer_for(tokenizer, DataOptions.from_config(cfg.data))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.train.seed)
    if encoder_decoder:
        train = [e for e in renderer.seq2seq(train_records) if e.input_ids and e.labels]
        held_out = renderer.seq2seq(eval_records)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)
        plan = _seq2seq_plan(train, cfg.train.batch_size, cfg.train.seed, pad_id)
        batches = [collate_seq2seq(held_out[k : k + cfg.train.batch_size], pad_id)
                   for k in range(0, len(held_out), cfg.train.batch_size)]  # fmt: skip
        task_type = "SEQ_2_SEQ_LM"
    else:
        train = [e for e in renderer.pairs(train_records, cfg.data.prompt) if e.usable]
        held_out = [e for e in renderer.pairs(eval_records, cfg.data.prompt) if e.usable]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        plan = sft.batch_plan(train, cfg, pad_id)
        batches = sft._eval_batches(held_out, cfg, pad_id) if held_out else None
        task_type = "CAUSAL_LM"
    if not train:
        raise UserError(f"{cfg.data.train}: no pair left to train on (see `tunelab data validate`)")
    model = apply_tuning(model, cfg.tuning, task_type=task_type)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Setup(model, tokenizer, renderer, encoder_decoder, eval_records, train, plan,
                 batches or None, resolve_precision(cfg.train.precision, device))  # fmt: skip


def collate_seq2seq(examples: list[Example], pad_id: int) -> dict:
    """Right-padded sources with their attention mask; targets padded with -100; `count` = target tokens."""
    sources = max(len(e.input_ids) for e in examples)
    targets = max(len(e.labels) for e in examples)
    input_ids = torch.full((len(examples), sources), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(examples), targets), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.as_tensor(e.input_ids)
        attention_mask[b, : len(e.input_ids)] = 1
        labels[b, : len(e.labels)] = torch.as_tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "count": int((labels != -100).sum()),
            "real_tokens": sum(len(e.input_ids) + len(e.labels) for e in examples)}  # fmt: skip


def _seq2seq_plan(examples: list[Example], size: int, seed: int, pad_id: int) -> BatchPlan:
    from tunelab.data.batching import group_by_length

    lengths = [len(e.input_ids) + len(e.labels) for e in examples]
    return BatchPlan(len(examples), lambda epoch: [collate_seq2seq([examples[i] for i in g], pad_id)
                                                   for g in group_by_length(lengths, size, seed + epoch)])  # fmt: skip


# --- generation and scores ---------------------------------------------------------------------------


def prompts_for(records: list[Pair], tokenizer, renderer: Renderer | None, encoder_decoder: bool, prompt: str,
                max_length: int) -> list[list[int]]:  # fmt: skip
    """What the model reads for each source: the source itself (encoder-decoder), or the rendered prompt."""
    if encoder_decoder:
        return tokenizer([r.source for r in records], truncation=True, max_length=max_length)["input_ids"]
    out = []
    for r in records:
        ids = renderer.prompt_ids([{"role": "user", "content": prompt.format(source=r.source)}])
        out.append(ids[-max_length:])
    return out


def predict(model, tokenizer, records: list[Pair], renderer, encoder_decoder: bool, cfg: RunConfig,
            description: str = "generating") -> list[str]:  # fmt: skip
    from tunelab.inference import generate_batch

    g = cfg.generation
    prompts = prompts_for(records, tokenizer, renderer, encoder_decoder, cfg.data.prompt, cfg.data.max_length)
    return generate_batch(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, num_beams=g.num_beams,
                          batch_size=g.batch_size, seed=cfg.train.seed, description=description)  # fmt: skip


def score(s: Setup, cfg: RunConfig, records: list[Pair], description: str) -> tuple[dict, list[str]]:
    predictions = predict(s.model, s.tokenizer, records, s.renderer, s.encoder_decoder, cfg, description)
    return generation_metrics(predictions, [r.references or [r.target] for r in records]), predictions


# --- the end of a run ---------------------------------------------------------------------------------


def finish(cfg: RunConfig, s: Setup, loop: Loop, state: dict, evaluations: dict, wall: float) -> dict:
    run_dir = Path(cfg.output_dir)
    best = restore_best(loop, s.model)
    if not loop.accelerator.is_main_process:
        return {}
    write_final(run_dir, s.model, s.tokenizer, None if s.encoder_decoder else s.renderer.template)
    final_metrics = None
    if s.eval_records:
        s.model.eval()
        done = evaluations.get(final_step(state, best))
        final_metrics, predictions = done or score(s, cfg, s.eval_records, "final evaluation")
        atomic_write_text(run_dir / "eval_metrics.json", json.dumps(final_metrics, indent=2) + "\n")
        write_predictions(run_dir / "eval_predictions.jsonl", s.eval_records, predictions)
        shown = ", ".join(f"{k} {v:.2f}" for k, v in final_metrics.items())
        print(f"tunelab: final evaluation on {len(s.eval_records):,} examples: {shown}", file=sys.stderr)
    return write_summary(cfg, loop, state, s.model, s.precision[0], wall, best, eval=final_metrics,
                         train_examples=len(s.train), eval_examples=len(s.eval_records),
                         architecture="encoder-decoder" if s.encoder_decoder else "decoder")  # fmt: skip


def write_predictions(path: Path, records: list[Pair], predictions: list[str]) -> None:
    lines = [json.dumps({"where": r.where, "source": r.source, "prediction": p, "references": r.references or [r.target]},
                        ensure_ascii=False) for r, p in zip(records, predictions)]  # fmt: skip
    atomic_write_text(path, "".join(line + "\n" for line in lines))
