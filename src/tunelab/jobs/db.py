"""Files, fine-tuning jobs, their events and checkpoints, in one SQLite database (WAL) under the server's
data directory: everything the API returns is kept as the OpenAI object it is returned as, beside the
few columns it is looked up by. One connection, one lock: the server's threads and the runner share it.

Lists are newest first by insertion order (`seq`), paged by the id of the last object of the previous
page (`after`), as OpenAI's cursor pages are.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    purpose TEXT NOT NULL, object TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL, object TEXT NOT NULL, private TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, key TEXT NOT NULL,
    object TEXT NOT NULL, UNIQUE (job_id, key));
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
    step INTEGER NOT NULL, object TEXT NOT NULL, UNIQUE (job_id, step));
"""

ACTIVE = ("validating_files", "queued", "running", "paused")  # a job in one of these still needs its files


class UnknownCursor(KeyError):
    """`after` names no object of the list."""


class JobsDB:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # a job's state survives a power cut, not only a kill
        self.conn.executescript(SCHEMA)
        self.lock = threading.Lock()

    def _all(self, sql: str, *args) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    def _run(self, sql: str, *args) -> int:
        with self.lock:
            return self.conn.execute(sql, args).rowcount

    def _page(
        self,
        table: str,
        where: str,
        args: tuple,
        after: str | None,
        limit: int,
        key: str = "id",
        newest_first: bool = True,
    ) -> tuple[list[dict], bool]:
        """One page of `table`'s objects matching `where`, after the object `after`; and whether more follow."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        if after is not None:
            found = self._all(f"SELECT seq FROM {table} WHERE {where} AND {key} = ?", *args, after)
            if not found:
                raise UnknownCursor(after)
            where, args = f"{where} AND seq {compare} ?", (*args, found[0][0])
        rows = self._all(f"SELECT object FROM {table} WHERE {where} ORDER BY seq {order} LIMIT ?", *args, limit + 1)
        return [json.loads(r[0]) for r in rows[:limit]], len(rows) > limit

    # --- files ------------------------------------------------------------------------------------------

    def add_file(self, file: dict) -> None:
        self._run(
            "INSERT INTO files (id, purpose, object) VALUES (?, ?, ?)", file["id"], file["purpose"], json.dumps(file)
        )

    def file(self, file_id: str) -> dict | None:
        rows = self._all("SELECT object FROM files WHERE id = ?", file_id)
        return json.loads(rows[0][0]) if rows else None

    def files(self, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> tuple[list[dict], bool]:
        where, args = ("purpose = ?", (purpose,)) if purpose else ("1", ())
        return self._page("files", where, args, after, limit, newest_first=newest_first)

    def delete_file(self, file_id: str) -> bool:
        return self._run("DELETE FROM files WHERE id = ?", file_id) > 0

    def jobs_using(self, file_id: str) -> list[dict]:
        """The jobs not yet finished that train or validate on `file_id`."""
        marks = ",".join("?" * len(ACTIVE))
        rows = self._all(f"SELECT object FROM jobs WHERE status IN ({marks})", *ACTIVE)
        jobs = [json.loads(r[0]) for r in rows]
        return [j for j in jobs if file_id in (j["training_file"], j.get("validation_file"))]

    # --- jobs -------------------------------------------------------------------------------------------

    def add_job(self, job: dict, private: dict) -> None:
        self._run(
            "INSERT INTO jobs (id, status, object, private) VALUES (?, ?, ?, ?)",
            job["id"],
            job["status"],
            json.dumps(job),
            json.dumps(private),
        )

    def job(self, job_id: str) -> dict | None:
        rows = self._all("SELECT object FROM jobs WHERE id = ?", job_id)
        return json.loads(rows[0][0]) if rows else None

    def known(self, job_id: str) -> dict:
        """A job that is there (the runner's own: jobs are never deleted), as `job()` reads it."""
        job = self.job(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        return job

    def private(self, job_id: str) -> dict:
        """What the runner keeps about a job beside its OpenAI object (its run directory, whether to resume)."""
        return json.loads(self._all("SELECT private FROM jobs WHERE id = ?", job_id)[0][0])

    def update_job(self, job_id: str, private: dict | None = None, **changes) -> dict:
        """Apply `changes` to the job's object (and replace its private part); returns the object."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                job = json.loads(self.conn.execute("SELECT object FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
                job.update(changes)
                self.conn.execute(
                    "UPDATE jobs SET status = ?, object = ? WHERE id = ?", (job["status"], json.dumps(job), job_id)
                )
                if private is not None:
                    self.conn.execute("UPDATE jobs SET private = ? WHERE id = ?", (json.dumps(private), job_id))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return job

    def jobs(self, after: str | None, limit: int, metadata: dict | None = None) -> tuple[list[dict], bool]:
        if not metadata:
            return self._page("jobs", "1", (), after, limit)
        rows = [j for j in self.all_jobs() if all((j.get("metadata") or {}).get(k) == v for k, v in metadata.items())]
        if after is not None:
            ids = [j["id"] for j in rows]
            if after not in ids:
                raise UnknownCursor(after)
            rows = rows[ids.index(after) + 1 :]
        return rows[:limit], len(rows) > limit

    def all_jobs(self, *statuses: str) -> list[dict]:
        """Every job (or those in `statuses`), newest first."""
        if statuses:
            marks = ",".join("?" * len(statuses))
            rows = self._all(f"SELECT object FROM jobs WHERE status IN ({marks}) ORDER BY seq DESC", *statuses)
        else:
            rows = self._all("SELECT object FROM jobs ORDER BY seq DESC")
        return [json.loads(r[0]) for r in rows]

    # --- events and checkpoints ----------------------------------------------------------------------------

    def add_event(self, job_id: str, key: str, event: dict) -> bool:
        """Record `event` once per `key` (a metrics line read again after a restart is not a new event)."""
        return (
            self._run(
                "INSERT OR IGNORE INTO events (job_id, key, object) VALUES (?, ?, ?)", job_id, key, json.dumps(event)
            )
            > 0
        )

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page("events", "job_id = ?", (job_id,), after, limit, key="json_extract(object, '$.id')")

    def add_checkpoint(self, job_id: str, step: int, checkpoint: dict) -> bool:
        return (
            self._run(
                "INSERT OR IGNORE INTO checkpoints (job_id, step, object) VALUES (?, ?, ?)",
                job_id,
                step,
                json.dumps(checkpoint),
            )
            > 0
        )

    def checkpoint_steps(self, job_id: str) -> set[int]:
        return {r[0] for r in self._all("SELECT step FROM checkpoints WHERE job_id = ?", job_id)}

    def delete_checkpoint(self, job_id: str, step: int) -> None:
        self._run("DELETE FROM checkpoints WHERE job_id = ? AND step = ?", job_id, step)

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page("checkpoints", "job_id = ?", (job_id,), after, limit, key="json_extract(object, '$.id')")
