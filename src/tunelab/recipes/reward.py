"""Reward model (`method: reward`): a scalar head trained on preference pairs with the Bradley-Terry loss.

    tunelab train configs/reward-smollm2-hh.yaml

Each pair is the prompt with its chosen and with its rejected response, rendered as the model's chat
(the template of `data.template`); the model (a causal LM or an encoder with a one-output
sequence-classification head) scores both, and the loss is -log sigmoid(r_chosen - r_rejected). The
evaluation reports the held-out pairs' loss, pairwise accuracy (chosen scored higher) and mean margin.
`final/` is a plain `AutoModelForSequenceClassification` with `num_labels=1` (a LoRA run merged into
its base), so transformers alone scores text with it: `model(**tokenizer(text, return_tensors="pt")).logits`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.data.render import Example
from tunelab.errors import UserError
from tunelab.fs import atomic_write_text
from tunelab.losses import bradley_terry, preference_metrics
from tunelab.recipes.classify import pad_right, plain_model, tuned_classifier
from tunelab.recipes.common import (
    check_new_run,
    final_step,
    preference_pairs,
    restore_best,
    run_loop,
    write_final,
    write_summary,
)
from tunelab.train.loop import BatchPlan, Loop, shuffled_groups


class RewardObjective(torch.nn.Module):
    """forward(input_ids, attention_mask) -> (summed Bradley-Terry loss, pairs, pairs ranked right).

    A batch holds its pairs' chosen rows, then their rejected rows: one forward pass scores both.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        chosen, rejected = score(self.model, input_ids, attention_mask).chunk(2)  # (P,), (P,)
        return bradley_terry(chosen, rejected).sum(), chosen.numel(), int((chosen > rejected).sum())


def score(model, input_ids, attention_mask) -> torch.Tensor:
    """(B,) scalar rewards: the head's one output at each row's last real token."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float().squeeze(-1)


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    train: list[tuple[Example, Example]]
    eval: list[tuple[Example, Example]]
    pad_id: int
    precision: tuple[str, str]
    template: str | None


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    check_new_run(run_dir, resume)
    started = time.perf_counter()
    s = setup(cfg)
    batches = [collate(s.eval[k : k + cfg.train.batch_size], s.pad_id) for k in range(0, len(s.eval), cfg.train.batch_size)]
    objective = RewardObjective(s.model)
    evaluations: dict[int, dict] = {}

    def evaluator() -> dict:
        evaluations[loop.state["step"]] = metrics = evaluate(s.model, batches)
        return {f"eval_{k}": v for k, v in metrics.items()}

    plan = BatchPlan(len(s.train), lambda epoch: [collate([s.train[i] for i in g], s.pad_id)
                                                  for g in shuffled_groups(len(s.train), cfg.train.batch_size, cfg.train.seed + epoch)])  # fmt: skip
    loop = Loop(objective, s.model, cfg.train, run_dir, plan, None, s.precision[0], cfg.train.best_metric,
                evaluator=evaluator if s.eval else None)  # fmt: skip

    def announce():
        from tunelab.models.tuning import count_parameters

        trainable, total = count_parameters(s.model)
        print(f"tunelab: reward model on {cfg.model} ({cfg.tuning.mode}): {trainable:,} of {total:,} parameters train; "
              f"{len(s.train):,} pairs, {len(s.eval):,} held out -> {loop.total_steps} steps", file=sys.stderr)  # fmt: skip

    state = run_loop(loop, cfg, resume, announce)
    best = restore_best(loop, s.model)
    if not loop.accelerator.is_main_process:
        return {}
    write_final(run_dir, plain_model(s.model), s.tokenizer, s.template)
    final = None
    if batches:
        final = evaluations.get(final_step(state, best)) or evaluate(s.model, batches)
        atomic_write_text(run_dir / "eval_metrics.json", json.dumps(final, indent=2) + "\n")
        print(f"tunelab: held-out pairs: accuracy {final['accuracy']:.4f}, mean margin {final['margin']:.4f} "
              f"({len(s.eval):,} pairs)", file=sys.stderr)  # fmt: skip
    return write_summary(cfg, loop, state, s.model, s.precision[0], time.perf_counter() - started, best, "pairs",
                         train_examples=len(s.train), eval=final)  # fmt: skip


# --- data and model ---------------------------------------------------------------------------------


def collate(pairs: list[tuple[Example, Example]], pad_id: int) -> dict:
    """The pairs' chosen rows, then their rejected rows, right-padded: (2P, T)."""
    return {**pad_right([c for c, _ in pairs] + [r for _, r in pairs], pad_id), "count": len(pairs)}


@torch.no_grad()
def evaluate(model, batches: list[dict]) -> dict:
    """Held-out pairs: mean Bradley-Terry loss, pairwise accuracy, mean margin and rewards."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for batch in batches:
        c, r = score(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"loss": float(bradley_terry(chosen, rejected).mean()), **preference_metrics(chosen, rejected)}


def setup(cfg: RunConfig) -> Setup:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tunelab.models import resolve_model
    from tunelab.train.precision import resolve_precision

    hf_logging.disable_progress_bar()
    folder = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template, train_pairs, eval_pairs = preference_pairs(cfg, tokenizer)
    model, _ = tuned_classifier(folder, tokenizer, ["reward"], cfg)  # num_labels=1: one scalar per text
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Setup(model, tokenizer, train_pairs, eval_pairs, tokenizer.pad_token_id,
                 resolve_precision(cfg.train.precision, device), template)  # fmt: skip
