"""The methods tunelab trains, described: the one place a method is named, with what it reports.

This is metadata only (no recipe, no torch), so that the config schema, the training skeleton, evaluation
and the CLI can read it from below the recipes; `tunelab.recipes.run(cfg)` runs a method's recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

# the metrics a generated text is scored by (eval/metrics.py computes them)
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    metrics: tuple[str, ...]  # the eval_* metrics its evaluations report; the first is the default best_metric
    unit: str  # what its loss averages over, and so what summary.json's trained_<unit> counts
    generates: bool  # final/ is a language model that writes text (held-out suites, serving)

    @property
    def best_metric(self) -> str:
        return self.metrics[0]


def _eval(*names: str) -> tuple[str, ...]:
    return tuple(f"eval_{name}" for name in names)


METHODS = {
    m.name: m
    for m in (
        Method(
            "sft",
            "instruction-tuning: a causal LM learns to answer, with the loss on the answers only",
            _eval("loss", "accuracy"),
            "tokens",
            generates=True,
        ),
        Method(
            "classify",
            "text classification: an encoder (or a decoder) with a classification head",
            _eval("loss", "accuracy", "macro_f1"),
            "examples",
            generates=False,
        ),
        Method(
            "task",
            "generative task fine-tuning on (source, target) pairs: summarise, translate, answer",
            _eval("loss", "accuracy", *GENERATION_METRICS),
            "tokens",
            generates=True,
        ),
        Method(
            "reward",
            "a reward model: a scalar head trained on preference pairs (Bradley-Terry)",
            _eval("loss", "accuracy"),
            "pairs",
            generates=False,
        ),
        Method(
            "dpo",
            "direct preference optimisation (DPO, or reference-free SimPO) on preference pairs",
            _eval("loss", "accuracy"),
            "pairs",
            generates=True,
        ),
        Method(
            "rlhf",
            "online RL (RLOO) against a reward model, with a KL penalty to the starting policy",
            _eval("reward"),
            "responses",
            generates=True,
        ),
        Method(
            "grpo",
            "RL with verifiable rewards: GRPO (DAPO, Dr. GRPO losses) against reward functions",
            _eval("reward"),
            "responses",
            generates=True,
        ),
    )
}

# OpenAI's fine-tuning method types (the jobs API's `method.type`) -> the method a job trains with
JOB_METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
