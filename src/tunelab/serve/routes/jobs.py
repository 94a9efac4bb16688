"""OpenAI's files and fine-tuning jobs routes (the service behind them: tunelab.jobs.service).

    POST /v1/files, GET /v1/files[/{id}[/content]], DELETE /v1/files/{id}
    POST /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs[/{id}[/events | /checkpoints]]
    POST /v1/fine_tuning/jobs/{id}/cancel | /pause | /resume, DELETE /v1/models/{fine-tuned model}
    POST /v1/fine_tuning/alpha/graders/run | /validate   (a grader tried on one sample: eval/graders.py)
    GET /api/fine_tuning/check?method=M&training_file=ID[&validation_file=ID]   (the dashboard's new-job page)

An upload is counted while it streams in and refused past `--max-upload-mb`, whatever its Content-Length
says. Mounted only when the server keeps jobs (`app.state.jobs`).
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from tunelab.errors import RequestError
from tunelab.ids import new_id
from tunelab.jobs.db import JobsDB, UnknownCursor
from tunelab.jobs.files import UPLOADABLE, clean_filename, file_object, file_path
from tunelab.jobs.service import FineTuningRequest, Jobs, check_data, new_job
from tunelab.serve.http import openai_errors, parse

router = APIRouter()


def jobs_of(request: Request) -> Jobs:
    return request.app.state.jobs


@router.post("/v1/files")
@openai_errors
async def upload(request: Request):
    return await _upload(request, jobs_of(request))


@router.get("/v1/files")
@openai_errors
async def list_files(
    request: Request, purpose: str | None = None, limit: int = 10000, after: str | None = None, order: str = "desc"
):
    _check_limit(limit, 10000)
    if order not in ("asc", "desc"):
        raise RequestError(400, f"order: expected asc or desc, got {order!r}", param="order")
    return _paged(lambda: jobs_of(request).db.files(purpose, after, limit, order == "desc"))


@router.get("/v1/files/{file_id}")
@openai_errors
async def get_file(request: Request, file_id: str):
    return _file(jobs_of(request).db, file_id)


@router.get("/v1/files/{file_id}/content")
@openai_errors
async def file_content(request: Request, file_id: str):
    jobs = jobs_of(request)
    return FileResponse(file_path(jobs.folder, _file(jobs.db, file_id)), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
@openai_errors
async def delete_file(request: Request, file_id: str):
    jobs = jobs_of(request)
    file = _file(jobs.db, file_id)
    using = jobs.db.jobs_using(file_id)
    if using:
        job = using[0]
        raise RequestError(
            409,
            f"{file_id} is the {'training' if job['training_file'] == file_id else 'validation'}"
            f"_file of {job['id']}, which is {job['status']}: cancel the job, or delete the file "
            "once it has finished",
            param="file_id",
            code="file_in_use",
        )
    jobs.db.delete_file(file_id)
    file_path(jobs.folder, file).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


@router.post("/v1/fine_tuning/jobs")
@openai_errors
async def create_job(request: Request):
    jobs = jobs_of(request)
    job, private = new_job(await parse(request, FineTuningRequest, 1 << 20), jobs)
    jobs.db.add_job(job, private)
    jobs.runner.event(job["id"], f"Created fine-tuning job: {job['id']}")
    jobs.runner.event(
        job["id"],
        "Validating training file: "
        + job["training_file"]
        + (f" and validation file: {job['validation_file']}" if job["validation_file"] else ""),
    )
    jobs.runner.wake.set()
    return job


@router.get("/v1/fine_tuning/jobs")
@openai_errors
async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
    _check_limit(limit, 100)
    metadata = {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    return _paged(lambda: jobs_of(request).db.jobs(after, limit, metadata))


@router.get("/v1/fine_tuning/jobs/{job_id}")
@openai_errors
async def get_job(request: Request, job_id: str):
    return _job(jobs_of(request).db, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/{action}")
@openai_errors
async def act_on_job(request: Request, job_id: str, action: str):
    """cancel, pause or resume (the runner says which states allow it)."""
    jobs = jobs_of(request)
    if action not in ("cancel", "pause", "resume"):
        raise RequestError(404, f"no action {action!r} on a fine-tuning job: cancel, pause or resume", param="action")
    _job(jobs.db, job_id)
    return await asyncio.to_thread(getattr(jobs.runner, action), job_id)


class GraderRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Any
    model_sample: str
    item: dict[str, Any] | None = None


class GraderValidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Any


@router.post("/v1/fine_tuning/alpha/graders/validate")
@openai_errors
async def validate_grader(request: Request):
    from tunelab.eval.graders import check as check_grader

    body = await parse(request, GraderValidate, 1 << 20)
    return {"grader": check_grader(body.grader, jobs_of(request).allow_python_graders)}


@router.post("/v1/fine_tuning/alpha/graders/run")
@openai_errors
async def run_grader(request: Request):
    """One sample graded, as OpenAI's graders/run answers: the reward, each sub-grader's, and what went wrong."""
    from tunelab.eval.graders import check as check_grader
    from tunelab.eval.graders import grade

    body = await parse(request, GraderRun, 1 << 20)
    grader = check_grader(body.grader, jobs_of(request).allow_python_graders)
    return (await asyncio.to_thread(grade, grader, body.model_sample, body.item or {})).answer(grader)


@router.get("/api/fine_tuning/check")
@openai_errors
async def check(request: Request, training_file: str, method: str = "supervised", validation_file: str | None = None):
    """The problems `tunelab data validate` finds in a would-be job's files, by file and line, and the "auto"
    hyperparameters they resolve to: what the new-job page shows before anything is submitted."""
    return await asyncio.to_thread(check_data, jobs_of(request), method, training_file, validation_file)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
@openai_errors
async def job_events(request: Request, job_id: str, after: str | None = None, limit: int = 20):
    return _job_list(request, job_id, JobsDB.events, after, limit, 1000)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
@openai_errors
async def job_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10):
    return _job_list(request, job_id, JobsDB.checkpoints, after, limit, 100)


@router.delete("/v1/models/{model_id:path}")
@openai_errors
async def delete_model(request: Request, model_id: str):
    jobs, store = jobs_of(request), request.app.state.serving.store
    job = next((j for j in jobs.db.all_jobs("succeeded") if j["fine_tuned_model"] == model_id), None)
    if job is None:
        known = model_id in await asyncio.to_thread(store.served)
        raise RequestError(
            403 if known else 404,
            f"the model '{model_id}' is not a fine-tuned model of this server: only those can be deleted"
            if known
            else f"the model '{model_id}' does not exist here",
            param="model",
            code=None if known else "model_not_found",
            kind="permission_error" if known else "invalid_request_error",
        )
    await asyncio.to_thread(store.forget, model_id)
    jobs.delete_weights(job)
    return {"id": model_id, "object": "model", "deleted": True}


# --- helpers --------------------------------------------------------------------------------------------


def _list(data: list[dict], more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _paged(read) -> dict:
    """One page of a list as OpenAI's list object (`read` gives the rows and whether more follow)."""
    try:
        return _list(*read())
    except UnknownCursor as e:
        raise RequestError(400, f"after: {e.args[0]!r} is not an id of this list", param="after") from None


def _job_list(request: Request, job_id: str, read, after: str | None, limit: int, most: int) -> dict:
    """One page of a job's events or checkpoints (`read`: the JobsDB method), 404 for an unknown job, 400 for a
    limit past `most`."""
    db = jobs_of(request).db
    _job(db, job_id)
    _check_limit(limit, most)
    return _paged(lambda: read(db, job_id, after, limit))


def _check_limit(limit: int, most: int) -> None:
    if not 1 <= limit <= most:
        raise RequestError(400, f"limit: expected 1 to {most}, got {limit}", param="limit")


def _file(db: JobsDB, file_id: str) -> dict:
    file = db.file(file_id)
    if file is None:
        raise RequestError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
    return file


def _job(db: JobsDB, job_id: str) -> dict:
    job = db.job(job_id)
    if job is None:
        raise RequestError(
            404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="fine_tuning_job_not_found"
        )
    return job


async def _upload(request: Request, jobs: Jobs) -> dict:
    """multipart/form-data with `file` and `purpose`, stored by a new id, counted as it streams in."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    from tunelab.fs import atomic_file

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "POST /v1/files takes multipart/form-data with the fields 'file' and 'purpose'")
    limit = jobs.max_upload_bytes

    async def bounded():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise RequestError(
                    413,
                    f"the upload is over the server's limit of {limit >> 20:,} MB (--max-upload-mb)",
                    param="file",
                    code="file_too_large",
                )
            yield chunk

    try:
        form = await MultiPartParser(request.headers, bounded(), max_files=1, max_fields=4).parse()
    except MultiPartException as e:
        raise RequestError(400, f"the upload is not valid multipart/form-data: {e.message}") from None
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "file: missing; send the file's bytes as the multipart field 'file'", param="file")
        if purpose not in UPLOADABLE:
            raise RequestError(
                400, f"purpose: expected one of {', '.join(UPLOADABLE)}, got {purpose!r}", param="purpose"
            )
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
