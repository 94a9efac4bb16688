"""The dashboard's routes: the page at `/`, its static files, and the small JSON endpoints it reads (the
same for scripts; tunelab.dashboard.service answers them):

    GET /api/runs                          every run: name, method, model, status, step, best metric, ...
    GET /api/runs/{name}                   one run: its row, config, summary, checkpoints, evaluation, files
    GET /api/runs/{name}/metrics?offset=N  its metrics rows after byte N, and the next offset (polled)
    GET /api/runs/{name}/files/{file}      loss_curve.png, confusion_matrix.png, report.html, ...
    GET /api/compare?run=A&run=B           the rows of several runs and their differing config keys
    GET /api/models                        the served models: which the playground talks to, which a job trains
    GET /api/runs/{name}/exports           a finished run's downloads (adapter, merged, gguf): made yet, progress
    POST /api/runs/{name}/exports/{kind}   make one (on the server, one at a time: dashboard/exports.py)
    GET /api/runs/{name}/exports/{kind}/{part}   download it (part: file, or the GGUF's modelfile)

They read, but for the exports, which write only in the run's exports/ folder. With an API key set they
need it as every /v1/ route does (the page asks for it once and sends it; serve/security.py), and no
answer names a path of the server's machine (serve/redact.py). A run name is looked up among the runs
found, never joined to a path.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from tunelab.dashboard.runs import FILES, MEDIA, differing_keys, read_config
from tunelab.dashboard.service import Dashboard
from tunelab.errors import RequestError
from tunelab.serve.http import openai_errors
from tunelab.train.logs import read_metrics_after

METRICS_READ = 1 << 20  # bytes of metrics.jsonl one request reads at most: a large file comes in pieces
STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uPlot.min.css": "text/css; charset=utf-8",
}

router = APIRouter()


def dashboard(request: Request) -> Dashboard:
    return request.app.state.dashboard


@router.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(_static("index.html"))


@router.get("/favicon.ico")
async def favicon():
    return Response(status_code=204)


@router.get("/static/{name:path}")
async def static(name: str):
    if name not in STATIC:
        return Response("not found", status_code=404)
    return Response(_static(name), media_type=STATIC[name], headers={"Cache-Control": "max-age=3600"})


@router.get("/api/runs")
async def list_runs(request: Request):
    return await asyncio.to_thread(dashboard(request).listing)


@router.get("/api/reports/{name:path}/{file}")
@openai_errors
async def report_file(request: Request, name: str, file: str):
    path = await asyncio.to_thread(dashboard(request).report_file, name, file)
    return FileResponse(path, media_type=MEDIA[path.suffix])


@router.get("/api/runs/{name:path}/metrics")
@openai_errors
async def metrics(request: Request, name: str, offset: int = 0):
    board = dashboard(request)
    run = await asyncio.to_thread(board.lookup, name)
    rows, offset = await asyncio.to_thread(read_metrics_after, run, max(offset, 0), METRICS_READ)
    return {"rows": rows, "offset": offset, "status": board.status_of(name, run)}


@router.get("/api/runs/{name:path}/files/{file}")
@openai_errors
async def run_file(request: Request, name: str, file: str):
    run = await asyncio.to_thread(dashboard(request).lookup, name)
    if file not in FILES or not (run / file).is_file():
        raise RequestError(404, f"{name} has no {file}", param="file")
    return FileResponse(run / file, media_type=MEDIA[Path(file).suffix])


@router.get("/api/runs/{name:path}/exports")
@openai_errors
async def exports(request: Request, name: str):
    run = await asyncio.to_thread(dashboard(request).lookup, name)
    return {"exports": await asyncio.to_thread(request.app.state.exports.listing, run)}


@router.post("/api/runs/{name:path}/exports/{kind}")
@openai_errors
async def start_export(request: Request, name: str, kind: str):
    run = await asyncio.to_thread(dashboard(request).lookup, name)
    return JSONResponse(await asyncio.to_thread(request.app.state.exports.start, run, kind), status_code=202)


@router.get("/api/runs/{name:path}/exports/{kind}/{part}")
@openai_errors
async def download_export(request: Request, name: str, kind: str, part: str):
    run = await asyncio.to_thread(dashboard(request).lookup, name)
    path = await asyncio.to_thread(request.app.state.exports.file, run, kind, part)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.get("/api/runs/{name:path}")
@openai_errors
async def one_run(request: Request, name: str):
    return await asyncio.to_thread(dashboard(request).detail, name)


@router.get("/api/compare")
@openai_errors
async def compare(request: Request, run: list[str] = Query(default=[])):  # noqa: B008 (FastAPI's way)
    if len(run) < 2:
        raise RequestError(400, "compare: name two runs or more (?run=A&run=B)", param="run")
    board = dashboard(request)
    found = {name: await asyncio.to_thread(board.lookup, name) for name in run}
    configs = {name: read_config(path) for name, path in found.items()}
    return {"runs": [board.row(name, path) for name, path in found.items()], "differing": differing_keys(configs)}


@router.get("/api/models")
async def models(request: Request):
    """The served models (`generates`: the playground can talk to it; `trainable`: a fine-tuning job may start
    from it), and whether this server keeps fine-tuning jobs at all."""
    served = await asyncio.to_thread(request.app.state.serving.store.served)
    jobs = request.app.state.jobs
    return {
        "jobs": jobs is not None,
        "models": [
            {"id": s.id, "generates": s.generates, "trainable": jobs is not None and jobs.base_of(s.id) is not None}
            for s in served.values()
        ],
    }


def _static(name: str) -> bytes:
    return resources.files("tunelab.dashboard").joinpath("static", name).read_bytes()
