"""`tunelab eval` and `tunelab predict`: a finished run (or any model) on a data file or a held-out suite.

    tunelab eval runs/task-smollm2-dialogsum --data ../shared/data/summarize/dialogsum.test.jsonl
    tunelab eval smollm2-135m-instruct --config configs/task-smollm2-dialogsum.yaml --data ...   # zero-shot
    tunelab predict runs/classify-minilm-sst2 --data new.tsv --out preds.jsonl

A run directory brings its method, prompt, template and generation settings (its config.yaml) and its
model (final/). A plain model takes them from `--config` (so that a zero-shot baseline is asked exactly
as the fine-tuned model was), else the defaults of `--method` (task: the source as the prompt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunelab.config import RunConfig, load_config
from tunelab.errors import UserError
from tunelab.fs import atomic_write_text
from tunelab.methods import METHODS
from tunelab.rundir import RunDir

EVAL_METHODS = ("task", "classify")  # the methods whose runs `tunelab eval --data` and `predict` take


def resolve_target(target: str, config: str | None, method: str | None, data: str) -> tuple[RunConfig, Path, bool]:
    """(config, model directory, is_run) for a run directory or a model name."""
    from tunelab.models import resolve_model

    path, run = Path(target), RunDir(target)
    if run.is_run():
        cfg = load_config(run.config).resolved()
        final = run.final
        if not final.is_dir():
            raise UserError(
                f"{path}: the run has no final/ model yet (it has not finished: `tunelab train --resume {path}`)"
            )
        if cfg.method not in EVAL_METHODS:
            raise UserError(f"{path}: a {cfg.method} run; eval and predict take task and classify runs")
        return cfg, final, True
    if config:
        cfg = load_config(config, [f"model={target}"]).resolved()
        if method and method != cfg.method:
            raise UserError(f"--method {method}, but {config} is a {cfg.method} config")
    else:
        cfg = RunConfig.model_validate(
            {"method": method or "task", "model": target, "data": {"train": data}}
        ).resolved()
    if cfg.method not in EVAL_METHODS:
        raise UserError(f"method {cfg.method}: eval and predict take task and classify models")
    if cfg.method == "classify":
        raise UserError(f"{target}: a classifier's head is trained with its labels; evaluate a classify run instead")
    return cfg, resolve_model(target), False


def evaluate_file(
    target: str,
    data: str,
    out: str | None,
    force: bool = False,
    config: str | None = None,
    method: str | None = None,
    max_examples: int | None = None,
    extra: dict | None = None,
    precision: str = "fp32",
    max_new_tokens: int | None = None,
) -> dict:
    """Score `target` on `data`; write the metrics JSON (with `extra`; predictions / a confusion matrix beside it).
    A generating model runs with its weights at `precision`. Rows with tools are scored as tool use
    (`eval.tool_calls`), on any run or model that generates."""
    tools = _tool_records(data)
    if tools is not None:
        folder, is_run = generative_model_folder(target), RunDir(target).is_run()
    else:
        if max_new_tokens is not None:
            raise UserError(
                "tunelab eval --max-new-tokens: for --suite and tool-call rows; a task's evaluation generates "
                "as its run config says (generation.max_new_tokens)"
            )
        cfg, folder, is_run = resolve_target(target, config, method, data)
    out_path = Path(out) if out else _default_out(target, data, is_run)
    if out_path.exists() and not force:
        raise UserError(f"{out_path}: already exists; pass --force to replace it, or --out another file")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if tools is not None:
        from tunelab.eval.tool_calls import evaluate_tools

        result, rows = evaluate_tools(folder, tools[:max_examples], max_new_tokens or 256, precision)
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_text(out_path.with_suffix(".predictions.jsonl"), lines)
    elif cfg.method == "classify":
        result = _eval_classify(cfg, folder, data, max_examples, out_path)
    else:
        result = _eval_task(cfg, folder, data, max_examples, out_path, precision)
    result = {"model": str(target), "data": str(data), **result, **(extra or {})}
    atomic_write_text(out_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def _tool_records(data: str) -> list | None:
    """The file's records when its rows declare tools (every problem in it refused, by file and line), else
    None."""
    from tunelab.data.formats import iter_records, load_records
    from tunelab.data.records import Chat

    first = next((r for r in iter_records(data) if isinstance(r, Chat)), None)
    if first is None or not first.tools:
        return None
    records, problems = load_records(data)
    errors = [str(p) for p in problems if p.severity == "error"]
    if errors:
        raise UserError(*errors)
    return records


def _default_out(target: str, data: str, is_run: bool) -> Path:
    name = Path(data).name.removesuffix(".gz")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    if is_run:
        return Path(target) / "eval" / f"{stem}.json"
    return Path(f"eval-{Path(target).name}-{stem}.json")


def _eval_task(cfg: RunConfig, folder: Path, data: str, limit: int | None, out: Path, precision: str = "fp32") -> dict:
    from tunelab.data.dataset import read_pairs
    from tunelab.eval.metrics import generation_metrics

    records = read_pairs(data, cfg.data.options(held_out=_is_eval_file(cfg, data)))[:limit]
    predictions, encoder_decoder = _task_predictions(cfg, folder, records, "evaluating", precision)
    metrics = generation_metrics(predictions, [r.references or [r.target] for r in records])
    write_predictions(out.with_suffix(".predictions.jsonl"), records, predictions)
    return {
        "method": "task",
        "examples": len(records),
        "metrics": metrics,
        "generation": cfg.generation.model_dump(),
        "prompt": None if encoder_decoder else cfg.data.prompt,
    }


def _eval_classify(cfg: RunConfig, folder: Path, data: str, limit: int | None, out: Path) -> dict:
    from tunelab.data.dataset import labeled_examples, read_labeled
    from tunelab.eval.classifier import classifier_batches, evaluate_classifier
    from tunelab.eval.metrics import plot_confusion
    from tunelab.models.load import load_classifier_run

    model, tokenizer, names = load_classifier_run(folder)
    records = read_labeled(data, cfg.data.options(held_out=_is_eval_file(cfg, data)), cfg.data.label_names)[:limit]
    examples = labeled_examples(records, tokenizer, names, cfg.data.max_length, data)
    metrics = evaluate_classifier(
        model, classifier_batches(examples, cfg.train.batch_size, tokenizer.pad_token_id), names
    )
    plot_confusion(metrics, out.with_suffix(".confusion.png"))
    return {"method": "classify", "examples": len(records), "metrics": metrics}


def _is_eval_file(cfg: RunConfig, data: str) -> bool:
    """Whether `data` is laid out as the run's evaluation file (data.eval_columns), not its training file."""
    return cfg.data.eval_columns is not None and Path(data) != Path(cfg.data.train)


# --- held-out instruction suites ---------------------------------------------------------------------


def generative_model_folder(target: str) -> Path:
    """The model directory of a run that generates (any method but classify and reward), or of a model."""
    from tunelab.models import resolve_model

    run = RunDir(target)
    method = load_config(run.config).method if run.is_run() else None
    if method is not None and not METHODS[method].generates:
        raise UserError(f"{target}: a {method} run does not generate; held-out instructions need a language model")
    return resolve_model(target)  # a run directory stands for its final/ (an error if it has none yet)


def evaluate_suite_file(
    target: str, suite: str, out: str | None, force: bool, options, extra: dict | None = None, precision: str = "fp32"
) -> dict:
    """Score `target` on a held-out suite, its weights at `precision`; write the result JSON (scores and every
    prediction, and `extra`)."""
    from tunelab.eval.heldout import evaluate_suite
    from tunelab.models.load import inference_dtype, load_generator

    folder = generative_model_folder(target)
    is_run = RunDir(target).is_run()
    out_path = Path(out) if out else _default_out(target, "suite-" + Path(suite.rstrip("/")).name, is_run)
    if out_path.exists() and not force:
        raise UserError(f"{out_path}: already exists; pass --force to replace it, or --out another file")
    model, tokenizer, _ = load_generator(folder, inference_dtype(precision), merged=True)
    result = {
        "model": str(target),
        "precision": precision,
        **evaluate_suite(model, tokenizer, suite, options),
        **(extra or {}),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    result["out"] = str(out_path)
    return result


def print_suite(result: dict) -> None:
    scores = result["scores"]
    overall = scores["overall"]
    print(
        f"{result['suite']} ({result['format']}, {result['tasks']} tasks, {overall['instances']:,} instances, "
        f"{result['shots']}-shot, prompt: {result['prompt']}): ROUGE-L {overall['rougeL']:.2f}, "
        f"exact match {overall['exact_match']:.2f}"
    )
    if len(scores["per_category"]) <= 40:
        for name, m in scores["per_category"].items():
            print(f"  {name:<32} ROUGE-L {m['rougeL']:6.2f}  exact match {m['exact_match']:6.2f}  ({m['instances']})")
    print(f"scores and predictions: {result['out']}")
    sys.stdout.flush()


# --- predict ------------------------------------------------------------------------------------------


def predict_file(
    target: str, data: str, out: str, force: bool = False, config: str | None = None, method: str | None = None
) -> int:
    """Write one JSON line per input row of `data` with the model's prediction; returns the count."""
    cfg, folder, _ = resolve_target(target, config, method, data)
    out_path = Path(out)
    if out_path.exists() and not force:
        raise UserError(f"{out_path}: already exists; pass --force to replace it")
    rows = _input_rows(data, cfg)
    if cfg.method == "classify":
        lines = _predict_classify(cfg, folder, rows)
    else:
        lines = _predict_task(cfg, folder, rows)
    atomic_write_text(out_path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return len(lines)


def _input_rows(data: str, cfg: RunConfig) -> list[tuple[str, dict]]:
    """(file:line, row) of every readable row; labels and targets may be absent."""
    from tunelab.data.formats import pick_columns
    from tunelab.data.readers import Problem, read_rows

    rows, problems = [], []
    for row in read_rows(data, cfg.data.header):
        if isinstance(row, Problem):
            problems.append(str(row))
        elif not isinstance(row.value, dict):
            problems.append(f"{row.file}:{row.line}: expected a JSON object per example")
        else:
            value = pick_columns(row.value, cfg.data.columns) if cfg.data.columns else row.value
            rows.append((f"{row.file}:{row.line}", value))
    if problems:
        raise UserError(*problems[:20])
    return rows


def _field(where: str, row: dict, keys: tuple[str, ...], what: str) -> str:
    value = next((row[k] for k in keys if k in row), None)
    if not isinstance(value, str):
        raise UserError(f"{where}: no {what} (expected one of the fields {', '.join(keys)})")
    return value


def _predict_classify(cfg: RunConfig, folder: Path, rows: list[tuple[str, dict]]) -> list[dict]:
    from tunelab.data.dataset import labeled_examples
    from tunelab.data.formats import PAIR_KEYS, TEXT_KEYS
    from tunelab.data.records import Labeled
    from tunelab.eval.classifier import class_probabilities, classifier_batches
    from tunelab.models.load import load_classifier_run

    model, tokenizer, names = load_classifier_run(folder)
    records = [
        Labeled(_field(w, r, TEXT_KEYS, "text"), names[0], next((r[k] for k in PAIR_KEYS if k in r), None), w)
        for w, r in rows
    ]
    examples = labeled_examples(records, tokenizer, names, cfg.data.max_length, "")
    batches = classifier_batches(examples, cfg.train.batch_size, tokenizer.pad_token_id)
    probabilities = class_probabilities(model, batches, len(records))
    out = []
    for record, p in zip(records, probabilities):
        best = max(range(len(names)), key=lambda k: p[k])
        line = {
            "where": record.where,
            "text": record.text,
            "label": names[best],
            "score": round(p[best], 6),
            "probabilities": {n: round(x, 6) for n, x in zip(names, p)},
        }
        out.append(line if record.text_pair is None else {**line, "text_pair": record.text_pair})
    return out


def _predict_task(cfg: RunConfig, folder: Path, rows: list[tuple[str, dict]]) -> list[dict]:
    from tunelab.data.formats import SOURCE_KEYS
    from tunelab.data.records import Pair

    records = [Pair(_field(w, r, SOURCE_KEYS, "source text"), "", [], w) for w, r in rows]
    predictions, _ = _task_predictions(cfg, folder, records, "predicting")
    return [{"where": r.where, "source": r.source, "prediction": p} for r, p in zip(records, predictions)]


def _task_predictions(
    cfg: RunConfig, folder: Path, records: list, description: str, precision: str = "fp32"
) -> tuple[list[str], bool]:
    """(a task model's output for each record's source, asked as the run config says (data.prompt through
    the template it trained with, generation.*), whether the model is an encoder-decoder)."""
    from tunelab.data.dataset import renderer_for
    from tunelab.infer.generate import predict_targets
    from tunelab.models.load import inference_dtype, load_generator

    model, tokenizer, encoder_decoder = load_generator(folder, inference_dtype(precision), merged=True)
    renderer = None if encoder_decoder else renderer_for(tokenizer, cfg.data.options())
    return predict_targets(model, tokenizer, records, renderer, encoder_decoder, cfg, description), encoder_decoder


def write_predictions(path: Path, records: list, predictions: list[str]) -> None:
    """One JSON line per (source, target) record: where it is, its source, the prediction, its references."""
    lines = [
        json.dumps(
            {"where": r.where, "source": r.source, "prediction": p, "references": r.references or [r.target]},
            ensure_ascii=False,
        )
        for r, p in zip(records, predictions)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def print_metrics(result: dict) -> None:
    metrics = result["metrics"]
    if result["method"] == "classify":
        print(
            f"{result['examples']:,} examples: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
        )
        for name, m in metrics["per_class"].items():
            print(
                f"  {name:<16} precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}  "
                f"support {m['support']}"
            )
    elif result["method"] == "tools":
        shown = ", ".join(f"{k} {v:.1f}%" for k, v in metrics.items() if isinstance(v, float))
        print(f"{metrics['turns']:,} turns ({metrics['call_turns']:,} with calls): {shown}")
        if metrics["full_call_exact_match_interval"]:
            low, high = metrics["full_call_exact_match_interval"]
            print(f"  full_call_exact_match 95% interval: [{low:.1f}, {high:.1f}]")
    else:
        print(f"{result['examples']:,} examples: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    sys.stdout.flush()
