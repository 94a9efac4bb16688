"""What every recipe does the same way: the run directory, the swap of final/, the overfitting check."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tunelab.errors import UserError
from tunelab.metrics import higher_is_better

SHOWN_PROBLEMS = 20


def check_new_run(run_dir: Path, resume: bool) -> None:
    """A fresh run never writes over another one; `--resume` is how to continue it."""
    if not resume and (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir}: a run is already there; continue it with `tunelab train --resume {run_dir}`, "
                        "or set another output_dir")  # fmt: skip


def run_loop(loop, cfg, resume: bool, announce) -> dict:
    """Write the run's config (the main process, once every process has checked the directory), say
    what will happen (`announce()`), and run the loop; returns its final state."""
    from tunelab.config import save_config

    run_dir = Path(cfg.output_dir)
    if loop.accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(cfg, run_dir / "config.yaml")
        announce()
    loop.accelerator.wait_for_everyone()
    return loop.run(resume=resume)


def replace_dir(new: Path, final: Path) -> None:
    """Swap a finished directory into place (a rerun of finish() after a resume replaces the old one)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)


def read_records(spec: str, cfg, kind: type, need: str, held_out: bool = False) -> list:
    """Every record of a data file, all of type `kind` (else `need` says what the method needs); any
    error in the file is a UserError naming its lines. `held_out` reads it with data.eval_columns."""
    from tunelab.data.formats import load_records

    columns = cfg.data.eval_columns if held_out and cfg.data.eval_columns else cfg.data.columns
    records, problems = load_records(spec, cfg.data.format, columns, cfg.data.header)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        shown = [str(p) for p in errors[:SHOWN_PROBLEMS]]
        if len(errors) > SHOWN_PROBLEMS:
            shown.append(f"... and {len(errors) - SHOWN_PROBLEMS} more (tunelab data validate {spec} lists them)")
        raise UserError(*shown)
    other = next((r for r in records if not isinstance(r, kind)), None)
    if other is not None:
        raise UserError(f"{spec}: holds {type(other).__name__} records; {need}")
    return records


def read_preferences(spec: str, cfg, held_out: bool = False) -> list:
    """The preference records of a data file (any preference layout), else a UserError."""
    from tunelab.data.records import Preference

    return read_records(spec, cfg, Preference, f"method {cfg.method} needs preference pairs (prompt, chosen, "
                        "rejected; or the OpenAI DPO, ShareGPT or HH-RLHF layouts)", held_out)  # fmt: skip


def preference_pairs(cfg, tokenizer) -> tuple[str | None, list, list]:
    """(the chat template, training pairs, held-out pairs): data.train's preference records (with data.eval's,
    or data.eval_split held out of them), each rendered as (chosen, rejected) examples; pairs longer than
    data.max_length are cut or dropped as data.truncation says."""
    from tunelab.data.dataset import DataOptions, renderer_for

    train = read_preferences(cfg.data.train, cfg)
    held_out = read_preferences(cfg.data.eval, cfg, held_out=True) if cfg.data.eval else []
    train, held_out = split_records(train, held_out, cfg)
    renderer = renderer_for(tokenizer, DataOptions.from_config(cfg.data))
    train_pairs = [p for p in renderer.preferences(train) if p[0].usable and p[1].usable]
    eval_pairs = [p for p in renderer.preferences(held_out) if p[0].usable and p[1].usable]
    if not train_pairs:
        raise UserError(f"{cfg.data.train}: no pair left to train on within data.max_length {cfg.data.max_length}")
    return renderer.template, train_pairs, eval_pairs


def starting_policy(folder: Path, cfg, purpose: str):
    """The causal LM a preference method starts from, with cfg.tuning applied, and its tokenizer. An
    adapter (a LoRA run's final/) is merged into its base first: the policy, and the reference it is
    held to, are the tuned model."""
    import torch

    from tunelab.inference import base_folder, check_causal_lm, load_causal_lm
    from tunelab.models.tuning import apply_tuning

    check_causal_lm(base_folder(folder), purpose)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_causal_lm(folder)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for module in model.modules():  # the policy and its reference must score a text alike: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return apply_tuning(model.train(), cfg.tuning), tokenizer


def restore_best(loop, model) -> Path | None:
    """Load the best checkpoint's weights into `model` (when there was an evaluation); returns its folder.

    A run that keeps a weight average (train.ema_decay) evaluated the average: that is what it keeps.
    """
    from tunelab.train.checkpoint import EMA_FILE, load_trainable

    best = loop.best_checkpoint()
    if best is not None and best.exists():
        load_trainable(best, model, EMA_FILE if loop.ema is not None else "trainable.safetensors")
        return best
    if loop.ema is not None:
        loop.ema.copy_to_model()
    return None


def final_step(state: dict, best: Path | None) -> int:
    """The step whose weights the model holds after restore_best: the best one, or else the last."""
    return state["best_step"] if best is not None else state["step"]


def write_final(run_dir: Path, model, tokenizer, template: str | None = None) -> None:
    """final/: the model and its tokenizer (with the chat template training rendered with, so that
    inference renders prompts the same way), written under a temporary name, then swapped into place."""
    from tunelab.fs import atomic_dir

    with atomic_dir(run_dir / "final.new") as tmp:
        model.save_pretrained(tmp)
        if template is not None:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)
    replace_dir(run_dir / "final.new", run_dir / "final")


def write_summary(cfg, loop, state: dict, model, precision: str, wall: float, best: Path | None,
                  scored: str = "tokens", fits: bool = True, **extra) -> dict:  # fmt: skip
    """summary.json: what trained, how fast, how much memory, the final and best metrics (`extra`), and
    the overfitting warning; printed as the run's last lines. Returns it. `scored` names what the loss
    counted (trained tokens, or examples for a classifier). `fits`: the train loss measures the fit to
    the training data (not so for RL), so that its fall beside a worse evaluation means overfitting."""
    import sys

    from tunelab.fs import atomic_write_text
    from tunelab.models.tuning import count_parameters
    from tunelab.train.memory import peak_memory_mb

    run_dir = Path(cfg.output_dir)
    trainable, total = count_parameters(model)
    entries = read_metrics(run_dir)
    last_train = next((e for e in reversed(entries) if e["split"] == "train"), None)
    summary = {
        "method": cfg.method, "model": cfg.model, "tuning": cfg.tuning.mode,
        "trainable_parameters": trainable, "total_parameters": total,
        "steps": state["step"], "planned_steps": loop.total_steps, "tokens": state["tokens"],
        f"trained_{scored}": state["trained_tokens"],
        "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "train_seconds": round(state["seconds"], 1), "wall_seconds": round(wall, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1), "precision": precision,
        "processes": loop.accelerator.num_processes,
        "final_train_loss": last_train and last_train["loss"], **extra,
        "best_step": state["best_step"], "best_" + cfg.train.best_metric: state["best"],
        "final_model": "the best checkpoint" if best is not None else "the last step",
        "early_stopped": state["step"] < loop.total_steps,
        "warning": overfitting_warning(entries, cfg.train.best_metric) if fits else None,
    }  # fmt: skip
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if summary["warning"]:
        print(f"warning: {summary['warning']}", file=sys.stderr)
    print(f"tunelab: done in {wall:.0f} s; final model in {run_dir / 'final'} ({summary['final_model']})",
          file=sys.stderr)  # fmt: skip
    return summary


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def overfitting_warning(entries: list[dict], best_metric: str) -> str | None:
    """A sentence when the evaluation metric got worse after its best step while the train loss kept
    falling (the model learns its training data, not the task), else None."""
    key = best_metric.removeprefix("eval_")
    evals = [(e["step"], e[key]) for e in entries if e["split"] == "eval" and key in e]
    if len(evals) < 3:
        return None
    sign = 1 if higher_is_better(best_metric) else -1
    best_step, best = max(evals, key=lambda p: sign * p[1])
    last_step, last = evals[-1]
    if best_step == last_step or sign * (best - last) <= 0.02 * max(abs(best), 1e-9):
        return None
    train = [(e["step"], e["loss"]) for e in entries if e["split"] == "train"]
    before = [loss for step, loss in train if step <= best_step]
    after = [loss for step, loss in train if step > best_step]
    if not before or not after or after[-1] >= before[-1]:
        return None
    return (f"{best_metric} was best at step {best_step} ({best:.4g}) and {last:.4g} at step {last_step} while the "
            "train loss kept falling: the model was overfitting; final/ holds the best step")  # fmt: skip


def split_records(train: list, held_out: list, cfg) -> tuple[list, list]:
    """data.eval_split held out of the training records (seeded), then at most data.max_examples to train."""
    split_, limit = cfg.data.eval_split, cfg.data.max_examples
    if split_ is None and limit is None:
        return train, held_out
    order = list(range(len(train)))
    random.Random(cfg.train.seed).shuffle(order)
    if split_ is not None:
        n = round(split_ * len(train)) if split_ < 1 else int(split_)
        if not 0 < n < len(train):
            raise UserError(f"data.eval_split: {split_} leaves {n} of {len(train)} examples for evaluation")
        held_out, order = [train[i] for i in order[:n]], order[n:]
    return [train[i] for i in sorted(order[:limit])], held_out
