"""final/README.md: a run's model card in the Hub's format (YAML front matter: base_model, library_name,
tags, datasets, pipeline_tag; then what was trained, on what, how, and what the run measured), so that the
Hub, peft and vLLM take a run's final/ as it is, and a colleague reads what it is without tunelab."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tunelab.fs import atomic_write_text
from tunelab.methods import METHODS

if TYPE_CHECKING:
    from tunelab.config import RunConfig

PIPELINES = {"classify": "text-classification", "reward": "text-classification"}


def model_card(cfg: RunConfig, summary: dict, base: str, adapter: bool) -> str:
    """The card of a finished run: `base` as the adapter names it, `summary` as summary.json holds it."""
    files = [Path(f).name for f in (cfg.data.train, cfg.data.eval, *(m.train for m in cfg.data.mix)) if f]
    front = {
        "base_model": base,
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": PIPELINES.get(cfg.method, "text-generation"),
        "tags": ["tunelab", cfg.method, *(["lora"] if cfg.tuning.mode == "lora" else [])],
        "datasets": files,
    }
    name = Path(cfg.output_dir or "run").name
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"Trained with tunelab from `{base}` ({_tuning(cfg)}), method `{cfg.method}`: {METHODS[cfg.method].summary}.",
        "",
        "## Data",
        "",
        f"- training: `{Path(cfg.data.train).name}` ({_count(summary.get('train_examples'))} examples)",
    ]
    if cfg.data.eval or cfg.data.eval_split:
        held = f"`{Path(cfg.data.eval).name}`" if cfg.data.eval else f"data.eval_split {cfg.data.eval_split:g} of it"
        lines.append(
            f"- held out: {held}"
            + (f" ({_count(summary['eval_examples'])} examples)" if "eval_examples" in summary else "")
        )
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    t = cfg.train
    settings = {
        "length": f"{t.epochs:g} epochs" if t.max_steps is None else f"{t.max_steps} steps",
        "batch size x accumulation": f"{t.batch_size} x {t.grad_accum}",
        "learning rate": t.lr,
        "schedule": f"{t.scheduler}, warmup {t.warmup_ratio}",
        "max length": cfg.data.max_length,
        "precision": summary.get("precision"),
        "steps": summary.get("steps"),
        "trained tokens/s": summary.get("tokens_per_s"),
        "final train loss": summary.get("final_train_loss"),
    }
    lines += [f"| {key} | {value} |" for key, value in settings.items() if value is not None]
    evaluation = summary.get("eval") or {}
    if evaluation:
        lines += ["", "## Evaluation (held-out data, final model)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_value(value)} |" for key, value in evaluation.items() if key not in ("step", "split")]
    lines += ["", "## Use", "", "```python", *_usage(cfg, adapter), "```", ""]
    return "\n".join(lines)


def write_card(final: Path, cfg: RunConfig, summary: dict, base: str) -> None:
    atomic_write_text(final / "README.md", model_card(cfg, summary, base, (final / "adapter_config.json").exists()))


def _tuning(cfg: RunConfig) -> str:
    if cfg.tuning.mode == "lora":
        return f"LoRA r={cfg.tuning.lora.r}, alpha={cfg.tuning.lora.alpha:g}"
    return {"full": "all weights", "head": "the classification head", "freeze": "some layers"}[cfg.tuning.mode]


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def _value(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _usage(cfg: RunConfig, adapter: bool) -> list[str]:
    if cfg.method in PIPELINES:
        kind = "AutoPeftModelForSequenceClassification" if adapter else "AutoModelForSequenceClassification"
    else:
        kind = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
    package = "peft" if adapter else "transformers"
    return [
        f"from {package} import {kind}",
        "from transformers import AutoTokenizer",
        "",
        f'model = {kind}.from_pretrained("path/to/final")  # this folder',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/final")  # with the chat template it trained with',
    ]
