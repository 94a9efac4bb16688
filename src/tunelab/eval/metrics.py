"""Task metrics, computed by the libraries the papers use: scikit-learn, rouge-score, sacrebleu.

Scores are on a 0-100 scale for generation (as ROUGE, BLEU and chrF are reported) and 0-1 for
classification (accuracy, F1), so that a summary reads like the tables it is compared with.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.methods import GENERATION_METRICS  # noqa: F401  (the names, defined with the methods; computed here)

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")


def classification_metrics(truth: Sequence[int], predicted: Sequence[int], names: Sequence[str]) -> dict:
    """accuracy, macro-F1 (over the classes in `names`), per-class precision/recall/F1/support, confusion."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=ids, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        },
        "confusion": confusion_matrix(truth, predicted, labels=ids).tolist(),  # rows: true class, columns: predicted
        "labels": list(names),
    }


def plot_confusion(metrics: dict, out: Path, title: str = "") -> None:
    """A confusion-matrix PNG (counts, rows = true class), written atomically."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    names = metrics["labels"]
    size = max(4.0, 0.9 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ConfusionMatrixDisplay(np.array(metrics["confusion"]), display_labels=names).plot(
        ax=ax, cmap="Blues", colorbar=False
    )
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """ROUGE-1/2/L F1 (stemmed; the best reference per example, as rouge-score's score_multi does),
    corpus BLEU and chrF (sacrebleu, every reference), exact match (normalised, any reference); 0-100."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        return dict.fromkeys(GENERATION_METRICS, 0.0)
    sums = dict.fromkeys(ROUGE, 0.0)
    for scores in rouge_per_example(predictions, references):
        for key in sums:
            sums[key] += scores[key]
    width = max(len(r) for r in references)
    # sacrebleu's reference streams, one per reference index; None where a prediction has fewer references
    streams: list[Any] = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    n = len(predictions)
    return {
        **{key: value / n for key, value in sums.items()},
        "bleu": sacrebleu.corpus_bleu(list(predictions), streams).score,
        "chrf": sacrebleu.corpus_chrf(list(predictions), streams).score,
        "exact_match": 100
        * sum(any(normalize(p) == normalize(r) for r in refs) for p, refs in zip(predictions, references))
        / n,
    }


ROUGE = ("rouge1", "rouge2", "rougeL")


def rouge_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    """ROUGE-1/2/L F1 of each prediction (stemmed; the best reference, as rouge-score's score_multi does), 0-100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    return [
        {k: 100 * v.fmeasure for k, v in scorer.score_multi(list(refs), prediction).items()}
        for prediction, refs in zip(predictions, references)
    ]


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalisation)."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def higher_is_better(metric: str) -> bool:
    return not metric.endswith("loss")
