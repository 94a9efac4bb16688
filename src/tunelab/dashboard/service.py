"""What the dashboard's routes (serve/routes/dashboard.py) answer, over a runs directory and the server's
fine-tuning jobs: runs by name, their rows and pages, comparisons' reports.

A run is known by its path relative to the runs directory, a job's run by the job's id. The folders are
scanned at most every 5 seconds (the page polls every few), or at once for a name not seen yet.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.dashboard.runs import evaluations, find_reports, run_detail, run_row
from tunelab.errors import RequestError
from tunelab.fs import Rescanned
from tunelab.rundir import RunDir, find_runs

REPORT_FILES = ("report.html", "report.md", "results.json")


class Dashboard:
    def __init__(self, runs_root: Path | None, jobs=None):
        self.runs_root, self.jobs = runs_root, jobs  # jobs: a jobs.service.Jobs, or None
        self.runs = Rescanned(self._scan, 5.0)
        self.reports = Rescanned(lambda: find_reports(runs_root), 5.0)

    def _scan(self) -> dict[str, Path]:
        found = {name: run.path for name, run in find_runs(self.runs_root).items()}
        if self.jobs is not None:  # a fine-tuning job's run, by the job's id (one not started: where it will be)
            for job in self.jobs.db.all_jobs():
                found[job["id"]] = self.jobs.run_dir(job["id"]).path
        return found

    def lookup(self, name: str) -> Path:
        run = self.runs.get(name)
        if run is None:
            raise RequestError(404, f"no run named {name!r} here (GET /api/runs lists them)", param="name")
        return run

    def job_of(self, name: str) -> dict | None:
        return self.jobs.db.job(name) if self.jobs is not None and name.startswith("ftjob-") else None

    def row(self, name: str, run: Path) -> dict:
        out = run_row(name, run)
        job = self.job_of(name)
        if job is not None:  # the job knows better: queued, paused, cancelled, ...; and before its run starts
            from tunelab.methods import JOB_METHODS

            out.update(status=job["status"], job=job)
            out["model"] = out["model"] or job["model"]
            out["method"] = out["method"] or JOB_METHODS[job["method"]["type"]]
            out["started_at"] = out["started_at"] or job["created_at"]
        return out

    def status_of(self, name: str, run: Path) -> str:
        job = self.job_of(name)
        return job["status"] if job is not None else RunDir(run).status()

    def listing(self) -> dict:
        """Every run's row, and the comparisons' reports."""
        return {
            "runs": [self.row(n, r) for n, r in self.runs.all().items()],
            "reports": [
                {"name": name, "files": [f for f in REPORT_FILES if (folder / f).is_file()]}
                for name, folder in self.reports.all().items()
            ],
        }

    def report_file(self, name: str, file: str) -> Path:
        folder = self.reports.get(name)
        if folder is None or file not in REPORT_FILES or not (folder / file).is_file():
            raise RequestError(404, f"no comparison {name!r} with a {file}", param="name")
        return folder / file

    def detail(self, name: str) -> dict:
        """A run's page: its detail, the comparison it was trained for (with that comparison's evaluations of
        it), and a job's status and events."""
        run = self.lookup(name)
        detail = run_detail(name, run)
        reports = self.reports.all()
        detail["report"] = next((n for n, folder in reports.items() if folder in run.parents), None)
        if detail["report"] is not None:
            detail["evaluations"] += evaluations(run, reports[detail["report"]] / "results" / run.name)
        job = self.job_of(name)
        if job is not None:
            detail.update(status=job["status"], job=job, events=self.jobs.db.events(name, None, 50)[0])
        return detail
