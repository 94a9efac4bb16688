"""`tunelab data validate`: everything wrong with a data file, and what is in it, before any training.

    report = validate("train.jsonl", eval_spec="dev.jsonl", tokenizer=tok, options=DataOptions(max_length=512))
    report.errors, report.warnings, report.stats

Errors make the data unusable as it is (a broken line, an unknown role); warnings are worth a look
but do not stop a run (duplicates, train/eval leakage, truncation, label imbalance). Each names the
file and line of the example it is about, or the file alone for a finding about the whole file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import numpy as np

from tunelab.data.dataset import DataOptions, renderer_for
from tunelab.data.formats import load_records
from tunelab.data.readers import Problem
from tunelab.data.records import Chat, Labeled, Pair, Preference, Prompt, Record
from tunelab.data.render import IGNORE, Example, Renderer

R = TypeVar("R")

IMBALANCE = 3.0  # warn when the largest class has this many times the examples of the smallest


@dataclass
class Report:
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def add(self, problem: Problem) -> None:
        (self.errors if problem.severity == "error" else self.warnings).append(problem)

    def as_json(self) -> dict:
        def entries(problems: list[Problem]) -> list[dict]:
            return [{"file": p.file, "line": p.line, "message": p.message} for p in problems]

        return {"errors": entries(self.errors), "warnings": entries(self.warnings), "stats": self.stats}


def validate(spec: str, eval_spec: str | None = None, tokenizer=None, options: DataOptions | None = None) -> Report:
    options = options or DataOptions()
    renderer = None
    if tokenizer is not None:
        renderer = renderer_for(tokenizer, options)
    report = Report()
    train = _check_file(spec, options, renderer, report, is_train=True)
    report.stats = {"train": train["stats"]}
    if eval_spec:
        held_out = _check_file(eval_spec, options, renderer, report, is_train=False)
        report.stats["eval"] = held_out["stats"]
        _check_leakage(train["records"], held_out["records"], report)
        _check_unseen_labels(train["records"], held_out["records"], eval_spec, report)
    return report


def _check_file(spec: str, options: DataOptions, renderer: Renderer | None, report: Report, is_train: bool) -> dict:
    records, problems = load_records(spec, options.format, options.columns, options.header)
    for problem in problems:
        report.add(problem)
    stats = {"file": str(spec), "examples": len(records), "skipped": sum(p.severity == "warning" for p in problems)}
    if records:
        kinds = Counter(type(r).__name__.lower() for r in records)
        stats["records"] = kinds.most_common(1)[0][0]
        _check_duplicates(records, report)
        if stats["records"] == "chat":
            _check_turns(_all(records, Chat), spec, report, stats)
        if stats["records"] == "labeled":
            _check_labels(_all(records, Labeled), spec, report, stats, is_train)
        if renderer is not None:
            _token_stats(records, renderer, report, stats)
    return {"records": records, "stats": stats}


# --- findings about examples ---------------------------------------------------------------------


def _check_duplicates(records: list[Record], report: Report) -> None:
    first: dict[str, str] = {}
    for record in records:
        key = _content(record)
        if key in first:
            report.add(Problem.at(record.where, f"exact duplicate of the example at {first[key]}", "warning"))
        else:
            first[key] = record.where


def _check_leakage(train: list[Record], held_out: list[Record], report: Report) -> None:
    seen = {_input(r): r.where for r in train}
    for record in held_out:
        if _input(record) in seen:
            report.add(
                Problem.at(
                    record.where,
                    f"its input is also in the training data (at {seen[_input(record)]}): "
                    "train/eval leakage inflates eval scores",
                    "warning",
                )
            )


def _check_turns(records: list[Chat], spec: str, report: Report, stats: dict) -> None:
    with_system = 0
    for record in records:
        roles = {m["role"] for m in record.messages}
        with_system += "system" in roles
        if "user" not in roles:
            report.add(Problem.at(record.where, "no user turn: the assistant answers nothing", "warning"))
    stats["with_system_turn"] = with_system
    if 0 < with_system < len(records):
        report.add(
            Problem(
                spec,
                None,
                f"{with_system} of {len(records)} examples have a system turn and the "
                "others none: the model may learn to behave differently without it",
                "warning",
            )
        )


def _check_labels(records: list[Labeled], spec: str, report: Report, stats: dict, is_train: bool) -> None:
    counts = Counter(r.label for r in records)
    stats["labels"] = {str(k): v for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))}
    if not is_train:
        return
    if len(counts) < 2:
        report.add(Problem(spec, None, f"only one label ({next(iter(counts))!r}): nothing to tell apart"))
        return
    (top, most), (low, least) = counts.most_common()[0], counts.most_common()[-1]
    if most >= IMBALANCE * least:
        report.add(
            Problem(
                spec,
                None,
                f"label imbalance: {top!r} has {most} examples, {low!r} only {least}; "
                "consider class weights or resampling",
                "warning",
            )
        )


def _check_unseen_labels(train: list[Record], held_out: list[Record], spec: str, report: Report) -> None:
    known = {r.label for r in train if isinstance(r, Labeled)}
    unseen = sorted({str(r.label) for r in held_out if isinstance(r, Labeled)} - {str(k) for k in known})
    if known and unseen:
        report.add(Problem(spec, None, f"labels never seen in training: {', '.join(unseen)}", "warning"))


def _token_stats(records: list[Record], renderer: Renderer, report: Report, stats: dict) -> None:
    """Render as training would; token counts, trained tokens, and examples that lose their supervision."""
    examples = _render(records, renderer)
    if not examples:
        return
    lengths = np.array([len(e.input_ids) for e in examples])
    trained = np.array([sum(label != IGNORE for label in e.labels[1:]) for e in examples])
    stats["tokens"] = {
        name: int(np.percentile(lengths, q))
        for name, q in (("min", 0), ("p5", 5), ("median", 50), ("p95", 95), ("max", 100))
    }
    stats["tokens"]["total"] = int(lengths.sum())
    stats["tokens"]["per"] = "chosen or rejected sequence" if isinstance(records[0], Preference) else "example"
    if not isinstance(records[0], Labeled):
        stats["trained_tokens"] = {"total": int(trained.sum()), "mean": round(float(trained.mean()), 1)}
    stats["max_length"] = renderer.max_length
    status = Counter(e.status for e in examples)
    stats["truncated"], stats["dropped"] = status["truncated"], status["dropped"]
    stats["untrained"] = status["untrained"]
    n = renderer.max_length
    for e in examples:
        message = {
            "truncated": f"longer than max_length {n}: the prompt's start is cut (truncation: keep_response)",
            "dropped": f"longer than max_length {n}: dropped (truncation: drop)",
            "untrained": "no trained token left (after truncation): it teaches nothing and is skipped",
            "invalid": e.problem,
        }.get(e.status)
        if message:
            report.add(Problem.at(e.where, message, "error" if e.status == "invalid" else "warning"))


def _render(records: list[Record], renderer: Renderer) -> list[Example]:
    kind = type(records[0])
    if kind is Chat:
        return renderer.chats(_all(records, Chat))
    if kind is Pair:
        return renderer.pairs(_all(records, Pair))
    if kind is Preference:
        return [e for pair in renderer.preferences(_all(records, Preference)) for e in pair]
    if kind is Prompt:
        return []  # nothing is trained on a prompt: online RL samples its responses
    labeled = _all(records, Labeled)
    labels = sorted({r.label for r in labeled}, key=str)
    return renderer.labeled(labeled, {label: i for i, label in enumerate(labels)})


def _all(records: list[Record], kind: type[R]) -> list[R]:
    """The records of one kind (a file's records are all of the kind its format reads)."""
    return [r for r in records if isinstance(r, kind)]


# --- helpers ---------------------------------------------------------------------------------------


def _content(record: Record) -> str:
    fields = {k: v for k, v in asdict(record).items() if k != "where"}
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def _input(record: Record) -> str:
    """What the model is given (not what it should answer): the key for train/eval leakage."""
    if isinstance(record, Chat):
        return json.dumps([(m["role"], m["content"]) for m in record.messages if m["role"] != "assistant"])
    if isinstance(record, Labeled):
        return json.dumps([record.text, record.text_pair])
    if isinstance(record, Pair):
        return record.source
    if isinstance(record, Prompt):
        return json.dumps([(m["role"], m["content"]) for m in record.messages])
    return json.dumps([(m["role"], m["content"]) for m in record.prompt])
