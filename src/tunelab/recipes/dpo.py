"""Direct preference optimisation (`method: dpo`): a causal LM learns from preference pairs, with no
reward model and no sampling.

    tunelab train configs/dpo-smollm2-hh.yaml
    tunelab train --resume runs/dpo-smollm2-hh        # after a crash or kill: continues exactly

Each pair is the prompt with its chosen and with its rejected response, rendered through the model's
chat template; the policy scores both responses (their summed token log-probabilities), and the loss
pushes the chosen one up relative to the rejected one:

  sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where the
      reference is the frozen starting policy. Its log-probs are computed once for every pair before
      training (`dpo.precompute_reference`), or batch by batch: with LoRA by the same model with its
      adapter disabled (no second copy in memory), otherwise by a frozen copy.
  simpo (SimPO, Meng et al. 2024): -log sigmoid(beta * (avg_c - avg_r) - gamma) on the mean token
      log-probabilities: no reference model at all.

The evaluation reports, on the held-out pairs: the loss, the implicit rewards beta * (log pi - log ref)
(SimPO: beta * mean log pi) of chosen and rejected, their accuracy (chosen strictly higher) and margin,
and the policy's log-probs of chosen and rejected and their gap. `final/` is the policy: a peft adapter
on its base for LoRA (a merged checkpoint when the run started from another run's adapter), else a
plain checkpoint.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.data.batching import collate_padded, group_by_length
from tunelab.data.render import Example
from tunelab.fs import atomic_write_text
from tunelab.losses import dpo_sigmoid, implicit_rewards, preference_metrics, simpo
from tunelab.progress import TokenProgress
from tunelab.recipes.classify import plain_model
from tunelab.recipes.common import (
    check_new_run,
    final_step,
    preference_pairs,
    restore_best,
    run_loop,
    starting_policy,
    write_final,
    write_summary,
)
from tunelab.train.causal_lm import SequenceScorer
from tunelab.train.loop import BatchPlan, Loop
from tunelab.train.precision import autocast

REFERENCE_FILE = "reference_logps.safetensors"  # the precomputed reference log-probs, reused on resume


class PreferenceObjective(SequenceScorer):
    """forward(input_ids, attention_mask, labels, reference=None) -> (summed loss, pairs, pairs ranked right).

    A batch holds its pairs' chosen rows, then their rejected rows; `labels` marks the response tokens
    (IGNORE elsewhere); `reference` holds the reference log-probs of the same rows when they were
    precomputed (else `self.reference` computes them).
    """

    def __init__(self, model: torch.nn.Module, loss: str, beta: float, gamma: float = 0.0):
        super().__init__(model)
        self.loss, self.beta, self.gamma = loss, beta, gamma
        self.reference: Reference | None = None  # a plain object: a frozen copy inside is not a submodule

    def forward(self, input_ids, attention_mask, labels, reference=None):
        logps, lengths = self.log_probs(input_ids, attention_mask, labels)
        if reference is None and self.loss == "sigmoid":
            reference = self.reference(self, input_ids, attention_mask, labels)
        losses, chosen, rejected = self.pair_losses(logps, lengths, reference)
        return losses.sum(), losses.numel(), int((chosen > rejected).sum())

    def pair_losses(self, logps, lengths, reference) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair loss, chosen rewards, rejected rewards) from the rows' log-probs."""
        if self.loss == "simpo":
            chosen, rejected = (logps / lengths.clamp(min=1)).chunk(2)
            return simpo(chosen, rejected, self.beta, self.gamma), self.beta * chosen.detach(), self.beta * rejected.detach()
        (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), reference.to(logps.dtype).chunk(2)
        losses = dpo_sigmoid(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return losses, *implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, self.beta)


class Reference:
    """The frozen starting policy's log-probs of a batch: the same model with its LoRA adapter disabled,
    or else a frozen copy of the starting weights (taken when this is built, before any step)."""

    def __init__(self, policy: SequenceScorer):
        self.frozen = None
        if not hasattr(policy.model, "disable_adapter"):
            self.frozen = SequenceScorer(copy.deepcopy(policy.model).requires_grad_(False).eval())

    @property
    def kind(self) -> str:
        return "the starting weights (a frozen copy)" if self.frozen is not None else "the base model (adapter disabled)"

    @torch.no_grad()
    def __call__(self, policy: SequenceScorer, input_ids, attention_mask, labels) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen.log_probs(input_ids, attention_mask, labels)[0]
        with policy.model.disable_adapter():
            return policy.log_probs(input_ids, attention_mask, labels)[0]


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    template: str | None
    train: list[tuple[Example, Example]]
    eval: list[tuple[Example, Example]]
    pad_id: int
    precision: tuple[str, str]
    merge_final: bool  # the run started from an adapter: final/ is merged, the adapter's base lacks it


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    check_new_run(run_dir, resume)
    started = time.perf_counter()
    s = setup(cfg)
    options = cfg.dpo
    objective = PreferenceObjective(s.model, options.loss, options.strength, options.gamma)
    reference_kind = "none (reference-free)"
    size = cfg.train.batch_size
    eval_order = sorted(range(len(s.eval)), key=lambda i: _length(s.eval[i]))
    eval_groups = [eval_order[k : k + size] for k in range(0, len(eval_order), size)]
    references = {"train": None, "eval": None}
    if options.loss == "sigmoid":
        objective.reference = Reference(objective)
        reference_kind = objective.reference.kind
        if options.precompute_reference:
            references = precomputed_reference(objective, s, eval_groups, run_dir, resume)
            objective.reference, reference_kind = None, reference_kind + ", precomputed"
    eval_batches = [collate([s.eval[i] for i in g], s.pad_id, _rows(references["eval"], g)) for g in eval_groups]
    evaluations: dict[int, dict] = {}

    def evaluator() -> dict:
        with autocast(s.precision[0], loop.accelerator.device):
            evaluations[loop.state["step"]] = metrics = evaluate(objective, eval_batches)
        return {f"eval_{k}": v for k, v in metrics.items()}

    lengths = [_length(p) for p in s.train]
    plan = BatchPlan(len(s.train), lambda epoch: [collate([s.train[i] for i in g], s.pad_id, _rows(references["train"], g))
                                                  for g in group_by_length(lengths, size, cfg.train.seed + epoch)])  # fmt: skip
    loop = Loop(objective, s.model, cfg.train, run_dir, plan, None, s.precision[0], cfg.train.best_metric,
                evaluator=evaluator if s.eval else None)  # fmt: skip

    def announce():
        from tunelab.models.tuning import count_parameters

        trainable, total = count_parameters(s.model)
        print(f"tunelab: dpo ({options.loss}, beta {options.strength:g}) on {cfg.model} ({cfg.tuning.mode}): "
              f"{trainable:,} of {total:,} parameters train; {len(s.train):,} pairs, {len(s.eval):,} held out -> "
              f"{loop.total_steps} steps; reference: {reference_kind}; precision {s.precision[0]}", file=sys.stderr)  # fmt: skip

    state = run_loop(loop, cfg, resume, announce)
    best = restore_best(loop, s.model)
    if not loop.accelerator.is_main_process:
        return {}
    write_final(run_dir, plain_model(s.model) if s.merge_final else s.model, s.tokenizer, s.template)
    final = None
    if eval_batches:
        final = evaluations.get(final_step(state, best))
        if final is None:
            with torch.no_grad(), autocast(s.precision[0], loop.accelerator.device):
                final = evaluate(objective, eval_batches)
        atomic_write_text(run_dir / "eval_metrics.json", json.dumps(final, indent=2) + "\n")
        print(f"tunelab: held-out pairs: implicit-reward accuracy {final['accuracy']:.4f}, margin {final['margin']:.4f}; "
              f"log-prob gap (chosen - rejected) {final['logps_gap']:.2f} ({len(s.eval):,} pairs)", file=sys.stderr)  # fmt: skip
    return write_summary(cfg, loop, state, s.model, s.precision[0], time.perf_counter() - started, best, "pairs",
                         train_examples=len(s.train), eval=final)  # fmt: skip


# --- data and model ---------------------------------------------------------------------------------


def collate(pairs: list[tuple[Example, Example]], pad_id: int, reference: torch.Tensor | None = None) -> dict:
    """The pairs' chosen rows, then their rejected rows, right-padded: input_ids, attention_mask and
    labels (2P, T); with `reference` ((P, 2): each pair's reference log-probs), those of the rows."""
    batch = {**collate_padded([c for c, _ in pairs] + [r for _, r in pairs], pad_id), "count": len(pairs)}
    if reference is not None:
        batch["reference"] = torch.cat([reference[:, 0], reference[:, 1]])
    return batch


def _length(pair: tuple[Example, Example]) -> int:
    return max(len(pair[0].input_ids), len(pair[1].input_ids))


def _rows(reference: torch.Tensor | None, indices: list[int]) -> torch.Tensor | None:
    return None if reference is None else reference[indices]


@torch.no_grad()
def evaluate(objective: PreferenceObjective, batches: list[dict]) -> dict:
    """Held-out pairs: mean loss, implicit-reward accuracy / margin / chosen / rejected, and the policy's
    mean log-probs of chosen and rejected responses and their gap."""
    device = next(objective.parameters()).device
    was_training = objective.training
    objective.eval()
    losses, chosen, rejected, logps = [], [], [], []
    for batch in batches:
        inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
        row_logps, lengths = objective.log_probs(*inputs)
        reference = batch.get("reference")
        if reference is None and objective.loss == "sigmoid":
            reference = objective.reference(objective, *inputs)
        loss, c, r = objective.pair_losses(row_logps.float(), lengths, None if reference is None else reference.to(device))
        losses.append(loss)
        chosen.append(c)
        rejected.append(r)
        logps.append(torch.stack(row_logps.float().chunk(2), dim=1))
    objective.train(was_training)
    chosen, rejected, logps = torch.cat(chosen), torch.cat(rejected), torch.cat(logps)
    return {"loss": float(torch.cat(losses).mean()), **preference_metrics(chosen, rejected),
            "logps_chosen": float(logps[:, 0].mean()), "logps_rejected": float(logps[:, 1].mean()),
            "logps_gap": float((logps[:, 0] - logps[:, 1]).mean())}  # fmt: skip


def precomputed_reference(objective: PreferenceObjective, s: Setup, eval_groups: list[list[int]], run_dir: Path,
                          resume: bool) -> dict:  # fmt: skip
    """{"train": (N, 2), "eval": (M, 2)}: every pair's reference log-probs (chosen, rejected), computed once
    with the starting policy before training (or read back from the run when it resumes)."""
    from safetensors.torch import load_file

    from tunelab.fs import atomic_save_tensors

    path = run_dir / REFERENCE_FILE
    if resume and path.is_file():
        saved = load_file(str(path))
        if saved["train"].shape[0] == len(s.train) and saved["eval"].shape[0] == len(s.eval):
            return saved
    device = next(objective.parameters()).device
    size = max(1, len(eval_groups[0]) if eval_groups else 8)
    train_order = sorted(range(len(s.train)), key=lambda i: _length(s.train[i]))
    train_groups = [train_order[k : k + size] for k in range(0, len(train_order), size)]
    print(f"tunelab: the reference scores {len(s.train) + len(s.eval):,} pairs once, before training", file=sys.stderr)
    out = {}
    with TokenProgress("reference log-probs", len(s.train) + len(s.eval)) as bar:
        for name, pairs, groups in (("train", s.train, train_groups), ("eval", s.eval, eval_groups)):
            values = torch.zeros((len(pairs), 2), dtype=torch.float32)
            for g in groups:
                batch = collate([pairs[i] for i in g], s.pad_id)
                inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
                with autocast(s.precision[0], device):
                    logps = objective.reference(objective, *inputs)
                values[g] = torch.stack(logps.float().cpu().chunk(2), dim=1)
                bar.advance(len(g), batch["real_tokens"])
            out[name] = values
    atomic_save_tensors(path, out)
    return out


def setup(cfg: RunConfig) -> Setup:
    from transformers.utils import logging as hf_logging

    from tunelab.inference import base_folder
    from tunelab.models import resolve_model
    from tunelab.train.precision import resolve_precision

    hf_logging.disable_progress_bar()
    folder = resolve_model(cfg.model)
    model, tokenizer = starting_policy(folder, cfg, "preference optimisation (method dpo)")
    template, train_pairs, eval_pairs = preference_pairs(cfg, tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)  # before the reference log-probs are precomputed (accelerate would move it later)
    merge_final = base_folder(folder) != folder and hasattr(model, "merge_and_unload")
    return Setup(model, tokenizer, template, train_pairs, eval_pairs, tokenizer.pad_token_id,
                 resolve_precision(cfg.train.precision, device), merge_final)  # fmt: skip
