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

import sys
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.data.batching import collate_pairs, sorted_groups
from tunelab.data.dataset import preference_examples
from tunelab.data.render import Example
from tunelab.fs import atomic_save_tensors
from tunelab.losses import dpo_sigmoid, implicit_rewards, preference_metrics, simpo
from tunelab.models import resolve_model
from tunelab.models.load import merges_at_the_end, plain_model, starting_policy
from tunelab.precision import Precision, autocast, resolve_precision, training_device
from tunelab.progress import TokenProgress
from tunelab.train.objectives import ReferenceModel, SequenceScorer
from tunelab.train.plan import BatchPlan
from tunelab.train.run import Evaluation, Parts, Run

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
        self.reference: ReferenceModel | None = None  # a plain object: a frozen copy inside is not a submodule

    def forward(self, input_ids, attention_mask, labels, reference=None):
        logps, lengths = self.log_probs(input_ids, attention_mask, labels)
        if reference is None and self.loss == "sigmoid":
            reference = self.reference_log_probs(input_ids, attention_mask, labels)
        losses, chosen, rejected = self.pair_losses(logps, lengths, reference)
        return losses.sum(), losses.numel(), int((chosen > rejected).sum())

    def reference_log_probs(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """The reference's (B,) summed response log-probabilities (the sigmoid loss holds it one)."""
        if self.reference is None:
            raise RuntimeError("the sigmoid loss needs its reference log-probs: precomputed, or a ReferenceModel")
        return self.reference(self, input_ids, attention_mask, labels)

    def pair_losses(self, logps, lengths, reference) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair loss, chosen rewards, rejected rewards) from the rows' log-probs."""
        if self.loss == "simpo":
            chosen, rejected = (logps / lengths.clamp(min=1)).chunk(2)
            return (
                simpo(chosen, rejected, self.beta, self.gamma),
                self.beta * chosen.detach(),
                self.beta * rejected.detach(),
            )
        (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), reference.to(logps.dtype).chunk(2)
        losses = dpo_sigmoid(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return losses, *implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, self.beta)


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run = Run(cfg, resume)
    folder = resolve_model(cfg.model)
    model, tokenizer = starting_policy(folder, cfg.tuning, cfg.train.seed, "preference optimisation (method dpo)")
    template, train, held_out = preference_examples(cfg.files(), cfg.method, tokenizer)
    device = training_device()
    model.to(device)  # before the reference log-probs are precomputed (accelerate would move it later)
    precision, options = resolve_precision(cfg.train.precision, device), cfg.dpo
    objective = PreferenceObjective(model, options.loss, options.strength, options.gamma)
    reference = reference_log_probs(objective, cfg, train, held_out, tokenizer.pad_token_id, precision, run.dir, resume)
    eval_groups = sorted_groups([length(p) for p in held_out], cfg.train.batch_size)
    batches = [batch_of(held_out, g, tokenizer.pad_token_id, reference["eval"]) for g in eval_groups]
    plan = BatchPlan.grouped(
        len(train),
        cfg.train.batch_size,
        cfg.train.seed,
        lambda g: batch_of(train, g, tokenizer.pad_token_id, reference["train"]),
        [length(p) for p in train],
    )

    def announce(loop) -> str:
        return (
            f"  {options.loss}, beta {options.strength:g}: {len(train):,} pairs, {len(held_out):,} held out -> "
            f"{loop.total_steps} steps; reference: {reference['kind']}"
        )

    merge = merges_at_the_end(folder, model)
    return run.train(
        Parts(
            model,
            objective,
            tokenizer,
            plan,
            precision,
            announce,
            template,
            evaluation=held_out_pairs(objective, batches, precision) if batches else None,
            final_model=plain_model if merge else None,
            summary={"train_examples": len(train)},
        )
    )


def held_out_pairs(objective: PreferenceObjective, batches: list[dict], precision: Precision) -> Evaluation:
    def measure(complete: bool) -> dict:
        with autocast(precision, next(objective.parameters()).device):
            return evaluate(objective, batches)

    def report(m: dict) -> str:
        pairs = sum(b["count"] for b in batches)
        return (
            f"tunelab: held-out pairs: implicit-reward accuracy {m['accuracy']:.4f}, margin {m['margin']:.4f}; "
            f"log-prob gap (chosen - rejected) {m['logps_gap']:.2f} ({pairs:,} pairs)"
        )

    return Evaluation(measure, report)


# --- data and the reference ------------------------------------------------------------------------


def batch_of(
    pairs: list[tuple[Example, Example]], indices: list[int], pad_id: int, reference: torch.Tensor | None = None
) -> dict:
    """The pairs at `indices` as one batch (chosen rows, then rejected rows: (2P, T)); with `reference`
    ((N, 2): every pair's reference log-probs), those of the batch's rows."""
    batch = collate_pairs([pairs[i] for i in indices], pad_id)
    if reference is not None:
        rows = reference[indices]
        batch["reference"] = torch.cat([rows[:, 0], rows[:, 1]])
    return batch


def length(pair: tuple[Example, Example]) -> int:
    return max(len(pair[0].input_ids), len(pair[1].input_ids))


def reference_log_probs(
    objective: PreferenceObjective,
    cfg: RunConfig,
    train: list,
    held_out: list,
    pad_id: int,
    precision: Precision,
    run_dir: Path,
    resume: bool,
) -> dict:
    """{"kind": what the reference is, "train": (N, 2) | None, "eval": (M, 2) | None}. sigmoid holds the
    policy to its reference: precomputed for every pair now (dpo.precompute_reference), else computed
    batch by batch in the objective. simpo has none."""
    if cfg.dpo.loss != "sigmoid":
        return {"kind": "none (reference-free)", "train": None, "eval": None}
    objective.reference = ReferenceModel(objective)
    kind = objective.reference.kind
    if not cfg.dpo.precompute_reference:
        return {"kind": kind, "train": None, "eval": None}
    values = precomputed_reference(objective, train, held_out, pad_id, cfg.train.batch_size, precision, run_dir, resume)
    objective.reference = None
    return {"kind": kind + ", precomputed", **values}


def precomputed_reference(
    objective: PreferenceObjective,
    train: list,
    held_out: list,
    pad_id: int,
    size: int,
    precision: Precision,
    run_dir: Path,
    resume: bool,
) -> dict:
    """{"train": (N, 2), "eval": (M, 2)}: every pair's reference log-probs (chosen, rejected), computed once
    with the starting policy before training (or read back from the run when it resumes)."""
    from safetensors.torch import load_file

    path = run_dir / REFERENCE_FILE
    if resume and path.is_file():
        saved = load_file(str(path))
        if saved["train"].shape[0] == len(train) and saved["eval"].shape[0] == len(held_out):
            return saved
    device = next(objective.parameters()).device
    eval_groups = sorted_groups([length(p) for p in held_out], size)
    train_groups = sorted_groups([length(p) for p in train], len(eval_groups[0]) if eval_groups else 8)
    print(f"tunelab: the reference scores {len(train) + len(held_out):,} pairs once, before training", file=sys.stderr)
    out = {}
    with TokenProgress("reference log-probs", len(train) + len(held_out)) as bar:
        for name, pairs, groups in (("train", train, train_groups), ("eval", held_out, eval_groups)):
            values = torch.zeros((len(pairs), 2), dtype=torch.float32)
            for g in groups:
                batch = batch_of(pairs, g, pad_id)
                inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
                with autocast(precision, device):
                    logps = objective.reference_log_probs(*inputs)
                values[g] = torch.stack(logps.float().cpu().chunk(2), dim=1)
                bar.advance(len(g), batch["real_tokens"])
            out[name] = values
    atomic_save_tensors(path, out)
    return out


@torch.no_grad()
def evaluate(objective: PreferenceObjective, batches: list[dict]) -> dict:
    """Held-out pairs: mean loss, implicit-reward accuracy / margin / chosen / rejected, and the policy's
    mean log-probs of chosen and rejected responses and their gap."""
    device = next(objective.parameters()).device
    was_training = objective.training
    objective.eval()
    losses, chosen_parts, rejected_parts, logps_parts = [], [], [], []
    for batch in batches:
        inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
        row_logps, lengths = objective.log_probs(*inputs)
        reference = batch.get("reference")
        if reference is None and objective.loss == "sigmoid":
            reference = objective.reference_log_probs(*inputs)
        loss, c, r = objective.pair_losses(
            row_logps.float(), lengths, None if reference is None else reference.to(device)
        )
        losses.append(loss)
        chosen_parts.append(c)
        rejected_parts.append(r)
        logps_parts.append(torch.stack(row_logps.float().chunk(2), dim=1))
    objective.train(was_training)
    chosen, rejected, logps = torch.cat(chosen_parts), torch.cat(rejected_parts), torch.cat(logps_parts)
    return {
        "loss": float(torch.cat(losses).mean()),
        **preference_metrics(chosen, rejected),
        "logps_chosen": float(logps[:, 0].mean()),
        "logps_rejected": float(logps[:, 1].mean()),
        "logps_gap": float((logps[:, 0] - logps[:, 1]).mean()),
    }
