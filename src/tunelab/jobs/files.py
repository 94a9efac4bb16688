"""Uploaded files: stored as `DATA/files/FILE_ID.EXT` (the id is random; the uploaded name is kept only
as metadata, and its extension only when it is one tunelab reads), bounded in size while they stream in.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from tunelab.ids import new_id, now
from tunelab.jobs.db import JobsDB
from tunelab.rundir import RunDir
from tunelab.train.logs import read_metrics

PURPOSES = ("fine-tune", "fine-tune-results", "batch", "assistants", "vision", "user_data", "evals")
UPLOADABLE = tuple(p for p in PURPOSES if p != "fine-tune-results")  # results are the server's to write
SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".csv", ".tsv", ".parquet")


def file_path(folder: Path, file: dict) -> Path:
    """Where the bytes of `file` are: never a path the client chose, only its id and a known extension."""
    name = file["filename"].lower()
    suffix = next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), ".jsonl")
    return folder / "files" / f"{file['id']}{suffix}"


def file_object(file_id: str, size: int, filename: str, purpose: str) -> dict:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": now(),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def clean_filename(name: str | None) -> str:
    """The uploaded name as metadata: its last path component, printable, at most 255 characters."""
    name = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())
    return name[:255] or "upload"


def add_result_file(db: JobsDB, folder: Path, job_id: str, run_dir: Path) -> str | None:
    """The job's results as OpenAI writes them (step, train_loss, train_accuracy, valid_loss,
    valid_mean_token_accuracy per step, CSV) stored as a `fine-tune-results` file; its id."""
    if not RunDir(run_dir).metrics.is_file():
        return None
    rows: dict[int, dict] = {}
    rewarded = False  # a reinforcement job's: its reward columns too
    for row in read_metrics(run_dir):
        out = rows.setdefault(row["step"], {"step": row["step"]})
        rewarded = rewarded or "reward" in row
        if row.get("split") == "train":
            out.update(train_loss=row["loss"], train_accuracy=row.get("accuracy"), train_reward_mean=row.get("reward"))
        elif row.get("split") == "eval":
            out.update(
                valid_loss=row.get("loss"),
                valid_mean_token_accuracy=row.get("accuracy"),
                valid_reward_mean=row.get("reward"),
            )
    text = io.StringIO()
    columns = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    columns += ["train_reward_mean", "valid_reward_mean"] if rewarded else []
    writer = csv.DictWriter(text, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    from tunelab.fs import atomic_write_text

    file = file_object(new_id("file"), len(text.getvalue().encode()), "step_metrics.csv", "fine-tune-results")
    atomic_write_text(file_path(folder, file), text.getvalue())
    db.add_file(file)
    return file["id"]
