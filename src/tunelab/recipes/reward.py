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

import torch
from transformers import AutoTokenizer

from tunelab.config import RunConfig
from tunelab.data.batching import collate_pairs
from tunelab.data.dataset import preference_examples
from tunelab.losses import bradley_terry, preference_metrics
from tunelab.models import resolve_model
from tunelab.models.load import plain_model, tuned_classifier
from tunelab.precision import resolve_precision, training_device
from tunelab.train.objectives import scalar_scores
from tunelab.train.plan import BatchPlan
from tunelab.train.run import Evaluation, Parts, Run


class RewardObjective(torch.nn.Module):
    """forward(input_ids, attention_mask) -> (summed Bradley-Terry loss, pairs, pairs ranked right).

    A batch holds its pairs' chosen rows, then their rejected rows: one forward pass scores both.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        chosen, rejected = scalar_scores(self.model, input_ids, attention_mask).chunk(2)  # (P,), (P,)
        return bradley_terry(chosen, rejected).sum(), chosen.numel(), int((chosen > rejected).sum())


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run = Run(cfg, resume)
    folder = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template, train, held_out = preference_examples(cfg.files(), cfg.method, tokenizer)
    model, _ = tuned_classifier(
        folder, tokenizer, ["reward"], cfg.tuning, cfg.train.seed
    )  # num_labels=1: one scalar per text
    size, pad = cfg.train.batch_size, tokenizer.pad_token_id
    plan = BatchPlan.grouped(
        len(train), size, cfg.train.seed, lambda g: collate_pairs([train[i] for i in g], pad, labels=False)
    )
    batches = [collate_pairs(held_out[k : k + size], pad, labels=False) for k in range(0, len(held_out), size)]

    def announce(loop) -> str:
        return f"  a one-output head: {len(train):,} pairs, {len(held_out):,} held out -> {loop.total_steps} steps"

    def report(m):
        return f"tunelab: held-out pairs: accuracy {m['accuracy']:.4f}, mean margin {m['margin']:.4f} ({len(held_out):,} pairs)"

    return run.train(
        Parts(
            model,
            RewardObjective(model),
            tokenizer,
            plan,
            resolve_precision(cfg.train.precision, training_device()),
            announce,
            template,
            evaluation=Evaluation(lambda _: evaluate(model, batches), report) if batches else None,
            final_model=plain_model,
            summary={"train_examples": len(train)},
        )
    )


@torch.no_grad()
def evaluate(model, batches: list[dict]) -> dict:
    """Held-out pairs: mean Bradley-Terry loss, pairwise accuracy, mean margin and rewards."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen_parts, rejected_parts = [], []
    for batch in batches:
        c, r = scalar_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).chunk(2)
        chosen_parts.append(c)
        rejected_parts.append(r)
    model.train(was_training)
    chosen, rejected = torch.cat(chosen_parts), torch.cat(rejected_parts)
    return {"loss": float(bradley_terry(chosen, rejected).mean()), **preference_metrics(chosen, rejected)}
