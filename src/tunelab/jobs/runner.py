"""The job runner: one thread of `tunelab serve` that takes fine-tuning jobs through their states.

    validating_files -> queued -> running -> succeeded | failed | cancelled   (and paused <-> queued)

Validation is tunelab's own (`data.validate`, as `tunelab data validate`); a job runs as a `tunelab train`
subprocess of a run config made from the job, in `DATA/jobs/JOB_ID/` (config.yaml, run/, train.log), at
most `max_running` at a time. The runner reads what the run writes (metrics.jsonl, progress.json, its
checkpoints) into the job's events and checkpoints, and on success the run's model is served as
`ft:BASE:ORG:SUFFIX:ID`. A job the server was running when it stopped (or was killed) is queued again at
the next start and resumes from its last checkpoint (`tunelab train --resume`, exact); a cancelled or
paused job's subprocess is stopped, and what it wrote is kept.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import RequestError
from tunelab.ids import new_id, now
from tunelab.jobs.config import check_files, wandb_environment, write_config
from tunelab.jobs.db import JobsDB
from tunelab.jobs.files import add_result_file
from tunelab.jobs.launch import JobLaunch
from tunelab.launch import last_error
from tunelab.rundir import RunDir
from tunelab.train.logs import read_metrics, read_metrics_after

FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobFolder:
    """DATA/jobs/JOB_ID: what the runner keeps of one job (nothing else names these files)."""

    path: Path

    @property
    def config(self) -> Path:  # the run config made from the job
        return self.path / "config.yaml"

    @property
    def log(self) -> Path:  # what its `tunelab train` subprocess printed
        return self.path / "train.log"

    @property
    def run(self) -> RunDir:
        return RunDir(self.path / "run")


def job_folder(data: Path, job_id: str) -> JobFolder:
    return JobFolder(data / "jobs" / job_id)


class Runner:
    def __init__(
        self,
        db: JobsDB,
        folder: Path,
        base_of: Callable[[str], str | None],
        max_running: int = 1,
        launch: JobLaunch | None = None,
    ):
        self.db, self.folder, self.base_of, self.max_running = db, folder, base_of, max_running
        self.launch = launch or JobLaunch()  # how a job's `tunelab train` starts: one process, N, a template
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopping: dict[str, str] = {}  # job id -> the status its stopped subprocess leaves it in
        self.offsets: dict[str, int] = {}  # job id -> bytes of metrics.jsonl read
        self.checkpoints: dict[str, set[int]] = {}  # job id -> the checkpoint steps recorded
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="tunelab-jobs", daemon=True)

    def start(self) -> None:
        for job in self.db.all_jobs("running"):  # the server stopped (or died) while it trained
            self.db.update_job(job["id"], status="queued", private={**self.db.private(job["id"]), "resume": True})
            self.event(job["id"], "The server restarted: the job resumes from its last checkpoint")
        self.thread.start()

    def close(self) -> None:
        """Stop the runner and its subprocesses; their jobs stay `running` and resume at the next start."""
        self.closed = True
        self.wake.set()
        with self.lock:
            for job_id, process in self.processes.items():
                self.stopping[job_id] = "running"  # not a failure: the watcher must leave it alone
                _stop(process)
        self.thread.join(timeout=10)

    # --- requests from the API --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict:
        return self._halt(job_id, "cancelled", ("validating_files", "queued", "running", "paused"))

    def pause(self, job_id: str) -> dict:
        return self._halt(job_id, "paused", ("queued", "running"))

    def resume(self, job_id: str) -> dict:
        with self.lock:
            job = self.db.known(job_id)
            if job["status"] != "paused":
                raise RequestError(
                    400, f"job {job_id} is {job['status']}: only a paused job resumes", code="invalid_state"
                )
            job = self.db.update_job(job_id, status="queued")
        self.event(job_id, "Job resumed: it continues from its last checkpoint")
        self.wake.set()
        return job

    def _halt(self, job_id: str, status: str, allowed: tuple[str, ...]) -> dict:
        with self.lock:
            job = self.db.known(job_id)
            if job["status"] not in allowed:
                verb = "cancelled" if status == "cancelled" else "paused"
                raise RequestError(400, f"job {job_id} is {job['status']}: it cannot be {verb}", code="invalid_state")
            process = self.processes.get(job_id)
            if process is not None:
                self.stopping[job_id] = status
        if process is not None:
            _stop(process)  # within seconds: SIGTERM, then SIGKILL
        with self.lock:
            self.processes.pop(job_id, None)
            self.stopping.pop(job_id, None)
            changes: dict[str, Any] = {"status": status, "estimated_finish": None}
            if status == "cancelled":
                changes["finished_at"] = now()
            job = self.db.update_job(job_id, **changes)
        self.event(
            job_id,
            "Job cancelled" if status == "cancelled" else "Job paused: resume it to continue from its last checkpoint",
        )
        return job

    def event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        key: str | None = None,
        data: dict | None = None,
        kind: str = "message",
    ) -> None:
        event: dict[str, Any] = {
            "object": "fine_tuning.job.event",
            "id": new_id("ftevent"),
            "created_at": now(),
            "level": level,
            "message": message,
            "data": data or {},
            "type": kind,
        }
        self.db.add_event(job_id, key or event["id"], event)

    # --- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.closed:
            try:
                for job in reversed(self.db.all_jobs("validating_files")):
                    self._validate(job)
                for job_id in list(self.processes):
                    self._watch(job_id)
                queued = list(reversed(self.db.all_jobs("queued")))  # oldest first
                while queued and len(self.processes) < self.max_running and not self.closed:
                    self._launch(queued.pop(0))
            except Exception as e:  # a bug of ours must not stop every job: say it, go on
                print(f"tunelab serve: job runner: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.wake.wait(0.5)
            self.wake.clear()

    def _validate(self, job: dict) -> None:
        try:
            resolved = check_files(job, self.db, self.folder)
        except RequestError as e:
            self._fail(job["id"], e.code or "invalid_training_file", e.message, e.param)
            return
        with self.lock:
            if self.db.known(job["id"])["status"] != "validating_files":  # cancelled meanwhile
                return
            self.db.update_job(job["id"], status="queued", **resolved)
        self.event(job["id"], "Files validated, moving job to queued state")

    def _launch(self, job: dict) -> None:

        from tunelab.errors import UserError

        job_dir = job_folder(self.folder, job["id"])
        private = self.db.private(job["id"])
        try:
            config = write_config(
                job, self.db, job_dir.config, job_dir.run.path, self.folder, self.base_of, self.launch.processes
            )
        except RequestError as e:
            self._fail(job["id"], e.code or "invalid_request", e.message, e.param)
            return
        except UserError as e:
            self._fail(job["id"], "invalid_hyperparameters", str(e))
            return
        run = job_dir.run
        resume = private.get("resume") and run.is_run()
        train = self.launch.command(["train", *(["--resume", str(run.path)] if resume else [str(config)])])
        command = [sys.executable, "-m", "tunelab.jobs.child", str(os.getpid()), "--", *train]
        with self.lock:
            if self.db.known(job["id"])["status"] != "queued":
                return
            log = open(job_dir.log, "ab")
            try:
                process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=job_dir.path,
                    start_new_session=True,
                    env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **wandb_environment(job)},
                )
            finally:
                log.close()
            self.processes[job["id"]] = process
            self.offsets[job["id"]] = 0
            self.db.update_job(job["id"], status="running", private={**private, "resume": True})
        self.event(
            job["id"], "Fine-tuning job resumed from its last checkpoint" if resume else "Fine-tuning job started"
        )
        if self.launch.processes > 1 and not resume:
            from tunelab.jobs.config import per_process_batch

            batch = job["method"][job["method"]["type"]]["hyperparameters"]["batch_size"]
            each = per_process_batch(batch, self.launch.processes)
            self.event(
                job["id"],
                f"Training on {self.launch.processes} processes: {each} examples each a step, "
                f"{each * self.launch.processes} in all",
            )

    def _watch(self, job_id: str) -> None:
        """Read what the run wrote since the last look; finish the job when its subprocess has exited."""
        with self.lock:
            process = self.processes.get(job_id)
            if process is None or job_id in self.stopping:
                return
            code = process.poll()
        run = job_folder(self.folder, job_id).run
        job = self.db.known(job_id)
        progress = run.progress()
        self._read_metrics(job, run.path, progress.get("total_steps") if progress else None)
        self._read_checkpoints(job, run)
        if progress and code is None:
            finish = int(progress["updated_at"] + progress["eta_seconds"])
            if finish != job.get("estimated_finish"):
                self.db.update_job(job_id, estimated_finish=finish)
        if code is None:
            return
        with self.lock:
            if job_id in self.stopping or self.processes.get(job_id) is not process:
                return
            self.processes.pop(job_id)
        if code == 0 and run.is_finished():
            self._succeed(job, run)
        else:  # what `tunelab train` recorded (failed.json), else what its log says last
            failure = run.failure()
            self._fail(
                job_id,
                "training_failed",
                failure["error"]
                if failure and failure.get("error")
                else last_error(job_folder(self.folder, job_id).log, code),
            )

    def _read_metrics(self, job: dict, run_dir: Path, total: int | None) -> None:
        rows, self.offsets[job["id"]] = read_metrics_after(run_dir, self.offsets.get(job["id"], 0))
        for row in rows:
            self._metrics_event(job, row, total)

    def _metrics_event(self, job: dict, row: dict, total: int | None) -> None:
        step, split = row["step"], row.get("split")
        if split == "train":
            data = {"step": step, "train_loss": row["loss"], "total_steps": total}
            if "accuracy" in row:
                data["train_mean_token_accuracy"] = row["accuracy"]
            data.update({k: row[k] for k in ("lr", "tokens_per_s", "epoch") if k in row})
            message = f"Step {step}/{total or '?'}: training loss={row['loss']:.4f}"
            if "reward" in row:  # a reinforcement job: its reward curve
                data.update({"train_reward_mean": row["reward"], "train_reward_std": row.get("reward_std")})
                message = f"Step {step}/{total or '?'}: training reward={row['reward']:.4f}"
        elif split == "eval":
            data = {"step": step, "valid_loss": row.get("loss"), "total_steps": total}
            if "accuracy" in row:
                data["valid_mean_token_accuracy"] = row["accuracy"]
            data.update({k: v for k, v in row.items() if k not in ("step", "split", "loss", "accuracy")})
            message = f"Step {step}/{total or '?'}: validation loss={row.get('loss', float('nan')):.4f}"
            if "reward" in row and "loss" not in row:
                data["valid_reward_mean"] = row["reward"]
                message = f"Step {step}/{total or '?'}: validation reward={row['reward']:.4f}"
        else:
            return
        self.event(job["id"], message, key=f"metrics:{split}:{step}", data=data, kind="metrics")

    def _read_checkpoints(self, job: dict, run: RunDir) -> None:
        folder = run.checkpoints
        if not folder.is_dir():
            return
        if job["id"] not in self.checkpoints:  # recorded before (a restart): known, not new
            self.checkpoints[job["id"]] = self.db.checkpoint_steps(job["id"])
        seen = self.checkpoints[job["id"]]
        present = {
            int(m.group(1))
            for p in folder.glob("step-*")
            if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "trainer.json").is_file()
        }
        for step in seen - present:  # the run keeps its newest (and best) checkpoints only: so does the list
            self.db.delete_checkpoint(job["id"], step)
            seen.discard(step)
        new = sorted(present - seen)
        metrics = self._metrics_by_step(run.path) if new else {}
        for step in new:
            seen.add(step)
            checkpoint = {
                "object": "fine_tuning.job.checkpoint",
                "id": new_id("ftckpt"),
                "created_at": now(),
                "fine_tuned_model_checkpoint": f"{self.db.private(job['id'])['name']}:ckpt-step-{step}",
                "fine_tuning_job_id": job["id"],
                "metrics": {"step": step, **metrics.get(step, {})},
                "step_number": step,
            }
            if self.db.add_checkpoint(job["id"], step, checkpoint):
                self.event(job["id"], f"Checkpoint created at step {step}", key=f"checkpoint:{step}")

    @staticmethod
    def _metrics_by_step(run_dir: Path) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for row in read_metrics(run_dir):
            prefix = {"train": "train_", "eval": "valid_"}.get(str(row.get("split")))
            if prefix:
                entry = out.setdefault(row["step"], {})
                if "loss" in row:  # a reinforcement job's evaluations have a reward and no loss
                    entry[f"{prefix}loss"] = row["loss"]
                if "accuracy" in row:
                    entry[f"{prefix}mean_token_accuracy"] = row["accuracy"]
                if "reward" in row:
                    entry[f"{prefix}reward_mean"] = row["reward"]
        return out

    def _succeed(self, job: dict, run: RunDir) -> None:
        summary = run.summary() or {}
        name = self.db.private(job["id"])["name"]
        results = add_result_file(self.db, self.folder, job["id"], run.path)
        self.db.update_job(
            job["id"],
            status="succeeded",
            fine_tuned_model=name,
            finished_at=now(),
            trained_tokens=summary.get("tokens"),
            estimated_finish=None,
            result_files=[results] if results else [],
        )
        self.event(job["id"], f"New fine-tuned model created: {name}")
        self.event(job["id"], "The job has successfully completed")

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        with self.lock:
            self.db.update_job(
                job_id,
                status="failed",
                finished_at=now(),
                estimated_finish=None,
                error={"code": code, "message": message, "param": param},
            )
        self.event(job_id, f"Job failed: {message}", level="error")


def _stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the run's process group, SIGKILL it after `grace` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
