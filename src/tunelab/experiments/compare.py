"""`tunelab compare EXPERIMENT.yaml`: fine-tuning against instruction-tuning, measured on the same data.

    tunelab compare configs/compare-quick.yaml
    tunelab compare configs/compare-quick.yaml --report-only     # re-render the report from results.json

One experiment names a base model, a task (a `method: task` run config without its model, and a test
file), instruction data (a `method: sft` run config) and held-out instruction suites; optionally arm (d),
`mix:` (the instruct arm with the task's training rows mixed into its data: one model for many tasks),
and `variants:` (levers: the instruct arm with some keys changed, each scored on the suites). It trains
(or reuses) every arm, evaluates them and the untouched base model on the task's test rows and on every
suite, and writes into its `output_dir`:

    runs/ARM/                the training runs (a stopped one resumes; a finished one is reused)
    configs/ARM.yaml         their resolved configs, runnable on their own
    results/ARM/*.json       every evaluation, with its predictions (reused when its settings match)
    results.json             everything the report shows
    phases.json              each arm's training and each evaluation: its wall time and peak memory
    report.md, report.html   the table of measured numbers, the paired differences with their 95% bootstrap
                             intervals, the levers, charts and curves (HTML: self-contained)

The in-task test asks every model the task's `data.prompt` through its own template (the base model,
which has none, gets the Alpaca layout, as task fine-tuning trained it); the suites ask as
`tunelab eval --suite` does. Nothing is chosen on them: each run keeps its best checkpoint by a validation
split of its own training data. The verdict checks the two claims the experiment is about (fine-tuning is
best on its task; instruction-tuning generalises to instructions never seen) against the numbers, and says
where they do not hold; with `held_out_goal`, also whether the held-out gain reaches it.
"""

from __future__ import annotations

import base64
import gc
import html
import io
import json
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunelab import recipes
from tunelab.config import (
    RunConfig,
    Section,
    dump_config,
    load_config,
    read_yaml_with_overrides,
    save_config,
    validate_run,
    validate_schema,
)
from tunelab.errors import UserError, quiet_libraries, reported
from tunelab.eval.tool_calls import PER_TURN
from tunelab.fs import atomic_write_text
from tunelab.methods import GENERATION_METRICS
from tunelab.rundir import RunDir
from tunelab.train.logs import read_metrics

ARMS = ("base", "task", "instruct", "mix")  # the report's columns; mix (arm d) only when the experiment has it
LABELS = {
    "base": "Base model",
    "task": "Task fine-tuning",
    "instruct": "Instruction-tuning",
    "mix": "Instruction + task mix",
}
METHOD_OF = {"task": "task", "instruct": "sft"}
# the paired differences the report gives an interval for: (a, b) is a - b
PAIRS = (
    ("instruct", "base"),
    ("task", "base"),
    ("task", "instruct"),
    ("mix", "base"),
    ("mix", "task"),
    ("mix", "instruct"),
)


class SuiteSpec(Section):
    path: str = Field(description="a folder of SNI / NI v1 task files, one task file, or Self-Instruct .jsonl")
    max_instances: int | None = Field(None, gt=0, description="the first N instances of each task")
    shots: int = Field(0, ge=0, description="positive examples before each instance")


class TestSpec(Section):
    data: str = Field(description="the task's test file (its references score the in-task result)")
    max_examples: int | None = Field(None, gt=0, description="the first N test rows")
    metric: str = Field(
        "rougeL",
        description=f"the in-task score: {', '.join(GENERATION_METRICS)}; on tool-call rows, {' or '.join(PER_TURN)}",
    )


class ExperimentConfig(Section):
    model: str = Field(description="the base model every arm starts from")
    output_dir: str
    task: dict[str, Any] = Field(description="a method: task run config, without model and output_dir")
    instruct: dict[str, Any] = Field(description="a method: sft run config, without model and output_dir")
    test: TestSpec
    suites: list[SuiteSpec] = Field(min_length=1)
    mix: dict[str, Any] | None = Field(
        None,
        description="arm (d): the instruct arm with the task's training rows mixed into its data (data.mix); "
        "keys here override the instruct arm's ({} for none)",
    )
    variants: dict[str, dict[str, Any]] = Field(
        {},
        description="levers: name -> keys overriding the instruct arm's (null removes one); each trains and is "
        "scored on the suites",
    )
    max_new_tokens: int = Field(64, gt=0, description="tokens generated per held-out answer")
    batch_size: int = Field(32, gt=0, description="prompts generated for at once")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="the weights' precision while evaluating (auto: bf16 where the CPU has it); the same for every arm",
    )
    held_out_goal: float | None = Field(
        None,
        gt=0,
        description="ROUGE-L points by which instruction-tuning should beat the base model on each "
        "held-out suite; the verdict says whether it does (none: the verdict asks for a significant gain only)",
    )


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, dict[str, RunConfig]]:
    """The experiment and its training runs' resolved configs (task, instruct, mix when asked, and each
    variant as `variant:NAME`); every problem reported at once."""
    path = Path(path)
    raw, sources, problems = read_yaml_with_overrides(path, overrides)
    exp = validate_schema(ExperimentConfig, raw, sources, path, problems)
    if exp.test.metric not in (*GENERATION_METRICS, *PER_TURN):
        raise UserError(
            f"{sources.get('test.metric', path)}: test.metric: {exp.test.metric!r} is not one of "
            f"{', '.join(GENERATION_METRICS)}, nor (on tool-call rows) {', '.join(PER_TURN)}"
        )
    arm_raws = {arm: (getattr(exp, arm), f"{arm}.") for arm in METHOD_OF}
    if exp.mix is not None:
        if "mix" in (exp.mix.get("data") or {}):
            raise UserError(
                f"{sources.get('mix.data.mix', path)}: mix.data.mix: set by the experiment (the task "
                "arm's data.train, eval_split, max_examples and prompt)"
            )
        task_data = exp.task.get("data") or {}
        mixed = {
            "train": task_data.get("train"),
            "eval_split": task_data.get("eval_split"),
            "max_examples": task_data.get("max_examples"),
            "prompt": task_data.get("prompt"),
        }
        arm_raws["mix"] = (
            _merged(exp.instruct, {**exp.mix, "data": {**(exp.mix.get("data") or {}), "mix": [mixed]}}),
            "mix.",
        )
    for name, keys in exp.variants.items():
        if not name.replace("-", "").replace("_", "").isalnum():
            raise UserError(
                f"{sources.get(f'variants.{name}', path)}: variants.{name}: a variant's name is letters, "
                "digits, - and _ (it names its folders)"
            )
        arm_raws[f"variant:{name}"] = (_merged(exp.instruct, keys), f"variants.{name}.")
    runs = {}
    for arm, (arm_raw, prefix) in arm_raws.items():
        for key in ("model", "output_dir"):
            if key in arm_raw:
                raise UserError(
                    f"{sources.get(prefix + key, path)}: {prefix}{key}: set by the experiment "
                    f"(model: at the top; output_dir: {exp.output_dir}/runs/{_folder(arm)})"
                )
        run_raw = {**arm_raw, "model": exp.model, "output_dir": str(Path(exp.output_dir) / "runs" / _folder(arm))}
        cfg = validate_run(run_raw, sources, path, prefix=prefix).resolved()
        method = METHOD_OF.get(arm, "sft")
        if arm == "task" and exp.test.metric in PER_TURN:
            method = "sft"  # a tool-use task: conversations with tools, trained as chats
        if cfg.method != method:
            raise UserError(
                f"{sources.get(f'{prefix}method', path)}: {prefix}method: the {arm} arm is a method: {method} "
                f"run, not {cfg.method}"
            )
        runs[arm] = cfg
    return exp, runs


def _merged(base: dict, keys: dict) -> dict:
    """`base` with `keys` over it, section by section (a list or a value replaces what it meets; null
    removes the key, e.g. `tuning: {mode: full, lora: null}`)."""
    out = dict(base)
    for key, value in keys.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _folder(arm: str) -> str:
    """An arm's folder name: `variant:rows-5000` -> `variant-rows-5000`."""
    return arm.replace(":", "-")


# --- running the experiment ---------------------------------------------------------------------------


class Phases:
    """Where an experiment's time and memory went: each phase (an arm's training, one evaluation) with its wall
    time and peak memory (the RSS of the process it ran in: a training's own child process, the experiment's
    for an evaluation, measured afresh for each phase: `train.memory.reset_peak_memory`),
    kept in phases.json. A phase done over several calls (training that resumed) adds up its seconds and
    keeps its highest peak; one that was reused costs nothing and is not measured again."""

    def __init__(self, path: Path):
        self.path = path
        self.measured: dict[str, dict] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    @contextmanager
    def measure(self, name: str):
        from tunelab.train.memory import peak_memory_mb, release_freed_memory, reset_peak_memory

        # What the previous phase freed is handed back first: glibc kept it in the heap, and each phase then
        # started where the last one peaked (one SNI evaluation of Gemma-3-270M: 5.3 GB resident after it,
        # 1.0 GB after the trim). The evaluations' own peaks were the decoder's kept logits (infer/decode.py).
        gc.collect()
        release_freed_memory()
        reset_peak_memory()
        started = time.perf_counter()
        measured: dict[str, float] = {}  # "peak_memory_mb": a child process's, where the phase ran in one
        yield measured
        seconds, peak = time.perf_counter() - started, max(peak_memory_mb(), measured.get("peak_memory_mb", 0))
        before = self.measured.get(name, {})
        self.measured[name] = {
            "seconds": round(before.get("seconds", 0) + seconds, 2),
            "peak_memory_mb": round(max(before.get("peak_memory_mb", 0), peak)),
        }
        atomic_write_text(self.path, json.dumps(self.measured, indent=1) + "\n")


def run_experiment(path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Train what is missing, evaluate what is missing, write the report; returns the report's path."""
    exp, runs = load_experiment(path, overrides)
    out = Path(exp.output_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    phases = Phases(out / "phases.json")
    started = time.perf_counter()
    summaries = {}
    for arm, cfg in runs.items():
        save_config(cfg, out / "configs" / f"{_folder(arm)}.yaml")
    for arm, cfg in runs.items():
        if not arm.startswith("variant:"):  # the variants train after the arms' evaluations, one by one
            summaries[arm] = train_arm(arm, cfg, phases)
    arms = [a for a in ARMS if a == "base" or a in runs]
    results: dict[str, Any] = {
        "experiment": str(path),
        "model": exp.model,
        "test": exp.test.model_dump(),
        "precision": exp.precision,
        "held_out_goal": exp.held_out_goal,
        "arms": {arm: {"summary": summaries.get(arm)} for arm in arms},
    }
    for arm in arms:
        target = exp.model if arm == "base" else str(RunDir(out / "runs" / arm).final)
        results["arms"][arm]["in_task"] = eval_in_task(arm, target, exp, out, phases)
        results["arms"][arm]["suites"] = [eval_suite(arm, target, spec, exp, out, phases) for spec in exp.suites]
    results["differences"] = differences(results["arms"], exp.test.metric)
    results["curves"] = {arm: read_metrics(out / "runs" / _folder(arm)) for arm in runs if arm in arms}
    results["data"] = {
        arm: {
            "train": cfg.data.train,
            "examples": summaries[arm].get("train_examples"),
            "mixed_in": [m.train for m in cfg.data.mix],
        }
        for arm, cfg in runs.items()
        if arm in arms
    }
    results["variants"] = {}
    against = {b: [_instance_rows(s) for s in results["arms"][b]["suites"]] for b in ("base", "instruct")}

    def save() -> Path:
        results["seconds_this_call"] = round(time.perf_counter() - started, 1)
        results["phases"] = phases.measured
        atomic_write_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        return write_report(out)

    for name, keys in exp.variants.items():  # each variant joins the report as it finishes
        save()
        arm = f"variant:{name}"
        summaries[arm] = train_arm(arm, runs[arm], phases)
        target = str(RunDir(out / "runs" / _folder(arm)).final)
        suites = [eval_suite(_folder(arm), target, spec, exp, out, phases) for spec in exp.suites]
        results["variants"][name] = {
            "changes": keys,
            "summary": summaries[arm],
            "suites": suites,
            "differences": variant_differences(suites, against),
        }
    return save()


def _instance_rows(evaluation: dict) -> list[dict]:
    """The per-instance scores an evaluation stored: a suite's predictions, or the in-task rows' ROUGE
    (computed from their predictions file; corpus-level metrics such as BLEU have none)."""
    stored = json.loads(Path(evaluation["file"]).read_text(encoding="utf-8"))
    if "predictions" in stored:
        return stored["predictions"]
    from tunelab.eval.metrics import rouge_per_example
    from tunelab.eval.tool_calls import per_turn_rows

    lines = Path(evaluation["file"]).with_suffix(".predictions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    if stored.get("method") == "tools":
        return per_turn_rows(rows)
    scores = rouge_per_example([row["prediction"] for row in rows], [row["references"] for row in rows])
    return [{"id": str(i), **row_scores} for i, row_scores in enumerate(scores)]


def differences(arms: dict, metric: str) -> dict:
    """Paired-bootstrap differences between the arms (PAIRS), per suite by ROUGE-L and in-task by `metric`
    (when it is a ROUGE score, or a tool-call score of each call turn): {suite name or "in-task": [{a, b, difference, low, high, significant}]}."""
    from tunelab.eval.stats import paired_bootstrap, paired_scores

    present = [p for p in PAIRS if p[0] in arms and p[1] in arms]
    out: dict = {}
    where: list[tuple[str, dict[str, dict], str]] = []  # (what, each arm's evaluation of it, its metric)
    if metric.startswith("rouge") or metric in PER_TURN:
        where.append(("in-task", {arm: arms[arm]["in_task"] for arm in arms}, metric))
    where += [
        (suite["name"], {arm: arms[arm]["suites"][i] for arm in arms}, "rougeL")
        for i, suite in enumerate(arms["base"]["suites"])
    ]
    for name, evaluations, key in where:
        rows = {arm: _instance_rows(evaluations[arm]) for arm in {a for p in present for a in p}}
        out[name] = [
            {"a": a, "b": b, "metric": key, **paired_bootstrap(*paired_scores(rows[a], rows[b], key))}
            for a, b in present
        ]
    return out


def variant_differences(suites: list[dict], against: dict[str, list[list[dict]]]) -> list[dict]:
    """A variant's paired differences per suite (ROUGE-L) against each arm of `against` (arm -> its per-instance
    rows, suite by suite: the base model and the instruct arm)."""
    from tunelab.eval.stats import paired_bootstrap, paired_scores

    out = []
    for i, suite in enumerate(suites):
        rows = _instance_rows(suite)
        out.append(
            {b: paired_bootstrap(*paired_scores(rows, per_suite[i], "rougeL")) for b, per_suite in against.items()}
        )
    return out


def train_arm(arm: str, cfg: RunConfig, phases: Phases) -> dict:
    """Train one arm, resume it, or reuse its finished run; returns its summary.json (plus examples)."""
    assert cfg.output_dir is not None  # the arms' configs are resolved
    run = RunDir(cfg.output_dir)
    run_dir = run.path
    if run.is_run():
        saved = load_config(run.config).resolved()
        if dump_config(saved) != dump_config(cfg):
            raise UserError(
                f"{run_dir}: holds a {arm} run of another config; remove it (or set output_dir elsewhere) "
                "to train this one"
            )
        if run.summary_file.is_file() and run.is_finished():
            print(f"tunelab compare: {arm}: reusing the finished run in {run_dir}", file=sys.stderr)
            return _summary(run_dir)
        if not any(run.checkpoints.glob("*")):  # stopped before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
    resume = run_dir.is_dir()
    print(f"tunelab compare: {arm}: {'resuming' if resume else 'training'} {run_dir}", file=sys.stderr)
    with phases.measure(f"{_folder(arm)}: training") as measured:
        _train_apart(arm, cfg, resume)
        summary = _summary(run_dir)
        measured["peak_memory_mb"] = summary.get("peak_memory_mb", 0)
    return summary


def _train_apart(arm: str, cfg: RunConfig, resume: bool) -> None:
    """Train in a process of its own (spawned), so that the evaluations after it run in a process that
    never trained: in the one process, a training's heap (its activations, the allocator's and oneDNN's
    caches) stayed behind, and every evaluation after the trainings peaked at 8-9 GiB and ran slower
    (compare-gemma3 on machine C: the task arm's SNI evaluation 92 s and 8.2 GiB after the trainings, 54 s
    and 3.7 GiB in a process that had not trained)."""
    import multiprocessing
    import os

    process = multiprocessing.get_context("spawn").Process(target=_train_child, args=(cfg, resume, os.getpid()))
    process.start()
    try:
        process.join()
    except KeyboardInterrupt:  # the child had the same Ctrl-C: it stops (a resume starts from its last checkpoint)
        process.join()
        raise
    if process.exitcode:
        raise UserError(
            f"{arm}: its training stopped (exit code {process.exitcode}; its error is above); "
            "`tunelab compare` again resumes it"
        )


def _train_child(cfg: RunConfig, resume: bool, parent: int) -> None:
    """The training process: it dies with the experiment's (killed, the experiment leaves no training
    behind); errors as `tunelab train` reports them (one line, exit 1), never a traceback."""
    from tunelab.launch import die_with_parent

    die_with_parent(parent)
    quiet_libraries()

    def train() -> int:
        recipes.run(cfg, resume=resume)
        return 0

    sys.exit(reported(train, debug=None))


def _summary(run_dir: Path) -> dict:
    return RunDir(run_dir).summary() or {}


def _cached(path: Path, settings: dict) -> dict | None:
    """A stored evaluation, if it was made with these settings."""
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("settings") == settings:
            return stored
    return None


def eval_in_task(arm: str, target: str, exp: ExperimentConfig, out: Path, phases: Phases) -> dict:
    from tunelab.eval.files import evaluate_file

    path = out / "results" / arm / "in-task.json"
    settings = {"target": target, **exp.test.model_dump(), "precision": exp.precision}
    stored = _cached(path, settings)
    if stored is None:
        print(f"tunelab compare: {arm}: evaluating on {exp.test.data}", file=sys.stderr)
        with phases.measure(f"{arm}: in-task"):
            stored = evaluate_file(
                target,
                exp.test.data,
                str(path),
                force=True,
                config=str(out / "configs" / "task.yaml"),
                max_examples=exp.test.max_examples,
                extra={"settings": settings},
                precision=exp.precision,
            )
    if exp.test.metric not in stored["metrics"]:
        kind = "tool-call rows" if stored.get("method") == "tools" else "rows without tools"
        raise UserError(
            f"test.metric: {exp.test.metric} is not a score of {exp.test.data} ({kind}: "
            f"{', '.join(k for k, v in stored['metrics'].items() if isinstance(v, (int, float)))})"
        )
    return {"metrics": stored["metrics"], "examples": stored["examples"], "file": str(path)}


def eval_suite(arm: str, target: str, spec: SuiteSpec, exp: ExperimentConfig, out: Path, phases: Phases) -> dict:
    from tunelab.eval.files import evaluate_suite_file
    from tunelab.eval.heldout import SuiteOptions

    name = Path(spec.path.rstrip("/")).name
    path = out / "results" / arm / f"suite-{name}.json"
    options = SuiteOptions(
        shots=spec.shots, max_instances=spec.max_instances, max_new_tokens=exp.max_new_tokens, batch_size=exp.batch_size
    )
    from tunelab.eval.heldout import STOP

    settings = {
        "target": target,
        "suite": spec.path,
        **vars(options),
        "stop": {k: list(v) for k, v in STOP.items()},
        "precision": exp.precision,
    }
    stored = _cached(path, settings)
    if stored is None:
        print(f"tunelab compare: {arm}: held-out suite {spec.path}", file=sys.stderr)
        with phases.measure(f"{arm}: {name}"):
            stored = evaluate_suite_file(
                target, spec.path, str(path), True, options, extra={"settings": settings}, precision=exp.precision
            )
    return {
        "name": name,
        "path": spec.path,
        "format": stored["format"],
        "tasks": stored["tasks"],
        "prompt": stored["prompt"],
        "scores": stored["scores"],
        "file": str(path),
    }


# --- the report ---------------------------------------------------------------------------------------


def write_report(out: Path) -> Path:
    """report.md and report.html from results.json alone (no model is loaded)."""
    results_path = out / "results.json"
    if not results_path.is_file():
        raise UserError(f"{out}: no results.json yet; run `tunelab compare EXPERIMENT.yaml` first")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    blocks = report_blocks(results, out)
    atomic_write_text(out / "report.md", render_markdown(blocks))
    atomic_write_text(out / "report.html", render_html(blocks, out))
    return out / "report.md"


def report_blocks(results: dict, out: Path) -> list[tuple]:
    """The report as blocks: ("h", text), ("p", text), ("table", header, rows), ("img", file, caption)."""
    arms_data = results["arms"]
    arms = [a for a in ARMS if a in arms_data]
    trained = [a for a in arms if a != "base"]
    test = results["test"]
    metric = test["metric"]
    suites = [s["name"] for s in arms_data["base"]["suites"]]
    header = ["", *(LABELS[a] for a in arms)]

    def summary(arm, key):
        s = arms_data[arm].get("summary") or {}
        return s.get(key)

    def trained_on(arm):
        data = results["data"][arm]
        text = f"{Path(data['train']).name}" + "".join(f" + {Path(m).name}" for m in data.get("mixed_in") or [])
        return text + (f" ({data['examples']:,} examples)" if data.get("examples") else "")

    rows = [["Trained on", "nothing (zero-shot)", *(trained_on(a) for a in trained)]]
    rows.append(
        [
            f"**In-task**: {metric} on {Path(test['data']).name} ({arms_data['base']['in_task']['examples']} "
            f"{'turns' if metric in PER_TURN else 'rows'})",
            *(_cell(arms_data[a]["in_task"]["metrics"][metric]) for a in arms),
        ]
    )
    for i, name in enumerate(suites):
        first = arms_data["base"]["suites"][i]
        n = first["scores"]["overall"]["instances"]
        for m, label in (("rougeL", "ROUGE-L"), ("exact_match", "exact match")):
            rows.append(
                [
                    f"**Held-out**: {label} on {name} ({first['tasks']} tasks, {n} instances)",
                    *(_cell(arms_data[a]["suites"][i]["scores"]["overall"][m]) for a in arms),
                ]
            )
    rows.append(["Trainable parameters", "0", *(_cell(summary(a, "trainable_parameters")) for a in trained)])
    rows.append(["Training wall time (s)", "0", *(_cell(summary(a, "wall_seconds"), 0) for a in trained)])
    blocks: list[tuple] = [
        ("h", f"Fine-tuning vs instruction-tuning on {results['model']}"),
        (
            "p",
            f"Measured by `tunelab compare {results['experiment']}`. Every model is asked the same test rows and the "
            "same held-out instances; held-out tasks were never trained on, and every checkpoint was chosen on a "
            "validation split of its own training data.",
        ),
        ("table", header, rows),
        ("h", "What the numbers say"),
        *[("p", line) for line in verdict(results)],
    ]
    if results.get("differences"):
        from tunelab.eval.stats import CONFIDENCE, RESAMPLES

        blocks.append(("h", "Differences between the models, with 95% confidence intervals"))
        blocks.append(
            (
                "p",
                f"The mean per-instance difference (row model minus column model) on the instances both "
                f"answered, with its {CONFIDENCE:.0%} paired-bootstrap interval ({RESAMPLES:,} resamples of the "
                "instances); **significant** when the interval excludes 0, else within the noise of this "
                "many instances.",
            )
        )
        diff_rows = []
        for where, pairs in results["differences"].items():
            for d in pairs:
                diff_rows.append(
                    [
                        where,
                        f"{LABELS[d['a']]} − {LABELS[d['b']]}",
                        d["metric"],
                        f"{d['difference']:+.2f}",
                        f"[{d['low']:+.2f}, {d['high']:+.2f}]",
                        "**significant**" if d["significant"] else "within noise",
                    ]
                )
        blocks.append(("table", ["evaluated on", "difference", "metric", "mean", "95% interval", ""], diff_rows))
    if results.get("variants"):
        blocks += variant_blocks(results, suites)
    if results.get("phases"):
        blocks += phase_blocks(results["phases"])
    charts = write_charts(results, out)
    for file, caption in charts:
        blocks.append(("img", file, caption))
    for i, name in enumerate(suites):
        categories = list(arms_data["base"]["suites"][i]["scores"]["per_category"])
        if len(categories) > 30:
            continue
        blocks.append(("h", f"{name}: ROUGE-L per category"))
        blocks.append(
            (
                "table",
                ["category", *(LABELS[a] for a in arms)],
                [
                    [c, *(_cell(arms_data[a]["suites"][i]["scores"]["per_category"][c]["rougeL"]) for a in arms)]
                    for c in categories
                ],
            )
        )
    blocks.append(
        (
            "p",
            "Predictions and per-instance scores: results/ARM/*.json; the training runs: runs/ARM "
            "(configs/ holds their configs).",
        )
    )
    return blocks


def phase_blocks(phases: dict) -> list[tuple]:
    """Where the time and memory went: each phase's wall time and peak memory, the heaviest marked."""
    heaviest = max(p["peak_memory_mb"] for p in phases.values())
    rows = []
    for name, p in phases.items():
        peak = f"{p['peak_memory_mb'] / 1024:.1f}"
        rows.append([name, f"{p['seconds'] / 60:.1f}", f"**{peak}**" if p["peak_memory_mb"] == heaviest else peak])
    total = sum(p["seconds"] for p in phases.values())
    rows.append(["all phases", f"{total / 60:.1f}", f"{heaviest / 1024:.1f}"])
    return [
        ("h", "Where the time and memory went"),
        (
            "p",
            "Each arm's training and each evaluation with its wall time and the process's peak memory (RSS) while "
            "it ran, measured afresh for each (phases.json; a reused result costs nothing and keeps its first "
            "measurement).",
        ),
        ("table", ["phase", "minutes", "peak memory (GiB)"], rows),
    ]


def variant_blocks(results: dict, suites: list[str]) -> list[tuple]:
    """The levers: each variant of the instruct arm against the base model and the instruct arm, per suite."""
    base = results["arms"]["base"]
    instruct = results["arms"]["instruct"]
    header = ["variant", "changes", "training (s)"]
    for name in suites:
        header += [f"{name} ROUGE-L", "vs base [95% interval]", "vs instruct [95% interval]"]

    def reference(label: str, arm: dict, seconds: str) -> list[str]:
        return [
            label,
            "",
            seconds,
            *[x for i in range(len(suites)) for x in (_cell(arm["suites"][i]["scores"]["overall"]["rougeL"]), "", "")],
        ]

    rows = [
        reference("(base model)", base, "0"),
        reference("(instruct arm)", instruct, _cell((instruct.get("summary") or {}).get("wall_seconds"), 0)),
    ]
    for name, v in results["variants"].items():
        row = [name, _changes(v["changes"]), _cell((v.get("summary") or {}).get("wall_seconds"), 0)]
        for i in range(len(suites)):
            d = v["differences"][i]
            row += [
                _cell(v["suites"][i]["scores"]["overall"]["rougeL"]),
                *(
                    f"{d[b]['difference']:+.2f} [{d[b]['low']:+.2f}, {d[b]['high']:+.2f}]"
                    + (" *" if d[b]["significant"] else "")
                    for b in ("base", "instruct")
                ),
            ]
        rows.append(row)
    return [
        ("h", "Levers: what moves the instruction-tuned model's held-out score"),
        (
            "p",
            "Each variant is the instruct arm with the keys shown changed, trained and scored on the same held-out "
            "instances; differences are paired (95% bootstrap intervals; * where the interval excludes 0).",
        ),
        ("table", header, rows),
    ]


def _changes(keys: dict, prefix: str = "") -> str:
    """{train: {lr: 3e-4}} -> "train.lr=0.0003"."""
    parts = []
    for key, value in keys.items():
        if isinstance(value, dict):
            parts.append(_changes(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={value}")
    return ", ".join(parts)


def _cell(value, digits=2):
    return "n/a" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def verdict(results: dict) -> list[str]:
    """The two claims (fine-tuning is best on its task; instruction-tuning generalises), checked against the
    measurements, in plain words (with the intervals when the results have them, and the held-out goal
    when the experiment sets one)."""
    arms = results["arms"]
    metric = results["test"]["metric"]
    present = [a for a in ARMS if a in arms]
    score = {a: arms[a]["in_task"]["metrics"][metric] for a in present}
    found = results.get("differences") or {}

    def pair(where: str, a: str, b: str) -> dict | None:
        return next((d for d in found.get(where, []) if (d["a"], d["b"]) == (a, b)), None)

    def interval(where: str, a: str, b: str) -> str:
        d = pair(where, a, b)
        if d is None:
            return ""
        return (
            f" (95% interval [{d['low']:+.2f}, {d['high']:+.2f}]: "
            f"{'significant' if d['significant'] else 'within noise'})"
        )

    lines = []
    best = max(("base", "task", "instruct"), key=lambda a: score[a])
    if best == "task":
        lines.append(
            f"In-task, fine-tuning wins, as claimed: {metric} {score['task']:.2f} against "
            f"{score['instruct']:.2f} for the instruction-tuned model{interval('in-task', 'task', 'instruct')} "
            f"and {score['base']:.2f} zero-shot."
        )
    else:
        lines.append(
            f"In-task, the claim that fine-tuning is best on its task does not hold here: the "
            f"{LABELS[best].lower()} model scores {score[best]:.2f} {metric}, the task-fine-tuned one "
            f"{score['task']:.2f}."
        )
    goal = results.get("held_out_goal")
    for i, suite in enumerate(arms["base"]["suites"]):
        held = {a: arms[a]["suites"][i]["scores"]["overall"]["rougeL"] for a in present}
        gain = held["instruct"] - held["base"]
        d = pair(suite["name"], "instruct", "base")
        significant = d is not None and d["significant"]
        reaches = gain >= goal if goal is not None else gain > 0
        against = (
            f"{gain:+.2f}"
            + (f", goal +{goal:g}" if goal is not None else "")
            + interval(suite["name"], "instruct", "base")
        )
        if reaches and held["instruct"] >= held["task"] and (d is None or significant):
            lines.append(
                f"Held out ({suite['name']}), instruction-tuning generalises, as claimed: ROUGE-L "
                f"{held['instruct']:.2f} against {held['base']:.2f} for the base model ({against}) and "
                f"{held['task']:.2f} for the task model."
            )
        elif gain > 0 and significant:
            short = "by less than the goal" if goal is not None and gain < goal else "less than the task model does"
            lines.append(
                f"Held out ({suite['name']}), instruction-tuning generalises, but {short}: "
                f"ROUGE-L {held['instruct']:.2f} against {held['base']:.2f} for the base model ({against}) and "
                f"{held['task']:.2f} for the task model."
            )
        else:
            lines.append(
                f"Held out ({suite['name']}), the claim that instruction-tuning generalises is not borne out "
                f"here: instruction-tuning scores ROUGE-L {held['instruct']:.2f}, the base model "
                f"{held['base']:.2f} ({against}) and the task model {held['task']:.2f}."
            )
    if "mix" in present:
        kept = score["mix"] - score["task"]

        def overall(arm, i):
            return arms[arm]["suites"][i]["scores"]["overall"]["rougeL"]

        general = [overall("mix", i) - overall("base", i) for i in range(len(arms["base"]["suites"]))]
        lines.append(
            f"One model for many tasks (instruction data with the task's rows mixed in): in-task {metric} "
            f"{score['mix']:.2f}, {kept:+.2f} against the task model{interval('in-task', 'mix', 'task')}; held "
            "out, "
            + "; ".join(
                f"{s['name']} {g:+.2f} against the base model{interval(s['name'], 'mix', 'base')}"
                for s, g in zip(arms["base"]["suites"], general)
            )
            + "."
        )
    return lines


def write_charts(results: dict, out: Path) -> list[tuple[str, str]]:
    """Per-task bars for each suite and the training curves, as PNGs in `out`; (file name, caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    charts = []
    for i, suite in enumerate(arms["base"]["suites"]):
        tasks = list(suite["scores"]["per_task"])
        if len(tasks) > 40:
            tasks = list(suite["scores"]["per_category"])
            key, what = "per_category", "category"
        else:
            key, what = "per_task", "task"
        present = [a for a in ARMS if a in arms]
        fig, ax = plt.subplots(figsize=(max(7, 0.15 * len(present) * len(tasks) + 2), 4.5))
        width = 0.8 / len(present)
        for k, arm in enumerate(present):
            values = [arms[arm]["suites"][i]["scores"][key][t]["rougeL"] for t in tasks]
            ax.bar(
                [x + (k - (len(present) - 1) / 2) * width for x in range(len(tasks))], values, width, label=LABELS[arm]
            )
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(
            [t.split("_")[0] if what == "task" else t for t in tasks], rotation=70, ha="right", fontsize=7
        )
        ax.set_ylabel("ROUGE-L")
        ax.set_title(f"Held-out {suite['name']}: ROUGE-L per {what}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        name = f"chart-{suite['name']}.png"
        _save(fig, out / name)
        plt.close(fig)
        charts.append((name, f"Held-out {suite['name']}: ROUGE-L per {what}, every model"))
    curves = results.get("curves") or {}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, entries in curves.items():
            for split, style in (("train", "-"), ("eval", "o--")):
                points = [(e["step"], e["loss"]) for e in entries if e.get("split") == split and "loss" in e]
                if points:
                    ax.plot(*zip(*points), style, label=f"{LABELS[arm]}: {split} loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss per trained token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / "chart-training.png")
        plt.close(fig)
        charts.append(("chart-training.png", "Training curves of the trained models"))
    return charts


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def render_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += [f"{'#' if not lines else '##'} {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def render_html(blocks: list[tuple], out: Path) -> str:
    """One self-contained page: the charts are embedded as data URIs."""

    def inline(text: str) -> str:
        text = html.escape(text)
        parts = text.split("**")
        text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
        parts = text.split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body, first = [], True
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{1 if first else 2}>{inline(block[1])}</h{1 if first else 2}>")
            first = False
        elif kind == "p":
            body.append(f"<p>{inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{inline(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{inline(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((out / block[1]).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{inline(block[2])}</figcaption></figure>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        "td+td,th+th{text-align:right}img{max-width:100%}figcaption{color:#555;font-size:90%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab compare</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>\n"
    )
