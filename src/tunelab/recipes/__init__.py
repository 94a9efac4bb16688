"""The methods tunelab trains, one entry each: the one place a method is named.

    from tunelab.recipes import METHODS
    METHODS[cfg.method].run(cfg, resume=False)

The CLI, the config schema, `tunelab compare` (and the jobs API) read this registry. Each method's
recipe is a module of this package, `recipes/<name>.py`, with `run(cfg, resume) -> summary`; recipes are
leaves: nothing but this registry imports one, and only when its method runs (so that reading a config
imports no recipe, and no torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from tunelab.eval.metrics import GENERATION_METRICS


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

    def run(self, cfg, resume: bool = False) -> dict:
        """Train as the run config `cfg` says (continue its run directory with `resume`); the summary."""
        return importlib.import_module(f"{__name__}.{self.name}").run(cfg, resume=resume)


def _eval(*names: str) -> tuple[str, ...]:
    return tuple(f"eval_{name}" for name in names)


METHODS = {m.name: m for m in (
    Method("sft", "instruction-tuning: a causal LM learns to answer, with the loss on the answers only",
           _eval("loss", "accuracy"), "tokens", generates=True),
    Method("classify", "text classification: an encoder (or a decoder) with a classification head",
           _eval("loss", "accuracy", "macro_f1"), "examples", generates=False),
    Method("task", "generative task fine-tuning on (source, target) pairs: summarise, translate, answer",
           _eval("loss", "accuracy", *GENERATION_METRICS), "tokens", generates=True),
    Method("reward", "a reward model: a scalar head trained on preference pairs (Bradley-Terry)",
           _eval("loss", "accuracy"), "pairs", generates=False),
    Method("dpo", "direct preference optimisation (DPO, or reference-free SimPO) on preference pairs",
           _eval("loss", "accuracy"), "pairs", generates=True),
    Method("rlhf", "online RL (RLOO) against a reward model, with a KL penalty to the starting policy",
           _eval("reward"), "responses", generates=True),
)}
