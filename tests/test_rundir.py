"""The run directory's one owner (tunelab.rundir.RunDir): how a run is named, what a finished run is,
when it started, and its failure record, the same for the server, the dashboard and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import time

from conftest import run_cli
from helpers import write_run
from tiny_models import tiny_llama_dir

from tunelab.dashboard.runs import run_row
from tunelab.dashboard.service import Dashboard
from tunelab.rundir import RunDir, find_runs
from tunelab.serve.store import ModelStore


def test_runs_are_named_by_their_path_below_the_runs_folder_everywhere(tmp_path):
    tiny_llama_dir(tmp_path / "llama")
    runs = tmp_path / "runs"
    for arm in ("compare-a/runs/instruct", "compare-b/runs/instruct", "solo"):
        run = write_run(runs / arm, "sft", "llama", 1e-3, [2.0])
        shutil.copytree(tmp_path / "llama", run / "final")
    write_run(runs / "unfinished", "sft", "llama", 1e-3, [2.0])
    (runs / ".hidden" / "x").mkdir(parents=True)
    (runs / ".hidden" / "x" / "config.yaml").write_text("method: sft\n")
    names = ["compare-a/runs/instruct", "compare-b/runs/instruct", "solo", "unfinished"]
    assert list(find_runs(runs)) == names and list(Dashboard(runs).runs.all()) == names
    served = ModelStore([], runs).served()  # the two instruct runs are two models, not the first found
    assert sorted(served) == ["compare-a/runs/instruct", "compare-b/runs/instruct", "solo"]
    assert served["compare-b/runs/instruct"].folder == runs / "compare-b/runs/instruct/final"


def test_a_run_keeps_its_own_start_time_when_copied(tmp_path):
    run = RunDir(write_run(tmp_path / "a", "sft", "llama", 1e-3, [2.0]))
    run.record_start()
    started = run.started_at()
    assert abs(started - time.time()) < 5
    time.sleep(0.05)
    copy = RunDir(shutil.copytree(run.path, tmp_path / "copy"))
    os.utime(copy.config, (time.time() + 3600, time.time() + 3600))  # a copy's files have the copy's times
    assert copy.started_at() == started and run_row("copy", copy.path)["started_at"] == started
    old = RunDir(write_run(tmp_path / "old", "sft", "llama", 1e-3, [2.0]))  # from before the record
    assert old.started_at() == old.config.stat().st_mtime


def test_a_failed_training_leaves_its_reason_where_every_reader_finds_it(tmp_path, monkeypatch):
    from tunelab.errors import UserError
    from tunelab.train.loop import Loop

    tiny_llama_dir(tmp_path / "llama")
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}) + "\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"method: sft\nmodel: {tmp_path / 'llama'}\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}}}\ntrain: {{max_steps: 1, precision: fp32}}\n"
    )

    def broken(self, resume=False):
        raise UserError("the disk is full")

    monkeypatch.setattr(Loop, "run", broken)  # fails after the run has started (its config.yaml is written)
    code, _, err = run_cli("train", str(config))
    run = RunDir(tmp_path / "run")
    assert code != 0 and "the disk is full" in err
    assert run.failure()["error"] == "the disk is full" and run.status() == "failed"
    assert run_row("run", run.path)["status"] == "failed"
    monkeypatch.undo()
    code, _, err = run_cli("train", "--resume", str(run.path))  # the next attempt decides again
    assert code == 0, err
    assert run.failure() is None and run.status() == "finished"
