"""The dashboard's routes on `tunelab serve`: the page at `/`, its static files, and the small JSON endpoints
it reads (the same for scripts):

    GET /api/runs                          every run: name, method, model, status, step, best metric, ...
    GET /api/runs/{name}                   one run: its row, config, summary, checkpoints, evaluation, files
    GET /api/runs/{name}/metrics?offset=N  its metrics rows after byte N, and the next offset (polled)
    GET /api/runs/{name}/files/{file}      loss_curve.png, confusion_matrix.png, report.html, ...
    GET /api/compare?run=A&run=B           the rows of several runs and their differing config keys
    GET /api/models                        the models the playground can talk to (as GET /v1/models)

They read; nothing here writes. With an API key set they need it as every /v1/ route does (the page asks
for it once and sends it; serve/security.py), and no answer names a path of the server's machine
(serve/redact.py). A run name is looked up among the runs found, never joined to a path.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, Response

from tunelab.dashboard.runs import (FILES, MEDIA, differing_keys, evaluations, find_reports, find_runs, read_config,
                                   run_detail, run_row, status)
from tunelab.serve.engine import ServeError
from tunelab.serve.http import openai_errors
from tunelab.serve.store import Rescanned
from tunelab.train.logs import read_metrics_after

METRICS_READ = 1 << 20  # bytes of metrics.jsonl one request reads at most: a large file comes in pieces

REPORT_FILES = ("report.html", "report.md", "results.json")
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8", "vendor/uPlot.min.css": "text/css; charset=utf-8"}


def add_routes(app: FastAPI, runs_root: Path | None, jobs=None, store=None) -> None:
    def scan() -> dict[str, Path]:
        found = find_runs(runs_root)
        if jobs is not None:  # a fine-tuning job's run, by the job's id
            for job in jobs.db.all_jobs():
                run = jobs.folder / "jobs" / job["id"] / "run"
                if (run / "config.yaml").is_file():
                    found[job["id"]] = run
        return found

    # the page polls every few seconds and a runs directory can be large: scanned every 5 s, or for a new name
    index, reports_index = Rescanned(scan, 5.0), Rescanned(lambda: find_reports(runs_root), 5.0)
    runs = index.all

    def job_of(name: str) -> dict | None:
        return jobs.db.job(name) if jobs is not None and name.startswith("ftjob-") else None

    def row(name: str, run: Path) -> dict:
        out = run_row(name, run)
        job = job_of(name)
        if job is not None:  # the job knows better: queued, paused, cancelled, ...
            out.update(status=job["status"], job=job)
        return out

    def status_of(name: str, run: Path) -> str:
        job = job_of(name)
        return job["status"] if job is not None else status(run)

    def lookup(name: str) -> Path:
        run = index.get(name)
        if run is None:
            raise ServeError(404, f"no run named {name!r} here (GET /api/runs lists them)", param="name")
        return run

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_static("index.html"))

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/static/{name:path}")
    async def static(name: str):
        if name not in STATIC:
            return Response("not found", status_code=404)
        return Response(_static(name), media_type=STATIC[name], headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/runs")
    async def list_runs():
        found = await asyncio.to_thread(runs)
        reports = await asyncio.to_thread(reports_index.all)
        return {"runs": await asyncio.to_thread(lambda: [row(n, r) for n, r in found.items()]),
                "reports": [{"name": name, "files": [f for f in REPORT_FILES if (folder / f).is_file()]}
                            for name, folder in reports.items()]}

    @app.get("/api/reports/{name:path}/{file}")
    @openai_errors
    async def report_file(name: str, file: str):
        folder = await asyncio.to_thread(reports_index.get, name)
        if folder is None or file not in REPORT_FILES or not (folder / file).is_file():
            raise ServeError(404, f"no comparison {name!r} with a {file}", param="name")
        return FileResponse(folder / file, media_type=MEDIA[Path(file).suffix])

    @app.get("/api/runs/{name:path}/metrics")
    @openai_errors
    async def metrics(name: str, offset: int = 0):
        run = await asyncio.to_thread(lookup, name)
        rows, offset = await asyncio.to_thread(read_metrics_after, run, max(offset, 0), METRICS_READ)
        return {"rows": rows, "offset": offset, "status": status_of(name, run)}

    @app.get("/api/runs/{name:path}/files/{file}")
    @openai_errors
    async def run_file(name: str, file: str):
        run = await asyncio.to_thread(lookup, name)
        if file not in FILES or not (run / file).is_file():
            raise ServeError(404, f"{name} has no {file}", param="file")
        return FileResponse(run / file, media_type=MEDIA[Path(file).suffix])

    @app.get("/api/runs/{name:path}")
    @openai_errors
    async def one_run(name: str):
        run = await asyncio.to_thread(lookup, name)
        detail = await asyncio.to_thread(run_detail, name, run)
        reports = await asyncio.to_thread(reports_index.all)  # the comparison this run was trained for, if any
        detail["report"] = next((n for n, folder in reports.items() if folder in run.parents), None)
        if detail["report"] is not None:  # the comparison's evaluations of this arm
            arm = reports[detail["report"]] / "results" / run.name
            detail["evaluations"] += await asyncio.to_thread(evaluations, run, arm)
        job = job_of(name)
        if job is not None:
            detail.update(status=job["status"], job=job,
                          events=jobs.db.events(name, None, 50)[0])
        return detail

    @app.get("/api/compare")
    @openai_errors
    async def compare(run: list[str] = Query(default=[])):
        if len(run) < 2:
            raise ServeError(400, "compare: name two runs or more (?run=A&run=B)", param="run")
        found = {name: await asyncio.to_thread(lookup, name) for name in run}
        configs = {name: read_config(path) for name, path in found.items()}
        return {"runs": [row(name, path) for name, path in found.items()], "differing": differing_keys(configs)}

    @app.get("/api/models")
    async def models():
        served = await asyncio.to_thread(store.served) if store is not None else {}
        return {"models": [{"id": s.id, "generates": s.generates} for s in served.values()]}


def _static(name: str) -> bytes:
    return resources.files("tunelab.dashboard").joinpath("static", name).read_bytes()
