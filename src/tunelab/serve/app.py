"""The server's app: the routes of each area (serve/routes/), and what every request goes through first
(`guard`): who may ask (serve/security.py), the body's size, no server path in an answer
(serve/redact.py), and one log line. Errors are OpenAI's error objects with the status the official
client maps to its typed exceptions; nothing here ever returns a traceback.
"""

from __future__ import annotations

import asyncio
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from tunelab.dashboard.exports import Exports
from tunelab.dashboard.service import Dashboard
from tunelab.errors import RequestError
from tunelab.serve.http import error as _error
from tunelab.serve.http import too_large
from tunelab.serve.redact import Redactor
from tunelab.serve.routes import dashboard, openai
from tunelab.serve.routes import jobs as jobs_routes
from tunelab.serve.security import Access
from tunelab.serve.serving import Limits, Serving
from tunelab.serve.store import ModelStore

__all__ = ["Limits", "create_app"]


def create_app(
    store: ModelStore, api_key: str | None = None, limits: Limits | None = None, jobs=None, access: Access | None = None
) -> FastAPI:
    """The server's app; with `jobs` (a `jobs.service.Jobs`), also OpenAI's files and fine-tuning jobs API
    (the store serves their models when it was made with `extra=jobs.models`). `access` says who may talk
    to it (`serve.security`); `api_key` alone is the same as `Access(api_key=...)` on a loopback address."""
    limits = limits or Limits()
    access = access or Access(api_key=api_key)
    serving = Serving(store, limits)
    redactor = Redactor(lambda: _public_names(store, jobs))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if jobs is not None:
            jobs.runner.start()
        yield
        if jobs is not None:
            jobs.runner.close()
        app.state.exports.close()
        serving.engine.close()

    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serving, app.state.jobs, app.state.access = serving, jobs, access
    app.state.dashboard, app.state.exports = Dashboard(store.runs, jobs), Exports()
    app.state.engine, app.state.store = serving.engine, store  # what tests and benchmarks look into

    @app.middleware("http")
    async def guard(request: Request, call_next):
        return await _guarded(request, call_next, access, limits, jobs, redactor)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug of ours: one line in the log, no traceback out
        print(f"tunelab serve: internal error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return _error(RequestError(500, "internal error", kind="server_error"))

    if jobs is not None:
        app.include_router(jobs_routes.router)
    app.include_router(openai.router)
    app.include_router(dashboard.router)
    if access.allowed_origins:  # the browser's preflight for those origins (added last: it runs first)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(access.allowed_origins),
            allow_headers=["*"],
            allow_methods=["GET", "POST", "DELETE"],
            max_age=600,
        )
    return app


async def _guarded(request: Request, call_next, access: Access, limits: Limits, jobs, redactor: Redactor):
    """Who may ask (`serve.security`), body size, no server path in an answer (`serve.redact`), and one
    log line per request (method, path, model, tokens, latency)."""
    started = time.perf_counter()
    request.state.model, request.state.tokens, request.state.streaming = "-", 0, False
    refused = access.refusal(request)
    response: Response
    if refused is not None:
        response = _error(refused)
    elif _content_length(request) > _body_limit(request, limits, jobs):
        response = _error(
            too_large(limits.max_body_bytes)
            if jobs is None or request.url.path != "/v1/files"
            else RequestError(
                413,
                f"the upload is over the server's limit of {jobs.max_upload_bytes >> 20:,} MB (--max-upload-mb)",
                param="file",
                code="file_too_large",
            )
        )
    else:
        response = await call_next(request)
        if _may_name_paths(request, response):
            response = await _redacted(response, redactor)
    response.headers["X-Content-Type-Options"] = "nosniff"  # JSON is never run as a script by a foreign page

    def log() -> None:
        print(
            f"{request.method} {request.url.path} {response.status_code} model={request.state.model} "
            f"tokens={request.state.tokens} {1000 * (time.perf_counter() - started):.0f} ms",
            file=sys.stderr,
            flush=True,
        )

    if request.state.streaming:  # its line is written when the stream ends, with the tokens it sent
        body = response.body_iterator  # type: ignore[attr-defined]  # call_next's answers all stream

        async def logged():
            try:
                async for chunk in body:
                    yield chunk
            finally:
                log()

        response.body_iterator = logged()  # type: ignore[attr-defined]
    else:
        log()
    return response


# --- requests -------------------------------------------------------------------------------------------


def _content_length(request: Request) -> int:
    try:
        return int(request.headers.get("content-length") or 0)
    except ValueError:
        return 0  # the HTTP server refuses a malformed length before we see it


def _may_name_paths(request: Request, response) -> bool:
    """Answers that could carry a path of this machine: errors, the dashboard's data and the jobs API's
    objects (never a model's text, which is the model's to write)."""
    if request.state.streaming or not response.headers.get("content-type", "").startswith("application/json"):
        return False
    path = request.url.path
    return response.status_code >= 400 or path.startswith(("/api/", "/v1/fine_tuning/", "/v1/files"))


async def _redacted(response, redactor: Redactor) -> Response:
    body = b"".join([chunk async for chunk in response.body_iterator])
    body = await asyncio.to_thread(redactor.json_bytes, body)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers)


def _public_names(store: ModelStore, jobs) -> dict[Path, str]:
    """What a client is shown for the folders of this server (see serve.redact)."""
    from tunelab.models.registry import tunelab_home

    names = {Path.home(): "~", tunelab_home(): "$TUNELAB_HOME"}
    if store.runs is not None:
        names[store.runs.resolve()] = "<runs>"
    for served in store.fixed.values():
        names[served.folder] = served.id
    if jobs is not None:
        names.update(jobs.public_names())
    return names


def _body_limit(request: Request, limits: Limits, jobs) -> int:
    """Uploads have their own bound (`--max-upload-mb`, counted as they stream in); every other body `limits`'."""
    if jobs is not None and request.method == "POST" and request.url.path == "/v1/files":
        return jobs.max_upload_bytes
    return limits.max_body_bytes
