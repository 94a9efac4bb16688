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

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.data.records import Labeled
from tunelab.data.render import Example, Renderer
from tunelab.errors import UserError
from tunelab.fs import atomic_write_text
from tunelab.metrics import classification_metrics, plot_confusion
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


class ClassifierObjective(torch.nn.Module):
    """forward(input_ids, attention_mask, labels) -> (summed cross-entropy, examples, correct)."""

    def __init__(self, model: torch.nn.Module, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        loss = F.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum")
        return loss, labels.numel(), int((logits.argmax(-1) == labels).sum())


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    names: list[str]  # class id -> name
    train: list[Example]
    eval: list[Example]
    plan: BatchPlan
    pad_id: int
    class_weights: torch.Tensor | None
    precision: tuple[str, str]
    head: list[str]  # the parameters from_pretrained initialised


def run(cfg: RunConfig, resume: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    check_new_run(run_dir, resume)
    started = time.perf_counter()
    s = setup(cfg)
    batches = eval_batches(s.eval, cfg.train.batch_size, s.pad_id)
    objective = ClassifierObjective(s.model, s.class_weights)
    evaluations: dict[int, dict] = {}  # step -> full metrics: the end need not evaluate the best step again

    def evaluator() -> dict:
        metrics, evaluations[loop.state["step"]] = evaluate(objective.model, batches, s.names)
        return metrics

    loop = Loop(objective, s.model, cfg.train, run_dir, s.plan, None, s.precision[0], cfg.train.best_metric,
                evaluator=evaluator if s.eval else None)  # fmt: skip
    state = run_loop(loop, cfg, resume, lambda: _announce(cfg, s, loop))
    return finish(cfg, s, loop, state, batches, evaluations, time.perf_counter() - started)


# --- data ------------------------------------------------------------------------------------------


def read_labeled(spec: str, cfg: RunConfig, held_out: bool = False) -> list[Labeled]:
    """The file's labelled records, labels renamed by `data.label_names`."""
    records = read_records(spec, cfg, Labeled, "classification needs labelled text (text + label fields, "
                           "or a CSV/TSV with data.columns)", held_out)  # fmt: skip
    names = cfg.data.label_names or {}
    lookup = {str(k): v for k, v in names.items()}
    for r in records:
        r.label = lookup.get(str(r.label), r.label)
    return records


def class_names(records: list[Labeled]) -> list[str]:
    """The classes, in id order: integer labels sorted by value, names sorted alphabetically."""
    labels = {r.label for r in records}
    return [str(x) for x in sorted(labels, key=lambda x: (isinstance(x, str), x if isinstance(x, int) else 0, str(x)))]


def encode(records: list[Labeled], tokenizer, names: list[str], max_length: int, spec: str) -> list[Example]:
    label2id = {name: i for i, name in enumerate(names)}
    unknown = [r for r in records if str(r.label) not in label2id]
    if unknown:
        r = unknown[0]
        raise UserError(f"{r.where or spec}: label {r.label!r} does not occur in the training data "
                        f"(classes: {', '.join(names)}); map it with data.label_names")  # fmt: skip
    for r in records:
        r.label = str(r.label)
    return Renderer(tokenizer, "chat", max_length).labeled(records, label2id)


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded input_ids and attention_mask, a class id per example."""
    labels = torch.tensor([e.labels[0] for e in examples], dtype=torch.long)
    return {**pad_right(examples, pad_id), "labels": labels, "count": len(examples)}


def pad_right(examples: list[Example], pad_id: int) -> dict:
    """input_ids (B, T) right-padded with `pad_id`, attention_mask (B, T), and the real tokens' count:
    a sequence classifier reads each row's last real token (a decoder's) or its first (an encoder's)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.as_tensor(e.input_ids)
        attention_mask[b, : len(e.input_ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "real_tokens": sum(len(e.input_ids) for e in examples)}


def eval_batches(examples: list[Example], size: int, pad_id: int) -> list[dict]:
    """Batches of similar length (least padding), in a fixed order; predictions map back by `order`."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = []
    for k in range(0, len(order), size):
        batch = collate([examples[i] for i in order[k : k + size]], pad_id)
        batch["order"] = order[k : k + size]
        batches.append(batch)
    return batches


@torch.no_grad()
def evaluate(model, batches: list[dict], names: list[str]) -> tuple[dict, dict]:
    """(eval_* metrics for the loop, the full metrics with per-class scores and the confusion matrix)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    truth, predicted = [], []
    for batch in batches:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        logits = model(**inputs).logits.float()
        labels = batch["labels"].to(device)
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
        count += labels.numel()
        truth += labels.tolist()
        predicted += logits.argmax(-1).tolist()
    model.train(was_training)
    full = classification_metrics(truth, predicted, names)
    return ({"eval_loss": total / max(count, 1), "eval_accuracy": full["accuracy"], "eval_macro_f1": full["macro_f1"]},
            {"loss": total / max(count, 1), **full})  # fmt: skip


# --- model ------------------------------------------------------------------------------------------


def load_classifier(folder: Path, names: list[str]):
    """(model, names of the parameters from_pretrained initialised: the head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(folder)
    kwargs = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {n: i for i, n in enumerate(names)}}  # fmt: skip
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of the missing head: expected, and announced by the run
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True, **kwargs
        )
    except ValueError as e:
        raise UserError(f"{folder}: {config.model_type} models have no sequence-classification head in "
                        f"transformers ({str(e).splitlines()[0]})") from None  # fmt: skip
    finally:
        hf_logging.set_verbosity(level)
    return model, sorted(info["missing_keys"])


def tuned_classifier(folder: Path, tokenizer, names: list[str], cfg: RunConfig):
    """(the sequence classifier with cfg.tuning applied, its fresh head's parameter names); a decoder
    LM without a pad token pads with EOS (the head reads the last real token)."""
    from tunelab.models.tuning import apply_tuning

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(cfg.train.seed)
    model, head = load_classifier(folder, names)
    model.config.pad_token_id = tokenizer.pad_token_id
    return apply_tuning(model, cfg.tuning, head=head, task_type="SEQ_CLS"), head


def setup(cfg: RunConfig) -> Setup:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tunelab.models import resolve_model
    from tunelab.train.precision import resolve_precision

    hf_logging.disable_progress_bar()
    folder = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_records = read_labeled(cfg.data.train, cfg)
    eval_records = read_labeled(cfg.data.eval, cfg, held_out=True) if cfg.data.eval else []
    train_records, eval_records = split_records(train_records, eval_records, cfg)
    names = class_names(train_records)
    if len(names) < 2:
        raise UserError(f"{cfg.data.train}: one class only ({names[0] if names else 'none'}); a classifier needs two")
    train = encode(train_records, tokenizer, names, cfg.data.max_length, cfg.data.train)
    held_out = encode(eval_records, tokenizer, names, cfg.data.max_length, cfg.data.eval or cfg.data.train)
    model, head = tuned_classifier(folder, tokenizer, names, cfg)
    weights = class_weights(cfg.train.class_weights, train, names)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Setup(model, tokenizer, names, train, held_out, _plan(train, cfg.train.batch_size, cfg.train.seed,
                 tokenizer.pad_token_id), tokenizer.pad_token_id, weights, resolve_precision(cfg.train.precision, device), head)  # fmt: skip


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


def _plan(examples: list[Example], size: int, seed: int, pad_id: int) -> BatchPlan:
    from tunelab.data.batching import group_by_length

    lengths = [len(e.input_ids) for e in examples]
    return BatchPlan(len(examples), lambda epoch: [collate([examples[i] for i in g], pad_id)
                                                   for g in group_by_length(lengths, size, seed + epoch)])  # fmt: skip


def _announce(cfg: RunConfig, s: Setup, loop: Loop) -> None:
    from tunelab.models.tuning import count_parameters

    trainable, total = count_parameters(s.model)
    counts = Counter(s.names[e.labels[0]] for e in s.train)
    print(f"tunelab: classify on {cfg.model} ({cfg.tuning.mode}): {trainable:,} of {total:,} parameters train",
          file=sys.stderr)  # fmt: skip
    print(f"  data: {len(s.train):,} training examples ({', '.join(f'{n} {counts[n]:,}' for n in s.names)}), "
          f"{len(s.eval):,} for evaluation -> {loop.total_steps} steps", file=sys.stderr)  # fmt: skip
    print(f"  new head ({len(s.names)} classes): {', '.join(s.head)}", file=sys.stderr)
    truncated = sum(e.status == "truncated" for e in s.train)
    if truncated:
        print(f"  {truncated:,} training texts cut to data.max_length {cfg.data.max_length}", file=sys.stderr)


# --- the end of a run ---------------------------------------------------------------------------------


def finish(cfg: RunConfig, s: Setup, loop: Loop, state: dict, batches: list[dict], evaluations: dict[int, dict],
           wall: float) -> dict:  # fmt: skip
    run_dir = Path(cfg.output_dir)
    best = restore_best(loop, s.model)
    if not loop.accelerator.is_main_process:
        return {}
    write_final(run_dir, plain_model(s.model), s.tokenizer)
    final_metrics = None
    if batches:  # the weights now in the model are the best step's (or the last step's): reuse its evaluation
        final_metrics = evaluations.get(final_step(state, best))
        if final_metrics is None:  # a resumed run evaluated that step in an earlier process
            _, final_metrics = evaluate(s.model, batches, s.names)
        atomic_write_text(run_dir / "eval_metrics.json", json.dumps(final_metrics, indent=2) + "\n")
        plot_confusion(final_metrics, run_dir / "confusion_matrix.png")
        print(f"tunelab: eval accuracy {final_metrics['accuracy']:.4f}, macro-F1 {final_metrics['macro_f1']:.4f} "
              f"({len(s.eval):,} examples)", file=sys.stderr)  # fmt: skip
    return write_summary(cfg, loop, state, s.model, s.precision[0], wall, best, "examples", classes=s.names,
                         train_examples=len(s.train),
                         eval=final_metrics and {k: final_metrics[k] for k in ("loss", "accuracy", "macro_f1")})  # fmt: skip


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as plain transformers loads it: a LoRA adapter merged into a copy of its base."""
    if not hasattr(model, "merge_and_unload"):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()
