"""`tunelab compare`: one experiment trains the task and instruction arms of a tiny base model, evaluates
all three models in-task and held out, writes the report; a second call reuses everything; the report
renders from results.json alone; its verdict follows the numbers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, run_cli
from helpers import children, running, wait_until
from tiny_models import tiny_llama_dir

from tunelab.errors import UserError
from tunelab.experiments.compare import load_experiment, render_markdown, report_blocks, verdict

PAIRS = [("what is the capital of france", "paris"), ("and of spain", "madrid"), ("germany", "berlin")]
ALPACA = [
    {"instruction": "Say hello.", "input": "", "output": "hello"},
    {"instruction": "Repeat the word.", "input": "blue", "output": "blue"},
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    tiny_llama_dir(root / "base", chat=False)
    (root / "pairs.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS * 4))
    (root / "test.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS))
    (root / "alpaca.json").write_text(json.dumps(ALPACA * 6))
    config = root / "experiment.yaml"
    config.write_text(f"""# tunelab compare experiment.yaml
model: {root / "base"}
output_dir: {root / "out"}
task:
  method: task
  data: {{train: {root / "pairs.jsonl"}, max_length: 48, prompt: "Answer: {{source}}"}}
  train: {{epochs: 20, batch_size: 4, lr: 5.0e-3, log_every: 5}}
  generation: {{max_new_tokens: 6}}
instruct:
  method: sft
  data: {{train: {root / "alpaca.json"}, max_length: 64}}
  train: {{epochs: 2, batch_size: 4, lr: 5.0e-3, log_every: 2}}
mix: {{train: {{epochs: 20}}}}
variants:
  noisy: {{train: {{neftune_alpha: 5.0}}}}
test: {{data: {root / "test.jsonl"}}}
suites:
  - {{path: {DATA / "eval" / "super-natural-instructions" / "tasks"}, max_instances: 1}}
max_new_tokens: 4
""")
    return config


def test_compare_trains_evaluates_and_reports_then_reuses(experiment, tunelab_home):
    out = experiment.parent / "out"
    code, stdout, err = run_cli("compare", str(experiment))
    assert code == 0, err
    assert (out / "runs" / "task" / "final").is_dir() and (out / "runs" / "instruct" / "final").is_dir()
    results = json.loads((out / "results.json").read_text())
    task_score = results["arms"]["task"]["in_task"]["metrics"]["rougeL"]
    assert task_score == 100.0 and results["arms"]["base"]["in_task"]["metrics"]["rougeL"] < task_score
    for arm in ("base", "task", "instruct"):
        suite = results["arms"][arm]["suites"][0]
        assert suite["scores"]["overall"]["instances"] == 22 and suite["format"] == "sni"
    assert results["arms"]["base"]["suites"][0]["prompt"] == "raw"  # no chat template: the raw SNI text
    assert results["arms"]["instruct"]["suites"][0]["prompt"] == "chat template"  # the Alpaca layout it learnt
    assert results["data"]["task"]["examples"] == 12 and results["data"]["instruct"]["examples"] == 12
    # arm (d): the instruct arm's 12 rows and the task's 12 pairs, the pairs asked as the task asks them
    assert results["data"]["mix"] == {
        "train": str(experiment.parent / "alpaca.json"),
        "examples": 24,
        "mixed_in": [str(experiment.parent / "pairs.jsonl")],
    }
    assert (
        results["arms"]["mix"]["in_task"]["metrics"]["rougeL"] > results["arms"]["base"]["in_task"]["metrics"]["rougeL"]
    )
    # paired differences with intervals, in-task and per suite, for every pair of arms
    assert set(results["differences"]) == {"in-task", "tasks"}
    pairs = {(d["a"], d["b"]): d for d in results["differences"]["tasks"]}
    assert set(pairs) == {
        ("instruct", "base"),
        ("task", "base"),
        ("task", "instruct"),
        ("mix", "base"),
        ("mix", "task"),
        ("mix", "instruct"),
    }
    for d in pairs.values():
        assert d["instances"] == 22 and d["low"] <= d["difference"] <= d["high"]
    task_vs_base = next(d for d in results["differences"]["in-task"] if (d["a"], d["b"]) == ("task", "base"))
    assert task_vs_base["difference"] > 0
    assert task_vs_base["significant"] == (
        task_vs_base["low"] > 0 or task_vs_base["high"] < 0
    )  # 0 outside the interval
    # the lever: a variant of the instruct arm (NEFTune noise), trained and scored on the suites
    variant = results["variants"]["noisy"]
    assert (
        variant["changes"] == {"train": {"neftune_alpha": 5.0}}
        and variant["suites"][0]["scores"]["overall"]["instances"] == 22
    )
    assert set(variant["differences"][0]) == {"base", "instruct"}
    noisy_config = (out / "configs" / "variant-noisy.yaml").read_text()
    assert "neftune_alpha: 5.0" in noisy_config and (out / "runs" / "variant-noisy" / "final").is_dir()
    report = (out / "report.md").read_text()
    assert "| Base model | Task fine-tuning | Instruction-tuning | Instruction + task mix |" in report
    assert "paired-bootstrap interval" in report and "| tasks | Instruction-tuning − Base model | rougeL |" in report
    assert "## Levers" in report and "| noisy | train.neftune_alpha=5.0 |" in report
    assert "One model for many tasks" in report
    assert "**In-task**: rougeL on test.jsonl (3 rows) |" in report and "100.00" in report
    assert "In-task, fine-tuning wins" in report
    # where the time and memory went: every training and evaluation, each measured on its own
    phases = json.loads((out / "phases.json").read_text())
    assert {"task: training", "mix: training", "variant-noisy: training", "base: in-task", "instruct: tasks"} <= set(
        phases
    )
    assert all(p["seconds"] > 0 and p["peak_memory_mb"] > 0 for p in phases.values()), phases
    assert results["phases"] == phases and "## Where the time and memory went" in report
    assert "| task: training |" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<img" in page and 'src="chart' not in page
    assert "Instruction + task mix" in page
    assert str(out / "report.md") in stdout

    stamp = (out / "runs" / "task" / "summary.json").stat().st_mtime_ns
    code, _, err = run_cli("compare", str(experiment))
    assert code == 0 and err.count("reusing the finished run") == 4 and "evaluating" not in err
    assert (out / "runs" / "task" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "phases.json").read_text()) == phases  # nothing redone, nothing measured again

    # the report needs results.json only: no runs, no models, no stored evaluations
    shutil.rmtree(out / "runs")
    shutil.rmtree(out / "results")
    (out / "report.md").unlink()
    code, _, err = run_cli("compare", str(experiment), "--report-only")
    assert code == 0, err
    assert (out / "report.md").read_text() == report


def test_a_changed_arm_config_is_not_silently_reused(experiment, tunelab_home, tmp_path):
    out = tmp_path / "out2"
    run_dir = out / "runs" / "task"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("method: task\nmodel: x\ndata: {train: a.jsonl}\n")
    code, _, err = run_cli("compare", str(experiment), f"output_dir={out}")
    assert code == 1 and "holds a task run of another config" in err


def test_experiment_mistakes_are_reported_with_their_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: m\noutput_dir: o\ntask:\n  method: task\n  data: {train: a.jsonl}\n  train: {lr: fast}\n"
        "instruct:\n  method: task\n  data: {train: b.json}\ntest: {data: t.jsonl}\nsuites: []\n"
    )
    with pytest.raises(UserError) as e:
        load_experiment(path)
    assert "bad.yaml:11: suites:" in str(e.value)
    path.write_text(path.read_text().replace("suites: []", "suites: [{path: s}]"))
    with pytest.raises(UserError) as e:
        load_experiment(path)
    assert "bad.yaml:6: task.train.lr: expected a number, got 'fast'" in str(e.value)
    path.write_text(path.read_text().replace("lr: fast", "lr: 1.0e-4"))
    with pytest.raises(UserError, match="bad.yaml:8: instruct.method: the instruct arm is a method: sft run"):
        load_experiment(path)


def _results(task: float, instruct: float, held: dict[str, float], goal: float | None = None) -> dict:
    def arm(score, rouge):
        overall = {"rougeL": rouge, "exact_match": 0.0, "instances": 10}
        return {
            "summary": {"trainable_parameters": 1000, "wall_seconds": 60.0},
            "in_task": {"metrics": {"rougeL": score}, "examples": 5},
            "suites": [
                {
                    "name": "tasks",
                    "tasks": 2,
                    "scores": {"overall": overall, "per_task": {"t1": overall}, "per_category": {"c": overall}},
                }
            ],
        }

    return {
        "experiment": "e.yaml",
        "model": "m",
        "test": {"data": "test.jsonl", "metric": "rougeL"},
        "held_out_goal": goal,
        "data": {"task": {"train": "a.jsonl", "examples": 5}, "instruct": {"train": "b.json", "examples": 9}},
        "arms": {
            "base": arm(10.0, held["base"]),
            "task": arm(task, held["task"]),
            "instruct": arm(instruct, held["instruct"]),
        },
    }


def test_the_verdict_says_when_the_numbers_contradict_the_claims(tmp_path):
    agrees = verdict(_results(40.0, 30.0, {"base": 10.0, "task": 12.0, "instruct": 20.0}, goal=5.0))
    assert agrees[0].startswith("In-task, fine-tuning wins") and "generalises, as claimed" in agrees[1]
    assert "+10.00, goal +5" in agrees[1]
    contradicts = verdict(_results(20.0, 30.0, {"base": 10.0, "task": 12.0, "instruct": 13.0}, goal=5.0))
    assert "fine-tuning is best on its task does not hold" in contradicts[0]
    assert "not borne out" in contradicts[1] and "+3.00, goal +5" in contradicts[1]
    no_goal = verdict(_results(40.0, 30.0, {"base": 10.0, "task": 12.0, "instruct": 13.0}))
    assert (
        "generalises, as claimed" in no_goal[1] and "goal" not in no_goal[1]
    )  # without a goal, any gain over the base
    assert "seed" not in " ".join(agrees + contradicts + no_goal)
    markdown = render_markdown(
        report_blocks(_results(40.0, 30.0, {"base": 10.0, "task": 12.0, "instruct": 20.0}), tmp_path)
    )
    assert "| **Held-out**: ROUGE-L on tasks (2 tasks, 10 instances) | 10.00 | 12.00 | 20.00 |" in markdown
    assert "| Trainable parameters | 0 | 1,000 | 1,000 |" in markdown


def test_an_arm_whose_training_fails_is_named_in_one_line(experiment, tunelab_home, tmp_path, capfd):
    """Each arm trains in a process of its own: its error comes out as `tunelab train` says it (one line,
    no traceback), and the experiment stops naming the arm, with exit code 1."""
    broken = tmp_path / "alpaca.json"
    broken.write_text('[{"instruction": "Say hello.", "output": "hello"}, {"instruction": 3}]')
    code, _, err = run_cli(
        "compare", str(experiment), f"output_dir={tmp_path / 'out'}", f"instruct.data.train={broken}"
    )
    child = capfd.readouterr().err
    assert code == 1 and "instruct: its training stopped" in err, err
    assert "alpaca.json" in child and "Traceback" not in child + err
    assert (tmp_path / "out" / "runs" / "task" / "final").is_dir()  # the arm before it trained and is kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the child dies with its parent on Linux")
def test_a_killed_experiment_leaves_no_training_behind(experiment, tunelab_home, tmp_path):
    """kill -9 `tunelab compare` while an arm trains in its own process: the training dies with it."""
    command = [sys.executable, "-m", "tunelab", "compare", str(experiment), f"output_dir={tmp_path / 'out'}"]
    compare, trainers = subprocess.Popen([*command, "task.train.epochs=2000"], stderr=subprocess.DEVNULL), []
    try:
        wait_until(lambda: (tmp_path / "out" / "runs" / "task" / "config.yaml").is_file(), what="the task arm's run")
        trainers = [pid for pid in children(compare.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert trainers and all(running(pid) for pid in trainers)
    finally:
        os.kill(compare.pid, signal.SIGKILL)
        compare.wait()
    deadline = time.time() + 30
    while any(running(pid) for pid in trainers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(running(pid) for pid in trainers), "the training outlived its experiment"
