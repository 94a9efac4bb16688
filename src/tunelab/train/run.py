"""The skeleton every run shares, written once. A recipe builds what is particular to its method and
hands it over as `Parts`; `Run` does the rest, the same way for every method:

    run = Run(cfg, resume)              # a fresh run never writes over another one; the clock starts
    ...                                 # the method's model, data, objective and evaluation
    return run.train(Parts(...))        # config.yaml -> the loop -> the best weights -> final/
                                        # -> the final evaluation (eval_metrics.json) -> summary.json
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunelab.errors import UserError
from tunelab.fs import atomic_dir, atomic_write_text
from tunelab.methods import METHODS
from tunelab.models.load import quiet_loading
from tunelab.models.resolve import portable_name
from tunelab.precision import Precision, runs_on
from tunelab.rundir import RunDir
from tunelab.train.card import write_card
from tunelab.train.logs import overfitting_warning, read_metrics
from tunelab.train.loop import Loop, TrainState
from tunelab.train.plan import BatchPlan

if TYPE_CHECKING:
    from tunelab.config import RunConfig


@dataclass
class Evaluation:
    """A method's own held-out metrics (beside the loop's loss and accuracy), at every evaluation and once
    more for final/, unless the kept step's evaluation already saw the whole held-out set: then the end
    reuses it.

    `measure(complete)` -> metrics: with complete=False as during training (a method may look at a part
    of the held-out set then: `complete_in_training` says whether it sees all of it), with True all of it.
    Its numbers are logged as eval_*; entries that are lists or mappings (a confusion matrix, the
    predictions) go only to eval_metrics.json, through `keep`.
    """

    measure: Callable[[bool], dict]
    report: Callable[[dict], str]  # the run's closing line about the final metrics
    keep: Callable[[dict, Path], dict] = lambda metrics, run_dir: metrics  # extra files; what eval_metrics.json holds
    complete_in_training: bool = True
    by_step: dict[int, dict] = field(default_factory=dict)

    def during_training(self, step: int) -> dict:
        metrics = self.measure(False)
        if self.complete_in_training:
            self.by_step[step] = metrics
        return {f"eval_{k}": v for k, v in metrics.items() if _is_number(v)}

    def final(self, step: int) -> dict:
        """The metrics of the weights final/ holds (those of `step`): reused, or measured again (a resumed
        run evaluated that step in an earlier process)."""
        if step in self.by_step:
            return self.by_step[step]
        with torch.no_grad():
            return self.measure(True)


@dataclass
class Parts:
    """What a method brings to its run."""

    model: torch.nn.Module  # what trains (a peft model with LoRA): its trainable parameters are checkpointed
    objective: torch.nn.Module  # forward(**batch) -> (summed loss, count it is summed over, correct)
    tokenizer: Any
    plan: BatchPlan
    precision: Precision
    announce: Callable[[Loop], str]  # the method's data and settings, printed as the run starts (after a line
    # naming the method, model and trainable parameters; loop.total_steps is known by then)
    template: str | None = None  # the chat template final/ keeps (None: the tokenizer's own)
    eval_batches: list[dict] | None = None  # held-out batches for the loop's eval loss and accuracy
    evaluation: Evaluation | None = None  # the method's own held-out metrics
    admissible: Callable[[dict], bool] | None = None  # evaluations that may be kept as the best (rlhf: KL bound)
    # what final/ holds, made from the trained model (default: the model as it is; plain_model: merged)
    final_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    fits: bool = True  # the train loss measures the fit to the training data (not so for RL's surrogate)
    summary: dict = field(default_factory=dict)  # the method's own summary.json entries


class Run:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        """`cfg` as `RunConfig.resolved()` gives it (output_dir and train.best_metric set)."""
        if cfg.output_dir is None or cfg.train.best_metric is None:
            raise ValueError("Run needs a resolved config (RunConfig.resolved())")
        self.cfg, self.resume, self.run = cfg, resume, RunDir(cfg.output_dir)
        self.best_metric: str = cfg.train.best_metric
        self.dir = self.run.path
        if not resume and self.run.config.exists():
            raise UserError(
                f"{self.dir}: a run is already there; continue it with `tunelab train --resume "
                f"{self.dir}`, or set another output_dir"
            )
        if cfg.train.report_to:  # a missing tracker library said before the model loads
            from tunelab.train.trackers import check_installed

            check_installed(cfg.train.report_to)
        self.started = time.perf_counter()
        quiet_loading()

    def train(self, parts: Parts) -> dict:
        """Train, keep the best weights in final/, evaluate them, write summary.json; returns the summary
        (empty on the processes other than the main one)."""
        cfg, evaluation = self.cfg, parts.evaluation
        # Creating the loop starts the process group under `accelerate launch`: every process has checked
        # the run directory (in __init__) before the first one writes into it.
        loop = Loop(
            parts.objective,
            parts.model,
            cfg.train,
            self.dir,
            parts.plan,
            parts.eval_batches,
            parts.precision,
            self.best_metric,
            unit=METHODS[cfg.method].unit,
            evaluator=(lambda: evaluation.during_training(loop.state.step)) if evaluation else None,
            admissible=parts.admissible,
        )
        try:
            summary = self._train(loop, parts)
        except BaseException:
            if loop.trackers is not None:
                loop.trackers.finish(None, failed=True)
            raise
        if loop.trackers is not None:
            loop.trackers.finish(summary)
        return summary

    def _train(self, loop: Loop, parts: Parts) -> dict:
        cfg = self.cfg
        state = self._run_loop(loop, parts)
        best = restore_best(loop, parts.model)
        step = state.final_step(best is not None)
        peaks = loop.peak_memory_per_process()
        final = None
        if loop.shards is not None:
            # sharded: every process evaluates (each forward pass gathers the weights from all of them),
            # then the main one gets the weights whole, in a plain model
            final = self._final_evaluation(loop, parts, step)
            trained = loop.shards.unsharded()
        else:
            trained = parts.model if loop.accelerator.is_main_process else None
        if trained is None:
            return {}
        base = portable_name(cfg.model)
        model = parts.final_model(trained) if parts.final_model else trained
        write_final(self.dir, model, parts.tokenizer, parts.template, base)
        if loop.shards is None:
            final = self._final_evaluation(loop, parts, step)
        summary = self._summary(loop, state, parts, best, final, peaks)
        write_card(self.run.final, cfg, summary, base)
        return summary

    def _run_loop(self, loop: Loop, parts: Parts) -> TrainState:
        """Write the run's config (the main process, once), say what will happen, and run the loop."""
        from tunelab.config import save_config
        from tunelab.models.tuning import count_parameters

        if loop.accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                save_config(self.cfg, self.run.config)
                self.run.record_start()
            if self.cfg.train.report_to:
                from tunelab.train.trackers import Trackers

                config = self.cfg.model_dump(mode="json")
                loop.trackers = Trackers(self.cfg.train.report_to, self.dir, config, self.resume)
            trainable, total = count_parameters(parts.model)
            print(
                f"tunelab: {self.cfg.method} on {self.cfg.model} ({self.cfg.tuning.mode}): {trainable:,} of {total:,} "
                f"parameters train\n{parts.announce(loop)}\n  {runs_on(parts.precision, loop.accelerator.device)}",
                file=sys.stderr,
            )
        loop.accelerator.wait_for_everyone()
        return loop.run(resume=self.resume)

    def _final_evaluation(self, loop: Loop, parts: Parts, step: int) -> dict | None:
        """eval_metrics.json: the method's metrics of final/ (the last logged evaluation for a method that
        has only the loop's loss and accuracy; None without held-out data)."""
        if parts.evaluation is None:
            return next((e for e in reversed(read_metrics(self.dir)) if e["split"] == "eval"), None)
        loop.objective.eval()
        metrics = loop.gathered(parts.evaluation.final, step)
        if not loop.accelerator.is_main_process:  # (sharded: every process measured, for the gathers)
            return metrics
        metrics = parts.evaluation.keep(metrics, self.dir)
        atomic_write_text(self.dir / "eval_metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(parts.evaluation.report(metrics), file=sys.stderr)
        return metrics

    def _summary(
        self, loop: Loop, state: TrainState, parts: Parts, best: Path | None, final: dict | None, peaks: list[float]
    ) -> dict:
        """summary.json: what trained, how fast, how much memory (`peaks`: each process's), the final and
        best metrics, and the overfitting warning; printed as the run's last lines."""
        from tunelab.models.tuning import count_parameters
        from tunelab.train.memory import peak_memory_mb

        cfg, wall = self.cfg, time.perf_counter() - self.started
        trainable, total = count_parameters(parts.model)
        entries = read_metrics(self.dir)
        last_train = next((e for e in reversed(entries) if e["split"] == "train"), None)
        summary = {
            "method": cfg.method,
            "model": cfg.model,
            "tuning": cfg.tuning.mode,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "steps": state.step,
            "planned_steps": loop.total_steps,
            "tokens": state.tokens,
            f"trained_{loop.unit}": state.trained,
            "tokens_per_s": round(state.tokens / max(state.seconds, 1e-9), 1),
            "train_seconds": round(state.seconds, 1),
            "wall_seconds": round(wall, 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "precision": parts.precision.name,
            "processes": loop.accelerator.num_processes,
            "distributed": (cfg.train.distributed if loop.accelerator.num_processes > 1 else None),
            "peak_memory_mb_per_process": [round(peak, 1) for peak in peaks],
            "final_train_loss": last_train and last_train["loss"],
            **parts.summary,
            "eval": final and {k: v for k, v in final.items() if not isinstance(v, (dict, list))},
            "best_step": state.best_step,
            "best_" + self.best_metric: state.best,
            "final_model": "the best checkpoint" if best is not None else "the last step",
            "early_stopped": state.step < loop.total_steps,
            "warning": overfitting_warning(entries, self.best_metric) if parts.fits else None,
        }
        atomic_write_text(self.run.summary_file, json.dumps(summary, indent=2) + "\n")
        if summary["warning"]:
            print(f"warning: {summary['warning']}", file=sys.stderr)
        print(
            f"tunelab: done in {wall:.0f} s; final model in {self.run.final} ({summary['final_model']})",
            file=sys.stderr,
        )
        return summary


def restore_best(loop: Loop, model) -> Path | None:
    """Load the best checkpoint's weights into `model` (when there was an evaluation); returns its folder.

    A run that keeps a weight average (train.ema_decay) evaluated the average: that is what it keeps.
    """
    from tunelab.train.checkpoint import EMA_FILE, load_sharded, load_trainable

    best = loop.best_checkpoint()
    if best is not None and best.exists():
        if loop.shards is not None:
            load_sharded(best, loop.objective)
        else:
            load_trainable(best, model, EMA_FILE if loop.ema is not None else "trainable.safetensors")
        return best
    if loop.ema is not None:
        loop.ema.copy_to_model()
    return None


def write_final(run_dir: Path, model, tokenizer, template: str | None = None, base: str | None = None) -> None:
    """final/: the model and its tokenizer (with the chat template training rendered with, so that
    inference renders prompts the same way), written under a temporary name, then swapped into place. An
    adapter names its base as `base` (`models.resolve.portable_name`), not by this machine's cache path."""
    for config in getattr(model, "peft_config", {}).values():
        if base is not None:
            config.base_model_name_or_path = base
    with atomic_dir(run_dir / "final.new") as tmp:
        model.save_pretrained(tmp)
        if template is not None:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)
    replace_dir(run_dir / "final.new", RunDir(run_dir).final)


def replace_dir(new: Path, final: Path) -> None:
    """Swap a finished directory into place (a rerun of the end after a resume replaces the old one)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
