"""The step loop every method shares: accumulation, schedule, clipping, eval, early stopping, checkpoints.

    loop = Loop(objective, model, cfg.train, run_dir, plan, eval_batches)
    state = loop.run(resume=False)        # a TrainState

`objective(batch) -> (loss_sum, count, correct)` is the method's loss as a module (so that DDP sees
its forward): summed over the `count` positions or pairs it scores. The loop divides by the count of
the whole accumulated batch, across micro-batches and processes, so 4 micro-batches of 2 give the
same update as 1 of 8 (averaging per micro-batch, as many trainers do, weights short examples more).

The data order is a pure function of the seed and the step (`BatchPlan`), so a resumed run needs only
the step number to continue on the very next micro-batch; with the optimizer, scheduler and RNG states
restored, it logs the same losses as a run that never stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from tunelab.errors import UserError
from tunelab.eval.metrics import higher_is_better
from tunelab.fs import atomic_write_text
from tunelab.precision import Precision, autocast, compute_dtype
from tunelab.rundir import RunDir
from tunelab.train import checkpoint as ckpt
from tunelab.train import sharding
from tunelab.train.ema import WeightAverage
from tunelab.train.frozen import FrozenInComputeDtype
from tunelab.train.fused_lora import fused_lora
from tunelab.train.fused_norm import fused_norms
from tunelab.train.logs import plot_losses
from tunelab.train.memory import HeapCeiling
from tunelab.train.plan import BatchPlan
from tunelab.train.sharding import Shards
from tunelab.train.trackers import Trackers


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint (trainer.json), so that a resumed run goes on from it."""

    step: int = 0  # optimizer steps taken
    best: float | None = None  # the best value of train.best_metric so far
    best_step: int | None = None  # its step (a checkpoint is always kept there)
    bad_evals: int = 0  # evaluations since the best one (early stopping counts them against train.patience)
    tokens: int = 0  # real (non-padding) tokens the forward passes read, prompts included: tokens/s counts these
    trained: int = 0  # what the loss averaged over, summed: tokens, examples, pairs or responses (Loop.unit)
    seconds: float = 0.0  # training time so far, evaluations included
    window_loss: float = 0.0  # loss x trained since the last train log line
    window_trained: int = 0
    window_correct: int = 0  # right predictions (tokens, labels, pairs ranked right) since the last log line

    @classmethod
    def from_json(cls, saved: dict) -> TrainState:
        """From trainer.json, also as tunelab 0.x wrote it (`trained_tokens`, `window: [loss, count]`)."""
        saved = dict(saved)
        if "trained_tokens" in saved:
            saved["trained"] = saved.pop("trained_tokens")
        if "window" in saved:
            saved["window_loss"], saved["window_trained"] = saved.pop("window")
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def final_step(self, restored_best: bool) -> int:
        """The step whose weights the model holds at the end: the best one once it is restored, else the last."""
        return self.best_step if restored_best and self.best_step is not None else self.step


class Loop:
    def __init__(
        self,
        objective,
        model,
        train_cfg,
        run_dir: Path,
        plan: BatchPlan,
        eval_batches=None,
        precision: Precision | str = "fp32",
        best_metric: str = "eval_loss",
        evaluator: Callable[[], dict] | None = None,
        admissible: Callable[[dict], bool] | None = None,
        unit: str = "tokens",
    ):
        from accelerate import Accelerator

        self.cfg, self.run_dir, self.plan = train_cfg, Path(run_dir), plan
        self.rundir = RunDir(self.run_dir)
        self.precision = precision.name if isinstance(precision, Precision) else precision
        self.unit = unit  # what the objective's count counts: logged as trained_<unit>
        self.model = model  # the parameters to optimise and save (a peft model in LoRA)
        self.best_metric = best_metric
        self.evaluator = evaluator  # the method's own metrics (generation, F1), beside or instead of loss and accuracy
        self.admissible = admissible  # evaluations it refuses (rlhf: KL over its bound) are never the best
        # a method's own training metrics (rlhf: reward, KL, length), averaged over each log window
        self.step_metrics: Callable[[], dict] = getattr(objective, "pop_metrics", dict)
        # a method whose rows are made inside its forward (rlhf samples them) counts its own tokens
        self.own_tokens = getattr(objective, "pop_tokens", None)
        # train.report_to: the trackers the run opened (on the main process only)
        self.trackers: Trackers | None = None
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        torch.manual_seed(train_cfg.seed)
        from tunelab.models.tuning import layer_lr_groups

        # train.distributed fsdp on several processes: the model sharded in place (before the optimizer
        # sees its parameters); else accelerate wraps it in DDP (on several processes) or leaves it
        self.shards: Shards | None = None
        if train_cfg.distributed == "fsdp" and self.accelerator.num_processes > 1:
            self._refuse_unsharded(train_cfg)
            self.shards = Shards(objective, model, self.accelerator.device)
        groups = layer_lr_groups(model, train_cfg.lr, train_cfg.layer_lr_decay)
        optimizer = torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        if self.shards is None:
            self.objective, self.optimizer = self.accelerator.prepare(objective, optimizer)
        else:
            self.objective, self.optimizer = objective, optimizer
        first = plan.epoch(0)
        self.micro_per_epoch = len(first)
        self.group = train_cfg.grad_accum * self.accelerator.num_processes  # micro-batches per optimizer step
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.group)
        self.total_steps = train_cfg.max_steps or math.ceil(train_cfg.epochs * self.steps_per_epoch)
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(train_cfg.scheduler, train_cfg.scheduler)
        self.scheduler = get_scheduler(
            name,
            optimizer,
            num_warmup_steps=round(train_cfg.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.eval_batches = eval_batches
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.ema = WeightAverage(trainable, train_cfg.ema_decay) if train_cfg.ema_decay else None
        self.state = TrainState()
        self._epoch_cache: tuple[int, list[dict]] | None = (0, first)  # collated once, used by step 0
        dtype = compute_dtype(self.precision) if train_cfg.frozen_weights == "compute" else None
        if dtype is not None and self.shards is not None:
            self._say("train.frozen_weights compute is off under FSDP: each process holds 1/N of the fp32 weights")
            dtype = None
        self.frozen = FrozenInComputeDtype(objective, dtype)  # entered by run()
        self.fused = objective if train_cfg.fused_lora else None  # its LoRA layers fused by run()
        self.norms = objective if self.accelerator.device.type == "cpu" else None  # RMSNorms fused by run()
        self.heap = HeapCeiling()

    def gathered(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`: under FSDP through the sharded root, so that the weights outside the blocks
        are whole while it runs (every process must run the same), else as it is."""
        if self.shards is None:
            return fn(*args, **kwargs)
        return self.shards.run(fn, *args, **kwargs)

    def _refuse_unsharded(self, train_cfg) -> None:
        """What does not run sharded, refused before anything is built."""
        if train_cfg.ema_decay:
            raise UserError(
                "train.ema_decay: the weight average is not kept under train.distributed fsdp; "
                "leave it out, or use train.distributed ddp"
            )
        if self.unit == "responses":
            raise UserError(
                "train.distributed fsdp: methods rlhf and grpo sample different responses on each process, and "
                "sharded weights need every process to run the same forward passes; use train.distributed ddp"
            )

    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"tunelab: {message}", file=sys.stderr)

    # --- the run -------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainState:
        # sibling LoRA layers as one where training computes in bf16/fp16 (measured there); an fp32 run keeps
        # each layer's own matmuls, rounding for rounding what it computed before (the reference runs)
        siblings = self.shards is None and compute_dtype(self.precision) is not None
        with self.frozen, fused_lora(self.fused, siblings=siblings), fused_norms(self.norms):
            return self._run(resume)

    def _run(self, resume: bool) -> TrainState:
        if resume:
            self._restore()
        elif self.rundir.metrics.exists() and self.accelerator.is_main_process:
            self.rundir.metrics.unlink()
        cfg, state = self.cfg, self.state
        stop = False
        started = time.perf_counter() - state.seconds
        first_step, session = state.step, time.perf_counter()
        if self.evaluates and state.step == 0:  # where training starts from: the curve's first point
            self._log_eval(0, self.evaluate())
        with self._progress() as progress:
            task = progress.add_task("training", total=self.total_steps, completed=state.step, loss="", speed="")
            while state.step < self.total_steps and not stop:
                loss, trained, correct, grad_norm = self._optimizer_step(state.step)
                state.step += 1
                state.trained += trained
                state.tokens += self.real_tokens
                state.window_loss += loss * trained
                state.window_trained += trained
                state.window_correct += correct
                state.seconds = time.perf_counter() - started
                step = state.step
                speed = state.tokens / max(state.seconds, 1e-9)
                last = step == self.total_steps
                if step % cfg.log_every == 0 or last:
                    self._log(
                        {
                            "step": step,
                            "split": "train",
                            "loss": state.window_loss / max(state.window_trained, 1),
                            "lr": max(self.scheduler.get_last_lr()),
                            "grad_norm": grad_norm,
                            "epoch": round(step / self.steps_per_epoch, 4),
                            "tokens": state.tokens,
                            f"trained_{self.unit}": state.trained,
                            "tokens_per_s": round(speed, 1),
                            **self._train_accuracy(),
                            **self._step_metrics(),
                        }
                    )
                    state.window_loss, state.window_trained, state.window_correct = 0.0, 0, 0
                    per_step = (time.perf_counter() - session) / max(step - first_step, 1)
                    eta = (self.total_steps - step) * per_step
                    self._progress_file(step, eta, speed)
                    if not progress.console.is_terminal and self.accelerator.is_main_process:
                        print(
                            f"step {step}/{self.total_steps}: loss {loss:.4f}, {speed:,.0f} tokens/s, "
                            f"eta {eta / 60:.1f} min",
                            file=sys.stderr,
                            flush=True,
                        )  # a log file gets lines
                if self.evaluates and (self._every(cfg.eval_every, step) or last):
                    stop = self._evaluate_and_track(step)
                if self._every(cfg.save_every, step) or last or stop:
                    self._save(step)
                progress.update(task, completed=step, loss=f"loss {loss:.4f}", speed=f"{speed:,.0f} tok/s")
        self.plot()
        return state

    def _optimizer_step(self, step: int) -> tuple[float, int, int, float | None]:
        """One optimizer step over the step's micro-batches: returns mean loss, trained tokens, right
        predictions, grad norm."""
        batches, padding = self._micro_batches(step)
        acc = self.accelerator
        local = sum(_scored(b) for b in batches)
        real = sum(b["real_tokens"] for b in batches)
        counts = acc.reduce(torch.tensor([local, real], device=acc.device), reduction="sum").tolist()
        total, self.real_tokens = int(counts[0]), int(counts[1])
        loss_sum, correct_sum = 0.0, 0
        runs = [(b, 1) for b in batches] + [(b, 0) for b in padding]
        for i, (batch, weight) in enumerate(runs):
            batch = _on(batch, acc.device)
            sync = i == len(runs) - 1
            ddp = self.shards is None and acc.num_processes > 1
            with acc.no_sync(self.objective) if not sync and ddp else nullcontext():
                with autocast(self.precision, acc.device):
                    summed, _, correct = self.gathered(self.objective, **batch)
                # DDP and FSDP average gradients over processes; scaling by their number makes it a sum, and
                # the division by every process's trained tokens makes the whole step one token-level mean.
                acc.backward(summed * (weight * acc.num_processes / max(total, 1)))
            loss_sum += summed.item() * weight
            correct_sum += int(correct) * weight
            if acc.device.type == "cpu":
                self.heap.micro_batch_done()  # gives freed memory back if the heap has fragmented and grown
        if self.own_tokens is not None:
            self.real_tokens = int(
                acc.reduce(torch.tensor(self.own_tokens(), device=acc.device), reduction="sum").item()
            )
        if not runs:  # a DDP process with no micro-batch still takes part in the gradient all-reduce
            acc.backward(sum(p.sum() * 0 for p in self.model.parameters() if p.requires_grad))
        grad_norm = None
        if self.cfg.max_grad_norm:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            if self.shards is not None:  # the norm of every process's shards together
                norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.max_grad_norm)
                grad_norm = float(sharding.full(norm))
            else:
                grad_norm = float(acc.clip_grad_norm_(trainable, self.cfg.max_grad_norm))
        self.optimizer.step()
        if acc.device.type == "cpu":
            self.heap.step_done()
            self.frozen.forget_read_pages()
        if self.ema is not None:
            self.ema.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = acc.reduce(
            torch.tensor([loss_sum, correct_sum], dtype=torch.float64, device=acc.device), reduction="sum"
        )
        loss_total, correct_total = sums.tolist()
        return loss_total / max(total, 1), total, int(correct_total), grad_norm

    def _train_accuracy(self) -> dict:
        """Token accuracy (sft, task), accuracy (classify) or pairs ranked right (reward, dpo) over the
        steps since the last log line; rlhf's sampled responses have none."""
        if self.unit == "responses":
            return {}
        return {"accuracy": round(self.state.window_correct / max(self.state.window_trained, 1), 6)}

    def _progress_file(self, step: int, eta: float, speed: float) -> None:
        """progress.json: where the run is, for whatever watches it (the jobs API, a dashboard) without
        parsing logs; written at each train log line."""
        if self.accelerator.is_main_process:
            atomic_write_text(
                self.rundir.progress_file,
                json.dumps(
                    {
                        "step": step,
                        "total_steps": self.total_steps,
                        "steps_per_epoch": self.steps_per_epoch,
                        "eta_seconds": round(eta, 1),
                        "tokens_per_s": round(speed, 1),
                        "updated_at": round(time.time(), 3),
                    }
                )
                + "\n",
            )

    def _every(self, every: int | str | None, step: int) -> bool:
        """Whether `step` is one of every N steps, or (`epoch`) the last step of an epoch."""
        n = self.steps_per_epoch if every == "epoch" else every
        return isinstance(n, int) and n > 0 and step % n == 0

    def _step_metrics(self) -> dict:
        """The method's own training metrics since the last log line, averaged over the processes too
        (every process calls this at the same steps)."""
        metrics = self.step_metrics()
        if metrics and self.accelerator.num_processes > 1:
            values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.accelerator.device)
            metrics = dict(zip(metrics, self.accelerator.reduce(values, reduction="mean").tolist()))
        return metrics

    def _micro_batches(self, step: int) -> tuple[list[dict], list[dict]]:
        """This process's micro-batches for optimizer step `step` (epochs follow each other), and under FSDP
        those it runs only to keep step with the others (their loss weighs nothing)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.plan.epoch(epoch))
        group = self._epoch_cache[1][k * self.group : (k + 1) * self.group]
        mine = group[self.accelerator.process_index :: self.accelerator.num_processes]
        return mine, self._padding(group, mine)

    def _padding(self, batches: list[dict], mine: list[dict]) -> list[dict]:
        """Every process runs as many forward passes as the busiest one (the last step of an epoch may have
        fewer micro-batches than processes): repeats of the first batch, whose results are not counted.
        FSDP gathers the weights from every process at each forward pass, and DDP reduces gradients after
        each backward: a process that sat out would leave the others waiting. (rlhf samples inside its
        forward: a process without a batch takes part in the reduction with a zero gradient instead.)"""
        if self.accelerator.num_processes == 1 or (self.shards is None and self.own_tokens is not None):
            return []
        rounds = -(-len(batches) // self.accelerator.num_processes)
        return batches[:1] * (rounds - len(mine))

    # --- evaluation and early stopping --------------------------------------------------------------

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_batches) or self.evaluator is not None

    def evaluate(self) -> dict:
        """Metrics on the evaluation data, named eval_*: loss and accuracy over the evaluation batches,
        and whatever the method's evaluator adds (task metrics) or replaces; of the averaged weights
        when the run keeps an average (train.ema_decay)."""
        with self.ema.applied() if self.ema is not None else nullcontext():
            return self._evaluate()

    def _evaluate(self) -> dict:
        metrics = self._loss_and_accuracy() if self.eval_batches else {}
        if self.evaluator is not None:
            self.objective.eval()
            try:
                with torch.no_grad(), self.frozen.restored():  # the method's metrics run outside autocast
                    metrics.update(self.gathered(self.evaluator))
            finally:
                self.objective.train()
        return metrics

    def _loss_and_accuracy(self) -> dict:
        acc = self.accelerator
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)
        self.objective.eval()
        mine = self.eval_batches[acc.process_index :: acc.num_processes]
        # DDP's wrapper would broadcast buffers at each forward pass: the module itself needs no other process
        objective = self.objective if self.shards is not None else acc.unwrap_model(self.objective)
        padding = self._padding(self.eval_batches, mine) if self.shards is not None else []
        runs = [(b, 1) for b in mine] + [(b, 0) for b in padding]
        with torch.no_grad():
            for batch, weight in runs:
                batch = _on(batch, acc.device)
                with autocast(self.precision, acc.device):
                    summed, count, correct = self.gathered(objective, **batch)
                sums += weight * torch.tensor([summed.item(), count, correct], dtype=torch.float64, device=acc.device)
        self.objective.train()
        loss, count, correct = acc.reduce(sums, reduction="sum").tolist()
        return {"eval_loss": loss / max(count, 1), "eval_accuracy": correct / max(count, 1)}

    def _evaluate_and_track(self, step: int) -> bool:
        """Evaluate, remember the best step, and say whether early stopping should end the run now."""
        metrics = self.evaluate()
        self._log_eval(step, metrics)
        value = metrics[self.best_metric]
        state = self.state
        better = state.best is None or (
            value > state.best if higher_is_better(self.best_metric) else value < state.best
        )
        if better and (self.admissible is None or self.admissible(metrics)):
            state.best, state.best_step, state.bad_evals = value, step, 0
            self._save(step)  # the best is always a checkpoint, whatever save_every says
            return False
        state.bad_evals += 1
        patience = self.cfg.patience
        return patience is not None and state.bad_evals >= patience

    # --- checkpoints, resume, logs ------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.rundir.checkpoints

    def _save(self, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.checkpoints / ckpt.checkpoint_name(step)
        if folder.exists():
            return
        state = {"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        trainer = {**asdict(self.state), "step": step}
        if self.shards is not None:  # every process writes its shards
            ckpt.save_sharded(folder, self.objective, self.optimizer, state, trainer)
        elif acc.is_main_process:
            state["optimizer"] = self.optimizer.state_dict()
            average = self.ema.state_dict() if self.ema is not None else None
            ckpt.save_checkpoint(folder, self.model, state, trainer, average)
        if acc.is_main_process:
            keep = {self.state.best_step} if self.state.best_step is not None else set()
            ckpt.prune(self.checkpoints, self.cfg.keep_checkpoints, keep)
        acc.wait_for_everyone()

    def _restore(self) -> None:
        found = ckpt.list_checkpoints(self.checkpoints)
        if not found:  # killed before its first checkpoint: start over, the log too
            if self.rundir.metrics.exists() and self.accelerator.is_main_process:
                self.rundir.metrics.unlink()
            return
        folder = found[-1]
        state, trainer = ckpt.load_state(folder)
        if self.shards is not None:
            ckpt.load_sharded(folder, self.objective, self.optimizer)
        else:
            ckpt.load_trainable(folder, self.model)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.state = TrainState.from_json(trainer)
        if self.ema is not None:
            from safetensors.torch import load_file

            if not (folder / ckpt.EMA_FILE).is_file():
                raise UserError(f"{folder}: has no weight average; resume without train.ema_decay, as the run started")
            self.ema.load_state_dict(load_file(str(folder / ckpt.EMA_FILE)), updates=self.state.step)
        # The log goes back to the checkpoint too, so that it reads as one uninterrupted run.
        path = self.rundir.metrics
        if path.exists() and self.accelerator.is_main_process:
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= self.state.step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def peak_memory_per_process(self) -> list[float]:
        """Each process's peak memory so far, in MB (`train.memory.peak_memory_mb`; every process calls this)."""
        from tunelab.train.memory import peak_memory_mb

        peak = torch.tensor([peak_memory_mb()], dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.gather(peak).tolist() if self.accelerator.num_processes > 1 else peak.tolist()

    def best_checkpoint(self) -> Path | None:
        step = self.state.best_step
        return self.checkpoints / ckpt.checkpoint_name(step) if step is not None else None

    def _log_eval(self, step: int, metrics: dict) -> None:
        self._log({"step": step, "split": "eval", **{k.removeprefix("eval_"): v for k, v in metrics.items()}})

    def _log(self, entry: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        entry = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in entry.items() if v is not None}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.rundir.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.trackers is not None:
            self.trackers.log(entry)
        if entry["split"] == "eval":
            shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if isinstance(v, float))
            print(f"step {entry['step']}: eval {shown}", file=sys.stderr)

    def _progress(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            disable=not self.accelerator.is_main_process,
        )

    def plot(self) -> None:
        """loss_curve.png: train and eval loss against the step (written atomically)."""
        if not self.accelerator.is_main_process:
            return
        plot_losses(self.run_dir, self.run_dir / "loss_curve.png", self.best_metric)


COUNTS = ("real_tokens", "count")  # what collate functions add beside the model inputs


def _scored(batch: dict) -> int:
    """What the batch's loss is summed over: `count` where the collate function gives it (examples,
    pairs), else the trained tokens of a causal LM (labels shifted by one)."""
    return batch["count"] if "count" in batch else int((batch["labels"][:, 1:] != -100).sum())


def _on(batch: dict, device) -> dict:
    """The model inputs of a collated batch, on `device` (without the counts)."""
    return {k: v.to(device) for k, v in batch.items() if k not in COUNTS}
