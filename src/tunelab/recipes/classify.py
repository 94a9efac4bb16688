"""Text classification (`method: classify`): an encoder (or a decoder LM) with a classification head.

    tunelab train configs/classify-minilm-sst2.yaml
    tunelab predict runs/classify-minilm-sst2 --data new.csv --out preds.jsonl

The labels come from the training data (names, or ids that `data.label_names` names); `final/` is a
plain `AutoModelForSequenceClassification` checkpoint whose config maps ids to those names, so
`transformers.pipeline("text-classification", model="RUN/final")` answers with them (a LoRA run is
merged into its base for that). Tuning modes: full, freeze (last N layers, and the head), head (the
head alone: a linear probe), lora. Evaluation: loss, accuracy, macro-F1 during training; at the end
per-class precision/recall/F1 and the confusion matrix (`eval_metrics.json`, `confusion_matrix.png`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tunelab.config import RunConfig
from tunelab.data.batching import collate_labeled
from tunelab.data.dataset import class_names, labeled_examples, read_labeled, read_split
from tunelab.data.render import Example
from tunelab.errors import UserError
from tunelab.eval.classifier import classifier_batches, evaluate_classifier
from tunelab.eval.metrics import plot_confusion
from tunelab.models import resolve_model
from tunelab.models.load import plain_model, tuned_classifier
from tunelab.precision import resolve_precision, training_device
from tunelab.train.objectives import ClassifierObjective
from tunelab.train.plan import BatchPlan
from tunelab.train.run import Evaluation, Parts, Run


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run = Run(cfg, resume)
    folder = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    records, held_out = read_split(cfg.files(), lambda spec, options: read_labeled(spec, options, cfg.data.label_names))
    names = class_names(records)
    if len(names) < 2:
        raise UserError(f"{cfg.data.train}: one class only ({names[0] if names else 'none'}); a classifier needs two")
    train = labeled_examples(records, tokenizer, names, cfg.data.max_length, cfg.data.train)
    evaluation = labeled_examples(held_out, tokenizer, names, cfg.data.max_length, cfg.data.eval or cfg.data.train)
    model, head = tuned_classifier(folder, tokenizer, names, cfg.tuning, cfg.train.seed)
    pad = tokenizer.pad_token_id
    plan = BatchPlan.grouped(
        len(train),
        cfg.train.batch_size,
        cfg.train.seed,
        lambda g: collate_labeled([train[i] for i in g], pad),
        [len(e.input_ids) for e in train],
    )
    objective = ClassifierObjective(model, class_weights(cfg.train.class_weights, train, names))
    batches = classifier_batches(evaluation, cfg.train.batch_size, pad)
    return run.train(
        Parts(
            model,
            objective,
            tokenizer,
            plan,
            resolve_precision(cfg.train.precision, training_device()),
            lambda loop: announce(cfg, names, head, train, evaluation, loop),
            evaluation=held_out_scores(model, batches, names) if evaluation else None,
            final_model=plain_model,
            summary={"classes": names, "train_examples": len(train)},
        )
    )


def held_out_scores(model, batches: list[dict], names: list[str]) -> Evaluation:
    """Loss, accuracy and macro-F1 at each evaluation; per-class scores and the confusion matrix too
    (eval_metrics.json, confusion_matrix.png)."""

    def keep(metrics: dict, run_dir: Path) -> dict:
        plot_confusion(metrics, run_dir / "confusion_matrix.png")
        return metrics

    def report(metrics: dict) -> str:
        examples = sum(m["support"] for m in metrics["per_class"].values())
        return f"tunelab: eval accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} ({examples:,} examples)"

    return Evaluation(lambda complete: evaluate_classifier(model, batches, names), report, keep)


def class_weights(setting, examples: list[Example], names: list[str]) -> torch.Tensor | None:
    """train.class_weights as a tensor: balanced = n / (classes x count of the class), as scikit-learn."""
    if setting is None:
        return None
    counts = Counter(e.labels[0] for e in examples)
    if setting == "balanced":
        return torch.tensor([len(examples) / (len(names) * max(counts[i], 1)) for i in range(len(names))])
    given = {str(k): float(v) for k, v in setting.items()}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UserError(f"train.class_weights: no class named {', '.join(unknown)} (classes: {', '.join(names)})")
    return torch.tensor([given.get(name, 1.0) for name in names])


def announce(cfg: RunConfig, names: list[str], head: list[str], train: list, evaluation: list, loop) -> str:
    counts = Counter(names[e.labels[0]] for e in train)
    lines = [
        f"  data: {len(train):,} training examples ({', '.join(f'{n} {counts[n]:,}' for n in names)}), "
        f"{len(evaluation):,} for evaluation -> {loop.total_steps} steps",
        f"  new head ({len(names)} classes): {', '.join(head)}",
    ]
    truncated = sum(e.status == "truncated" for e in train)
    if truncated:
        lines.append(f"  {truncated:,} training texts cut to data.max_length {cfg.data.max_length}")
    return "\n".join(lines)
