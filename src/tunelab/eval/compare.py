"""`tunelab compare EXPERIMENT.yaml`: fine-tuning against instruction-tuning, measured on the same data.

    tunelab compare configs/compare-quick.yaml
    tunelab compare configs/compare-quick.yaml --report-only     # re-render the report from results.json

One experiment names a base model, a task (a `method: task` run config without its model, and a test
file), instruction data (a `method: sft` run config) and held-out instruction suites. It trains (or
reuses) the task model and the instruction-tuned model, evaluates them and the untouched base model
on the task's test rows and on every suite, and writes into its `output_dir`:

    runs/{task,instruct}/    the two training runs (a stopped one resumes; a finished one is reused)
    configs/{task,instruct}.yaml   their resolved configs, runnable on their own
    results/ARM/*.json       every evaluation, with its predictions (reused when its settings match)
    results.json             everything the report shows
    report.md, report.html   the seed's table with the measured numbers, charts and curves (HTML: self-contained)

The in-task test asks every model the task's `data.prompt` through its own template (the base model,
which has none, gets the Alpaca layout, as task fine-tuning trained it); the suites ask as
`tunelab eval --suite` does. The verdict says what the numbers say, also where they contradict the seed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

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
from tunelab.errors import UserError
from tunelab.fs import atomic_write_text
from tunelab.eval.metrics import GENERATION_METRICS
from tunelab.recipes import METHODS
from tunelab.train.logs import read_metrics

ARMS = ("base", "task", "instruct")
LABELS = {"base": "Base model", "task": "Task fine-tuning", "instruct": "Instruction-tuning"}
METHOD_OF = {"task": "task", "instruct": "sft"}
GOAL_POINTS = 5.0  # the bar: instruction-tuning beats the base model by this many ROUGE-L points held out


class SuiteSpec(Section):
    path: str = Field(description="a folder of SNI / NI v1 task files, one task file, or Self-Instruct .jsonl")
    max_instances: int | None = Field(None, gt=0, description="the first N instances of each task")
    shots: int = Field(0, ge=0, description="positive examples before each instance")


class TestSpec(Section):
    data: str = Field(description="the task's test file (its references score the in-task result)")
    max_examples: int | None = Field(None, gt=0, description="the first N test rows")
    metric: str = Field("rougeL", description=f"the in-task score: {', '.join(GENERATION_METRICS)}")


class ExperimentConfig(Section):
    model: str = Field(description="the base model every arm starts from")
    output_dir: str
    task: dict[str, Any] = Field(description="a method: task run config, without model and output_dir")
    instruct: dict[str, Any] = Field(description="a method: sft run config, without model and output_dir")
    test: TestSpec
    suites: list[SuiteSpec] = Field(min_length=1)
    max_new_tokens: int = Field(64, gt=0, description="tokens generated per held-out answer")
    batch_size: int = Field(8, gt=0, description="prompts generated for at once")


def load_experiment(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, dict[str, RunConfig]]:
    """The experiment and its two training runs' resolved configs; every problem reported at once."""
    path = Path(path)
    raw, sources, problems = read_yaml_with_overrides(path, overrides)
    exp = validate_schema(ExperimentConfig, raw, sources, path, problems)
    runs = {}
    for arm, method in METHOD_OF.items():
        arm_raw = getattr(exp, arm)
        for key in ("model", "output_dir"):
            if key in arm_raw:
                raise UserError(f"{sources.get(f'{arm}.{key}', path)}: {arm}.{key}: set by the experiment "
                                f"(model: at the top; output_dir: {exp.output_dir}/runs/{arm})")
        run_raw = {**arm_raw, "model": exp.model, "output_dir": str(Path(exp.output_dir) / "runs" / arm)}
        cfg = validate_run(run_raw, sources, path, prefix=f"{arm}.").resolved()
        if cfg.method != method:
            raise UserError(f"{sources.get(f'{arm}.method', path)}: {arm}.method: the {arm} arm is a method: {method} "
                            f"run, not {cfg.method}")
        runs[arm] = cfg
    if exp.test.metric not in GENERATION_METRICS:
        raise UserError(f"{sources.get('test.metric', path)}: test.metric: {exp.test.metric!r} is not one of "
                        f"{', '.join(GENERATION_METRICS)}")
    return exp, runs


# --- running the experiment ---------------------------------------------------------------------------


def run_experiment(path: str | Path, overrides: list[str] = ()) -> Path:
    """Train what is missing, evaluate what is missing, write the report; returns the report's path."""
    exp, runs = load_experiment(path, overrides)
    out = Path(exp.output_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summaries = {}
    for arm, cfg in runs.items():
        save_config(cfg, out / "configs" / f"{arm}.yaml")
        summaries[arm] = train_arm(arm, cfg)
    results = {"experiment": str(path), "model": exp.model, "test": exp.test.model_dump(),
               "arms": {arm: {"summary": summaries.get(arm)} for arm in ARMS}}
    for arm in ARMS:
        target = exp.model if arm == "base" else str(out / "runs" / arm / "final")
        results["arms"][arm]["in_task"] = eval_in_task(arm, target, exp, out)
        results["arms"][arm]["suites"] = [eval_suite(arm, target, spec, exp, out) for spec in exp.suites]
    results["curves"] = {arm: read_metrics(out / "runs" / arm) for arm in runs}
    results["data"] = {arm: {"train": cfg.data.train, "examples": summaries[arm].get("train_examples")} for arm, cfg in runs.items()}
    results["seconds_this_call"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return write_report(out)


def train_arm(arm: str, cfg: RunConfig) -> dict:
    """Train one arm, resume it, or reuse its finished run; returns its summary.json (plus examples)."""
    run_dir = Path(cfg.output_dir)
    if (run_dir / "config.yaml").is_file():
        saved = load_config(run_dir / "config.yaml").resolved()
        if dump_config(saved) != dump_config(cfg):
            raise UserError(f"{run_dir}: holds a {arm} run of another config; remove it (or set output_dir elsewhere) "
                            "to train this one")
        if (run_dir / "summary.json").is_file() and (run_dir / "final").is_dir():
            print(f"tunelab compare: {arm}: reusing the finished run in {run_dir}", file=sys.stderr)
            return _summary(run_dir)
        if not any((run_dir / "checkpoints").glob("*")):  # stopped before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
    resume = run_dir.is_dir()
    print(f"tunelab compare: {arm}: {'resuming' if resume else 'training'} {run_dir}", file=sys.stderr)
    METHODS[cfg.method].run(cfg, resume=resume)
    return _summary(run_dir)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _cached(path: Path, settings: dict) -> dict | None:
    """A stored evaluation, if it was made with these settings."""
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("settings") == settings:
            return stored
    return None


def eval_in_task(arm: str, target: str, exp: ExperimentConfig, out: Path) -> dict:
    from tunelab.eval.files import evaluate_file

    path = out / "results" / arm / "in-task.json"
    settings = {"target": target, **exp.test.model_dump()}
    stored = _cached(path, settings)
    if stored is None:
        print(f"tunelab compare: {arm}: evaluating on {exp.test.data}", file=sys.stderr)
        stored = evaluate_file(target, exp.test.data, str(path), force=True, config=str(out / "configs" / "task.yaml"),
                               max_examples=exp.test.max_examples, extra={"settings": settings})
    return {"metrics": stored["metrics"], "examples": stored["examples"], "file": str(path)}


def eval_suite(arm: str, target: str, spec: SuiteSpec, exp: ExperimentConfig, out: Path) -> dict:
    from tunelab.eval.heldout import SuiteOptions
    from tunelab.eval.files import evaluate_suite_file

    name = Path(spec.path.rstrip("/")).name
    path = out / "results" / arm / f"suite-{name}.json"
    options = SuiteOptions(shots=spec.shots, max_instances=spec.max_instances, max_new_tokens=exp.max_new_tokens,
                           batch_size=exp.batch_size)
    from tunelab.eval.heldout import STOP

    settings = {"target": target, "suite": spec.path, **vars(options), "stop": {k: list(v) for k, v in STOP.items()}}
    stored = _cached(path, settings)
    if stored is None:
        print(f"tunelab compare: {arm}: held-out suite {spec.path}", file=sys.stderr)
        stored = evaluate_suite_file(target, spec.path, str(path), True, options, extra={"settings": settings})
    return {"name": name, "path": spec.path, "format": stored["format"], "tasks": stored["tasks"],
            "prompt": stored["prompt"], "scores": stored["scores"], "file": str(path)}


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
    arms = results["arms"]
    test = results["test"]
    metric = test["metric"]
    suites = [s["name"] for s in arms["base"]["suites"]]
    header = ["", *(LABELS[a] for a in ARMS)]

    def cell(value, digits=2):
        return "n/a" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"

    def summary(arm, key):
        s = arms[arm].get("summary") or {}
        return s.get(key)

    rows = [["Trained on", "nothing (zero-shot)", *(f"{Path(results['data'][a]['train']).name}"
                                                    + (f" ({results['data'][a]['examples']:,} examples)" if results["data"][a].get("examples") else "")
                                                    for a in ("task", "instruct"))]]
    rows.append([f"**In-task**: {metric} on {Path(test['data']).name} ({arms['base']['in_task']['examples']} rows)",
                 *(cell(arms[a]["in_task"]["metrics"][metric]) for a in ARMS)])
    for i, name in enumerate(suites):
        first = arms["base"]["suites"][i]
        n = first["scores"]["overall"]["instances"]
        for m, label in (("rougeL", "ROUGE-L"), ("exact_match", "exact match")):
            rows.append([f"**Held-out**: {label} on {name} ({first['tasks']} tasks, {n} instances)",
                         *(cell(arms[a]["suites"][i]["scores"]["overall"][m]) for a in ARMS)])
    rows.append(["Trainable parameters", "0", *(cell(summary(a, "trainable_parameters")) for a in ("task", "instruct"))])
    rows.append(["Training wall time (s)", "0", *(cell(summary(a, "wall_seconds"), 0) for a in ("task", "instruct"))])
    blocks: list[tuple] = [
        ("h", f"Fine-tuning vs instruction-tuning on {results['model']}"),
        ("p", f"Measured by `tunelab compare {results['experiment']}`. Every model is asked the same test rows and the "
              "same held-out instances; held-out tasks were never trained on."),
        ("table", header, rows),
        ("h", "What the numbers say"),
        *[("p", line) for line in verdict(results)],
    ]
    charts = write_charts(results, out)
    for file, caption in charts:
        blocks.append(("img", file, caption))
    for i, name in enumerate(suites):
        categories = list(arms["base"]["suites"][i]["scores"]["per_category"])
        if len(categories) > 30:
            continue
        blocks.append(("h", f"{name}: ROUGE-L per category"))
        blocks.append(("table", ["category", *(LABELS[a] for a in ARMS)],
                       [[c, *(cell(arms[a]["suites"][i]["scores"]["per_category"][c]["rougeL"]) for a in ARMS)]
                        for c in categories]))
    blocks.append(("p", "Predictions and per-instance scores: results/ARM/*.json; the training runs: runs/task and "
                        "runs/instruct (configs/ holds their configs)."))
    return blocks


def verdict(results: dict) -> list[str]:
    """The seed's two claims, checked against the measurements, in plain words."""
    arms = results["arms"]
    metric = results["test"]["metric"]
    score = {a: arms[a]["in_task"]["metrics"][metric] for a in ARMS}
    lines = []
    best = max(ARMS, key=lambda a: score[a])
    if best == "task":
        lines.append(f"In-task, fine-tuning wins, as the seed says: {metric} {score['task']:.2f} against "
                     f"{score['instruct']:.2f} for the instruction-tuned model and {score['base']:.2f} zero-shot.")
    else:
        lines.append(f"In-task, this contradicts the seed: the {LABELS[best].lower()} model scores {score[best]:.2f} "
                     f"{metric}, the task-fine-tuned one {score['task']:.2f}.")
    for i, suite in enumerate(arms["base"]["suites"]):
        held = {a: arms[a]["suites"][i]["scores"]["overall"]["rougeL"] for a in ARMS}
        gain = held["instruct"] - held["base"]
        if gain >= GOAL_POINTS and held["instruct"] >= held["task"]:
            lines.append(f"Held out ({suite['name']}), instruction-tuning generalises, as the seed says: ROUGE-L "
                         f"{held['instruct']:.2f} against {held['base']:.2f} for the base model (+{gain:.2f}, goal "
                         f"+{GOAL_POINTS:.0f}) and {held['task']:.2f} for the task model.")
        else:
            lines.append(f"Held out ({suite['name']}), the seed's claim is not borne out here: instruction-tuning "
                         f"scores ROUGE-L {held['instruct']:.2f}, the base model {held['base']:.2f} ({gain:+.2f}; goal "
                         f"+{GOAL_POINTS:.0f}) and the task model {held['task']:.2f}.")
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
        fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(tasks) + 2), 4.5))
        width = 0.8 / len(ARMS)
        for k, arm in enumerate(ARMS):
            values = [arms[arm]["suites"][i]["scores"][key][t]["rougeL"] for t in tasks]
            ax.bar([x + (k - 1) * width for x in range(len(tasks))], values, width, label=LABELS[arm])
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([t.split("_")[0] if what == "task" else t for t in tasks], rotation=70, ha="right", fontsize=7)
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
        charts.append(("chart-training.png", "Training curves of the two trained models"))
    return charts


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def render_markdown(blocks: list[tuple]) -> str:
    lines = []
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
            body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{inline(block[2])}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
             "td+td,th+th{text-align:right}img{max-width:100%}figcaption{color:#555;font-size:90%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab compare</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
