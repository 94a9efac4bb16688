"""The routes of OpenAI's files and fine-tuning jobs API on `tunelab serve`, and the service behind them.

    POST /v1/files, GET /v1/files[/{id}[/content]], DELETE /v1/files/{id}
    POST /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs[/{id}[/events | /checkpoints]]
    POST /v1/fine_tuning/jobs/{id}/cancel | /pause | /resume, DELETE /v1/models/{fine-tuned model}

Objects and errors are OpenAI's (the official client parses them into its own types). An upload is
counted while it streams in and refused past `--max-upload-mb`, whatever its Content-Length says.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.jobs.common import JobError, new_id, now
from tunelab.jobs.db import JobsDB, UnknownCursor
from tunelab.jobs.files import UPLOADABLE, clean_filename, file_object, file_path
from tunelab.jobs.runner import Runner
from tunelab.serve.engine import ServeError
from tunelab.serve.http import openai_errors, parse

ORG = "tunelab"
SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
LIMITS = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (1e-6, 100.0), "beta": (1e-6, 10.0),
          "lora_rank": (1, 1024)}


class Jobs:
    """The files and jobs of one data directory, and the runner that trains them."""

    def __init__(self, folder: Path, store, max_running: int = 1, max_upload_bytes: int = 512 << 20):
        # absolute: a job's trainer runs in its own folder, where a relative --data-dir would name nothing
        self.folder, self.store, self.max_upload_bytes = folder.resolve(), store, max_upload_bytes
        self.db = JobsDB(folder / "jobs.sqlite3")
        self.runner = Runner(self.db, folder, self.base_of, max_running)

    def base_of(self, model: str) -> str | None:
        """What a job on `model` trains (a registry name or a model directory), or None: only causal LMs
        the server knows by name, never a path a client sends."""
        from tunelab.models import REGISTRY

        if model in REGISTRY:
            return model if REGISTRY[model].family == "causal-lm" else None
        served = self.store.fixed.get(model)
        if served is not None and served.generates and not served.adapter:
            return str(served.folder)
        return None

    def public_names(self) -> dict[Path, str]:
        """What a client is shown for the paths of this data directory (`serve.redact`): a file by its id
        and name, a job's run by the job's id, the directory itself as `<data>`."""
        names = {self.folder: "<data>"}
        for job in self.db.all_jobs():
            names[self.folder / "jobs" / job["id"] / "run"] = job["id"]
            names[self.folder / "jobs" / job["id"]] = job["id"]
        for file in self.db.files(None, None, 1_000_000, False)[0]:
            names[file_path(self.folder, file)] = f"{file['id']} ({file['filename']})"
        return names

    def models(self) -> dict[str, Path]:
        """The fine-tuned models of succeeded jobs (not deleted): name -> the run's final model."""
        out = {}
        for job in self.db.all_jobs("succeeded"):
            final = self.folder / "jobs" / job["id"] / "run" / "final"
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


def add_routes(app: FastAPI, jobs: Jobs) -> None:
    db, runner = jobs.db, jobs.runner

    @app.post("/v1/files")
    @openai_errors
    async def upload(request: Request):
        return await _upload(request, jobs)

    @app.get("/v1/files")
    @openai_errors
    async def list_files(purpose: str | None = None, limit: int = 10000, after: str | None = None,
                         order: str = "desc"):
        _check_limit(limit, 10000)
        if order not in ("asc", "desc"):
            raise ServeError(400, f"order: expected asc or desc, got {order!r}", param="order")
        data, more = _paged(lambda: db.files(purpose, after, limit, order == "desc"))
        return _list(data, more)

    @app.get("/v1/files/{file_id}")
    @openai_errors
    async def get_file(file_id: str):
        return _file(db, file_id)

    @app.get("/v1/files/{file_id}/content")
    @openai_errors
    async def file_content(file_id: str):
        file = _file(db, file_id)
        return FileResponse(file_path(jobs.folder, file), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    @openai_errors
    async def delete_file(file_id: str):
        file = _file(db, file_id)
        using = db.jobs_using(file_id)
        if using:
            job = using[0]
            raise ServeError(409, f"{file_id} is the {'training' if job['training_file'] == file_id else 'validation'}"
                             f"_file of {job['id']}, which is {job['status']}: cancel the job, or delete the file "
                             "once it has finished", param="file_id", code="file_in_use", kind="invalid_request_error")
        db.delete_file(file_id)
        file_path(jobs.folder, file).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/fine_tuning/jobs")
    @openai_errors
    async def create_job(request: Request):
        body = await parse(request, FineTuningRequest, 1 << 20)
        job, private = _new_job(body, jobs)
        db.add_job(job, private)
        runner.event(job["id"], f"Created fine-tuning job: {job['id']}")
        runner.event(job["id"], "Validating training file: " + job["training_file"] + (
            f" and validation file: {job['validation_file']}" if job["validation_file"] else ""))
        runner.wake.set()
        return job

    @app.get("/v1/fine_tuning/jobs")
    @openai_errors
    async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
        _check_limit(limit, 100)
        metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                    if k.startswith("metadata[") and k.endswith("]")}
        data, more = _paged(lambda: db.jobs(after, limit, metadata))
        return _list(data, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    @openai_errors
    async def get_job(job_id: str):
        return _job(db, job_id)

    for action in ("cancel", "pause", "resume"):
        def route(action=action):
            @openai_errors
            async def act(job_id: str):
                _job(db, job_id)
                try:
                    return await asyncio.to_thread(getattr(runner, action), job_id)
                except JobError as e:
                    raise ServeError(e.status, e.message, param=e.param, code=e.code) from None

            act.__name__ = f"{action}_job"
            return act

        app.post(f"/v1/fine_tuning/jobs/{{job_id}}/{action}")(route())

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    @openai_errors
    async def job_events(job_id: str, after: str | None = None, limit: int = 20):
        _job(db, job_id)
        _check_limit(limit, 1000)
        data, more = _paged(lambda: db.events(job_id, after, limit))
        return _list(data, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    @openai_errors
    async def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        _job(db, job_id)
        _check_limit(limit, 100)
        data, more = _paged(lambda: db.checkpoints(job_id, after, limit))
        return _list(data, more)

    @app.delete("/v1/models/{model_id:path}")
    @openai_errors
    async def delete_model(model_id: str):
        job = next((j for j in db.all_jobs("succeeded") if j["fine_tuned_model"] == model_id), None)
        if job is None:
            known = model_id in await asyncio.to_thread(jobs.store.served)
            raise ServeError(403 if known else 404, f"the model '{model_id}' is not a fine-tuned model of this server: "
                             "only those can be deleted" if known else f"the model '{model_id}' does not exist here",
                             param="model", code=None if known else "model_not_found",
                             kind="permission_error" if known else "invalid_request_error")
        await asyncio.to_thread(jobs.store.forget, model_id)
        run = jobs.folder / "jobs" / job["id"] / "run"
        for folder in (run / "final", run / "checkpoints"):  # the weights go; the logs and metrics stay
            shutil.rmtree(folder, ignore_errors=True)
        return {"id": model_id, "object": "model", "deleted": True}


# --- helpers --------------------------------------------------------------------------------------------


def _list(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _paged(read):
    try:
        return read()
    except UnknownCursor as e:
        raise ServeError(400, f"after: {e.args[0]!r} is not an id of this list", param="after") from None


def _check_limit(limit: int, most: int) -> None:
    if not 1 <= limit <= most:
        raise ServeError(400, f"limit: expected 1 to {most}, got {limit}", param="limit")


def _file(db: JobsDB, file_id: str) -> dict:
    file = db.file(file_id)
    if file is None:
        raise ServeError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
    return file


def _job(db: JobsDB, job_id: str) -> dict:
    job = db.job(job_id)
    if job is None:
        raise ServeError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="fine_tuning_job_not_found")
    return job


async def _upload(request: Request, jobs: Jobs) -> dict:
    """multipart/form-data with `file` and `purpose`, stored by a new id, counted as it streams in."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    from tunelab.fs import atomic_file

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ServeError(400, "POST /v1/files takes multipart/form-data with the fields 'file' and 'purpose'")
    limit = jobs.max_upload_bytes

    async def bounded():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise ServeError(413, f"the upload is over the server's limit of {limit >> 20:,} MB (--max-upload-mb)",
                                 param="file", code="file_too_large")
            yield chunk

    try:
        form = await MultiPartParser(request.headers, bounded(), max_files=1, max_fields=4).parse()
    except MultiPartException as e:
        raise ServeError(400, f"the upload is not valid multipart/form-data: {e.message}") from None
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise ServeError(400, "file: missing; send the file's bytes as the multipart field 'file'", param="file")
        if purpose not in UPLOADABLE:
            raise ServeError(400, f"purpose: expected one of {', '.join(UPLOADABLE)}, got {purpose!r}", param="purpose")
        file = file_object(new_id("file"), 0, clean_filename(upload.filename), purpose)
        path = file_path(jobs.folder, file)

        def store() -> int:  # up to --max-upload-mb, off the event loop that streams other requests' tokens
            upload.file.seek(0)
            with atomic_file(path) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
                return out.tell()

        size = await asyncio.to_thread(store)
        file["bytes"] = size
        jobs.db.add_file(file)
        return file
    finally:
        await form.close()


def _new_job(body: FineTuningRequest, jobs: Jobs) -> tuple[dict, dict]:
    """The job object of a create request, checked (400 naming the parameter), and its private part."""
    import secrets

    from tunelab.models import REGISTRY
    from tunelab.models.registry import status

    if body.model in REGISTRY and status(REGISTRY[body.model]) != "ready":  # a request never installs anything
        raise ServeError(400, f"model: '{body.model}' is not installed on this server; its operator installs it with "
                         f"`tunelab models pull {body.model}` (or names it when starting `tunelab serve`)",
                         param="model", code="model_not_available")
    if jobs.base_of(body.model) is None:
        raise ServeError(400, f"model: '{body.model}' cannot be fine-tuned here: name a causal LM of the registry "
                         "(tunelab models list) or one this server was started with", param="model",
                         code="model_not_available")
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is None:
            continue
        file = jobs.db.file(file_id)
        if file is None:
            raise ServeError(400, f"{param}: no file {file_id!r} (upload it with POST /v1/files)", param=param,
                             code=f"invalid_{param}")
        if file["purpose"] != "fine-tune":
            raise ServeError(400, f"{param}: {file_id} was uploaded with purpose {file['purpose']!r}; a job trains "
                             "on files of purpose 'fine-tune'", param=param, code=f"invalid_{param}")
    if body.suffix is not None and not SUFFIX.fullmatch(body.suffix):
        raise ServeError(400, "suffix: 1 to 64 letters, digits, '.', '_' or '-'", param="suffix")
    if body.integrations:
        raise ServeError(400, "integrations: not available here (the run's metrics, curves and events are the "
                         "server's own)", param="integrations")
    if body.metadata is not None and (len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise ServeError(400, "metadata: at most 16 keys of up to 64 characters, values of up to 512", param="metadata")
    method = _method(body)
    job_id = new_id("ftjob")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    name = f"ft:{body.model}:{ORG}:{body.suffix or ''}:{job_id.split('-', 1)[1][:8]}"
    kind = method["type"]
    legacy = {k: method[kind]["hyperparameters"].get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    job = {"object": "fine_tuning.job", "id": job_id, "model": body.model, "created_at": now(), "finished_at": None,
           "fine_tuned_model": None, "organization_id": f"org-{ORG}", "result_files": [], "status": "validating_files",
           "validation_file": body.validation_file, "training_file": body.training_file, "hyperparameters": legacy,
           "trained_tokens": None, "error": None, "user_provided_suffix": body.suffix, "seed": seed,
           "estimated_finish": None, "integrations": [], "metadata": body.metadata, "method": method}
    return job, {"name": name, "resume": False}


def _method(body: FineTuningRequest) -> dict:
    """`method` as OpenAI spells it ({type, supervised | dpo: {hyperparameters}}), from `method` or the
    legacy `hyperparameters`; every value checked."""
    from tunelab.jobs.config import EXTENSIONS, HYPERPARAMETERS

    method = body.method or {"type": "supervised", "supervised": {"hyperparameters": body.hyperparameters or {}}}
    kind = method.get("type")
    if kind not in HYPERPARAMETERS:
        raise ServeError(400, f"method.type: expected supervised or dpo, got {kind!r}"
                         + (" (reinforcement fine-tuning is not available here)" if kind == "reinforcement" else ""),
                         param="method.type")
    section = method.get(kind) or {}
    if not isinstance(section, dict) or set(section) - {"hyperparameters"}:
        raise ServeError(400, f"method.{kind}: expected {{\"hyperparameters\": {{...}}}}", param=f"method.{kind}")
    given = dict(section.get("hyperparameters") or {})
    if body.method is not None and body.hyperparameters:
        given = {**body.hyperparameters, **given}  # the legacy field still counts, under method's own values
    out = {}
    for key, value in given.items():
        param = f"method.{kind}.hyperparameters.{key}"
        if key not in HYPERPARAMETERS[kind] + EXTENSIONS:
            raise ServeError(400, f"{param}: unknown; expected one of {', '.join(HYPERPARAMETERS[kind] + EXTENSIONS)}",
                             param=param)
        if key == "tuning_mode":
            if value not in ("lora", "full"):
                raise ServeError(400, f"{param}: expected lora or full, got {value!r}", param=param)
        elif value != "auto" or key == "lora_rank":
            whole = key in ("n_epochs", "batch_size", "lora_rank")
            low, high = LIMITS[key]
            ok = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool) and low <= value <= high
            if not ok:
                raise ServeError(400, f"{param}: expected \"auto\" or a {'whole ' if whole else ''}number from "
                                 f"{low:g} to {high:g}, got {value!r}", param=param)
        out[key] = value
    for key in HYPERPARAMETERS[kind]:
        out.setdefault(key, "auto")
    return {"type": kind, kind: {"hyperparameters": out}}


