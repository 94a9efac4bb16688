"""A sequence classifier on labelled examples: its metrics (during training and on a data file) and its
class probabilities (`tunelab predict`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.batching import collate_labeled, sorted_groups
from tunelab.data.render import Example
from tunelab.eval.metrics import classification_metrics


def classifier_batches(examples: list[Example], size: int, pad_id: int) -> list[dict]:
    """Batches of similar length (least padding), in a fixed order; `order` maps each row back to its example."""
    batches = []
    for group in sorted_groups([len(e.input_ids) for e in examples], size):
        batch = collate_labeled([examples[i] for i in group], pad_id)
        batch["order"] = group
        batches.append(batch)
    return batches


@torch.no_grad()
def evaluate_classifier(model, batches: list[dict], names: list[str]) -> dict:
    """Mean loss, accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    truth, predicted = [], []
    for batch in batches:
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits.float()
        labels = batch["labels"].to(device)
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
        count += labels.numel()
        truth += labels.tolist()
        predicted += logits.argmax(-1).tolist()
    model.train(was_training)
    return {"loss": total / max(count, 1), **classification_metrics(truth, predicted, names)}


@torch.no_grad()
def class_probabilities(model, batches: list[dict], count: int) -> list[list[float]]:
    """Each example's probability of every class (softmax of the logits), in the examples' order."""
    probabilities: list = [None] * count
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        for i, p in zip(batch["order"], logits.softmax(-1).tolist()):
            probabilities[i] = p
    return probabilities
