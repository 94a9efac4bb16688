"""OpenAI's files and fine-tuning jobs, served by `tunelab serve` (its routes: serve/routes/jobs.py): the
files and jobs of one data directory, the runner that trains them, and a create request checked into a
job object (400 naming the parameter).

Objects and errors are OpenAI's (the official client parses them into its own types).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import RequestError
from tunelab.ids import new_id, now
from tunelab.jobs.db import JobsDB
from tunelab.jobs.files import file_path
from tunelab.jobs.launch import JobLaunch
from tunelab.jobs.runner import Runner, job_folder
from tunelab.rundir import RunDir

ORG = "tunelab"
SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
LIMITS = {
    "n_epochs": (1, 50),
    "batch_size": (1, 256),
    "learning_rate_multiplier": (1e-6, 100.0),
    "beta": (1e-6, 10.0),
    "lora_rank": (1, 1024),
    "eval_interval": (1, 100_000),
    "eval_samples": (1, 10_000),
    "compute_multiplier": (0.25, 8.0),
}


class Jobs:
    """The files and jobs of one data directory, and the runner that trains them. `trainable`: the models
    the server was started with that a job may train (id -> folder), besides the registry's causal LMs."""

    def __init__(
        self,
        folder: Path,
        trainable: dict[str, Path] | None = None,
        max_running: int = 1,
        max_upload_bytes: int = 512 << 20,
        launch: JobLaunch | None = None,
        allow_python_graders: bool = False,
    ):
        # absolute: a job's trainer runs in its own folder, where a relative --data-dir would name nothing
        self.folder, self.trainable, self.max_upload_bytes = folder.resolve(), dict(trainable or {}), max_upload_bytes
        self.allow_python_graders = allow_python_graders  # a request's python grader runs here only if so
        self.db = JobsDB(self.folder / "jobs.sqlite3")
        self.runner = Runner(self.db, self.folder, self.base_of, max_running, launch or JobLaunch())

    def base_of(self, model: str) -> str | None:
        """What a job on `model` trains (a registry name or a model directory), or None: only causal LMs
        the server knows by name, never a path a client sends."""
        from tunelab.models import REGISTRY

        if model in REGISTRY:
            return model if REGISTRY[model].family == "causal-lm" else None
        folder = self.trainable.get(model)
        return None if folder is None else str(folder)

    def public_names(self) -> dict[Path, str]:
        """What a client is shown for the paths of this data directory (`serve.redact`): a file by its id
        and name, a job's run by the job's id, the directory itself as `<data>`."""
        names = {self.folder: "<data>"}
        for job in self.db.all_jobs():
            names[self.run_dir(job["id"]).path] = job["id"]
            names[job_folder(self.folder, job["id"]).path] = job["id"]
        for file in self.db.files(None, None, 1_000_000, False)[0]:
            names[file_path(self.folder, file)] = f"{file['id']} ({file['filename']})"
        return names

    def run_dir(self, job_id: str) -> RunDir:
        return job_folder(self.folder, job_id).run

    def delete_weights(self, job: dict) -> None:
        """A deleted fine-tuned model's weights go; its run's logs and metrics stay."""
        run = self.run_dir(job["id"])
        for folder in (run.final, run.checkpoints):
            shutil.rmtree(folder, ignore_errors=True)

    def models(self) -> dict[str, Path]:
        """The fine-tuned models of succeeded jobs (not deleted): name -> the run's final model."""
        out = {}
        for job in self.db.all_jobs("succeeded"):
            final = self.run_dir(job["id"]).final
            if job["fine_tuned_model"] and final.is_dir():
                out[job["fine_tuned_model"]] = final
        return out


class FineTuningRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    integrations: list[Any] | None = None


def new_job(body: FineTuningRequest, jobs: Jobs) -> tuple[dict, dict]:
    """The job object of a create request, checked (400 naming the parameter), and its private part."""
    import secrets

    from tunelab.models import REGISTRY
    from tunelab.models.registry import status

    if body.model in REGISTRY and status(REGISTRY[body.model]) != "ready":  # a request never installs anything
        raise RequestError(
            400,
            f"model: '{body.model}' is not installed on this server; its operator installs it with "
            f"`tunelab models pull {body.model}` (or names it when starting `tunelab serve`)",
            param="model",
            code="model_not_available",
        )
    if jobs.base_of(body.model) is None:
        raise RequestError(
            400,
            f"model: '{body.model}' cannot be fine-tuned here: name a causal LM of the registry "
            "(tunelab models list) or one this server was started with",
            param="model",
            code="model_not_available",
        )
    for param in ("training_file", "validation_file"):
        if getattr(body, param) is not None:
            training_data(jobs.db, param, getattr(body, param))
    if body.suffix is not None and not SUFFIX.fullmatch(body.suffix):
        raise RequestError(400, "suffix: 1 to 64 letters, digits, '.', '_' or '-'", param="suffix")
    integrations = _integrations(body.integrations)
    if body.metadata is not None and (
        len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())
    ):
        raise RequestError(
            400, "metadata: at most 16 keys of up to 64 characters, values of up to 512", param="metadata"
        )
    method = _method(body, jobs.allow_python_graders)
    job_id = new_id("ftjob")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    name = f"ft:{body.model}:{ORG}:{body.suffix or ''}:{job_id.split('-', 1)[1][:8]}"
    kind = method["type"]
    legacy = {
        k: method[kind]["hyperparameters"].get(k, "auto")
        for k in ("n_epochs", "batch_size", "learning_rate_multiplier")
    }
    job = {
        "object": "fine_tuning.job",
        "id": job_id,
        "model": body.model,
        "created_at": now(),
        "finished_at": None,
        "fine_tuned_model": None,
        "organization_id": f"org-{ORG}",
        "result_files": [],
        "status": "validating_files",
        "validation_file": body.validation_file,
        "training_file": body.training_file,
        "hyperparameters": legacy,
        "trained_tokens": None,
        "error": None,
        "user_provided_suffix": body.suffix,
        "seed": seed,
        "estimated_finish": None,
        "integrations": integrations,
        "metadata": body.metadata,
        "method": method,
    }
    return job, {"name": name, "resume": False}


def training_data(db: JobsDB, param: str, file_id: str) -> dict:
    """The file a job's `param` names: uploaded, of purpose fine-tune (400 naming the parameter)."""
    file = db.file(file_id)
    if file is None:
        raise RequestError(
            400, f"{param}: no file {file_id!r} (upload it with POST /v1/files)", param=param, code=f"invalid_{param}"
        )
    if file["purpose"] != "fine-tune":
        raise RequestError(
            400,
            f"{param}: {file_id} was uploaded with purpose {file['purpose']!r}; a job trains "
            "on files of purpose 'fine-tune'",
            param=param,
            code=f"invalid_{param}",
        )
    return file


def check_data(jobs: Jobs, kind: str, training_file: str, validation_file: str | None = None) -> dict:
    """What a `kind` job on these files would find when it starts, before it is created (the dashboard's
    new-job page shows it): every problem and warning by file and line, the examples, and the values
    "auto" hyperparameters take on them."""
    from tunelab.config import DEFAULT_LR
    from tunelab.jobs.config import HYPERPARAMETERS, auto_values, inspect_files

    if kind not in HYPERPARAMETERS:
        raise RequestError(400, f"method: expected supervised, dpo or reinforcement, got {kind!r}", param="method")
    files = {"training_file": training_data(jobs.db, "training_file", training_file)}
    if validation_file:
        files["validation_file"] = training_data(jobs.db, "validation_file", validation_file)
    found = inspect_files(kind, files, jobs.folder)
    return {
        "method": kind,
        "ok": not found["errors"],
        **found,
        "auto": auto_values(kind, {}, found["examples"].get("training_file", 0)),
        "learning_rate": {mode: DEFAULT_LR[mode] for mode in ("lora", "full")},  # times the multiplier
    }


WANDB_KEYS = ("project", "name", "entity", "tags")


def _integrations(given: list[Any] | None) -> list[dict]:
    """OpenAI's Weights & Biases integration: the job's run logged to W&B (`train.report_to: [wandb]`)
    in the project given, with its name, entity and tags; the server's own W&B settings apply (its
    WANDB_API_KEY, or WANDB_MODE=offline)."""
    import importlib.util

    out = []
    for i, item in enumerate(given or []):
        where = f"integrations[{i}]"
        if not isinstance(item, dict) or item.get("type") != "wandb":
            raise RequestError(400, f"{where}.type: expected 'wandb' (the one integration)", param="integrations")
        wandb = item.get("wandb")
        if not isinstance(wandb, dict) or not isinstance(wandb.get("project"), str) or not wandb["project"].strip():
            raise RequestError(
                400, f"{where}.wandb.project: the W&B project to log to is required", param="integrations"
            )
        unknown = sorted(set(wandb) - set(WANDB_KEYS))
        if unknown:
            raise RequestError(
                400,
                f"{where}.wandb: unknown {', '.join(unknown)} (expected {', '.join(WANDB_KEYS)})",
                param="integrations",
            )
        for key in ("name", "entity"):
            if wandb.get(key) is not None and not isinstance(wandb[key], str):
                raise RequestError(400, f"{where}.wandb.{key}: expected a string", param="integrations")
        tags = wandb.get("tags") or []
        if (
            not isinstance(tags, list)
            or len(tags) > 50
            or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags)
        ):
            raise RequestError(
                400, f"{where}.wandb.tags: at most 50 strings of 1 to 64 characters", param="integrations"
            )
        if importlib.util.find_spec("wandb") is None:
            raise RequestError(
                400,
                f"{where}: W&B is not installed on this server (its operator runs pip install wandb)",
                param="integrations",
            )
        out.append({"type": "wandb", "wandb": {k: wandb[k] for k in WANDB_KEYS if wandb.get(k) is not None}})
    if len(out) > 1:
        raise RequestError(400, "integrations: one W&B integration per job", param="integrations")
    return out


def _method(body: FineTuningRequest, allow_python_graders: bool = False) -> dict:
    """`method` as OpenAI spells it ({type, supervised | dpo | reinforcement: {hyperparameters[, grader]}}),
    from `method` or the legacy `hyperparameters`; every value checked, a reinforcement job's grader too."""
    from tunelab.eval.graders import check as check_grader
    from tunelab.jobs.config import EXTENSIONS, HYPERPARAMETERS

    method = body.method or {"type": "supervised", "supervised": {"hyperparameters": body.hyperparameters or {}}}
    kind = method.get("type")
    if kind not in HYPERPARAMETERS:
        raise RequestError(
            400, f"method.type: expected supervised, dpo or reinforcement, got {kind!r}", param="method.type"
        )
    section = method.get(kind) or {}
    keys = {"hyperparameters", "grader"} if kind == "reinforcement" else {"hyperparameters"}
    if not isinstance(section, dict) or set(section) - keys:
        shape = (
            '{"grader": {...}, "hyperparameters": {...}}' if kind == "reinforcement" else '{"hyperparameters": {...}}'
        )
        raise RequestError(400, f"method.{kind}: expected {shape}", param=f"method.{kind}")
    grader = None
    if kind == "reinforcement":
        if "grader" not in section:
            raise RequestError(400, "method.reinforcement.grader: required", param="method.reinforcement.grader")
        grader = check_grader(section["grader"], allow_python_graders, "method.reinforcement.grader")
    given = dict(section.get("hyperparameters") or {})
    if body.method is not None and body.hyperparameters:
        given = {**body.hyperparameters, **given}  # the legacy field still counts, under method's own values
    out = {}
    for key, value in given.items():
        param = f"method.{kind}.hyperparameters.{key}"
        if key not in HYPERPARAMETERS[kind] + EXTENSIONS:
            raise RequestError(
                400, f"{param}: unknown; expected one of {', '.join(HYPERPARAMETERS[kind] + EXTENSIONS)}", param=param
            )
        if key == "tuning_mode":
            if value not in ("lora", "full"):
                raise RequestError(400, f"{param}: expected lora or full, got {value!r}", param=param)
        elif key == "reasoning_effort":
            if value not in ("auto", "default"):
                raise RequestError(
                    400, f"{param}: the models here do not reason; expected auto or default, got {value!r}", param=param
                )
        elif value != "auto" or key == "lora_rank":
            whole = key in ("n_epochs", "batch_size", "lora_rank", "eval_interval", "eval_samples")
            low, high = LIMITS[key]
            ok = (
                isinstance(value, int if whole else (int, float))
                and not isinstance(value, bool)
                and low <= value <= high
            )
            if not ok:
                raise RequestError(
                    400,
                    f'{param}: expected "auto" or a {"whole " if whole else ""}number from '
                    f"{low:g} to {high:g}, got {value!r}",
                    param=param,
                )
        out[key] = value
    for key in HYPERPARAMETERS[kind]:
        out.setdefault(key, "auto")
    return {"type": kind, kind: {"hyperparameters": out, **({"grader": grader} if grader is not None else {})}}
