"""From a fine-tuning job to a tunelab run: its files checked by tunelab's validator, its "auto"
hyperparameters resolved from the data, and the run config it trains with.

    supervised    -> method: sft (chats, OpenAI's format with `weight`, or any format tunelab reads)
    dpo           -> method: dpo (OpenAI's preference format, or any pair format tunelab reads)
    reinforcement -> method: grpo (OpenAI's reinforcement rows, data.format openai_rft), its grader the
                     reward: grader.json and the grader.py that applies it, written in the job's folder

n_epochs "auto": about 3 epochs, at least 100 and at most 25,000 examples seen (OpenAI's rule);
batch_size "auto": 0.2% of the examples, 1 to 256; learning_rate_multiplier "auto": 1, a multiple of
tunelab's default rate for the tuning mode (LoRA 2e-4, full 2e-5); beta "auto": 0.1. tunelab's own
keys in the hyperparameters: `tuning_mode` (lora, the default, or full) and `lora_rank` (16).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import RequestError
from tunelab.methods import JOB_METHODS

MIN_EPOCHS, MAX_EPOCHS, TARGET_EPOCHS = 1, 25, 3  # "auto" epochs, as OpenAI describes its choice:
MIN_EXAMPLES, MAX_EXAMPLES = 100, 25_000  # ~3 epochs, at least 100 and at most 25,000 examples seen

KINDS = {
    "supervised": ("chat", "a chat (messages) or an instruction"),
    "dpo": ("preference", "a preference pair"),
    "reinforcement": ("prompt", "messages ending with the user's turn, and the fields its grader reads,"),
}
FORMATS = {"reinforcement": "openai_rft"}  # the data format a kind's files are read in (else detected)
HYPERPARAMETERS = {
    "supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
    "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"),
    "reinforcement": (
        "n_epochs",
        "batch_size",
        "learning_rate_multiplier",
        "eval_interval",
        "eval_samples",
        "compute_multiplier",
        "reasoning_effort",
    ),
}
GENERATIONS, COMPLETION_TOKENS = 8, 128  # a reinforcement job's completions a prompt (x compute_multiplier), length
EXTENSIONS = ("tuning_mode", "lora_rank")


def auto_epochs(examples: int) -> int:
    if examples * TARGET_EPOCHS < MIN_EXAMPLES:
        return min(MAX_EPOCHS, -(-MIN_EXAMPLES // max(examples, 1)))
    if examples * TARGET_EPOCHS > MAX_EXAMPLES:
        return max(MIN_EPOCHS, MAX_EXAMPLES // examples)
    return TARGET_EPOCHS


def check_files(job: dict, db, folder: Path) -> dict:
    """Validate the job's files as `tunelab data validate` does; the job's fields with "auto" resolved."""
    kind = job["method"]["type"]
    files = {param: _stored(job, param, db) for param in ("training_file", "validation_file") if job.get(param)}
    found = inspect_files(kind, files, folder)
    if found["errors"]:
        first = found["errors"][0]
        param = first["param"]
        raise RequestError(400, _problem(first, files[param], len(found["errors"])), param, f"invalid_{param}")
    resolved = auto_values(kind, job["method"][kind]["hyperparameters"], found["examples"]["training_file"])
    legacy = {k: resolved[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return {
        "hyperparameters": legacy,
        "method": {"type": kind, kind: {**job["method"][kind], "hyperparameters": resolved}},
    }


def inspect_files(kind: str, files: dict[str, dict], folder: Path, most: int = 200) -> dict:
    """What `tunelab data validate` finds in a job's files (param -> file object), in the API's terms:
    each problem and warning as {param, line, message} (the first `most` of each, with their counts),
    and each file's examples; a file whose records are not what a `kind` job trains on is a problem too.
    Messages name a file by its id and uploaded name, never by where the server keeps it."""
    from tunelab.data.validate import validate
    from tunelab.jobs.files import file_path

    paths = {param: str(file_path(folder, f)) for param, f in files.items()}
    labels = {path: f"{files[param]['id']} ({files[param]['filename']})" for param, path in paths.items()}
    params = {path: param for param, path in paths.items()}
    from tunelab.data.options import DataOptions

    options = DataOptions(format=FORMATS.get(kind, "auto"))
    report = validate(paths["training_file"], paths.get("validation_file"), options=options)

    def entry(problem) -> dict:
        message = problem.message
        for path, label in labels.items():
            message = message.replace(path, label)
        return {"param": params.get(problem.file, "training_file"), "line": problem.line, "message": message}

    errors = [entry(p) for p in report.errors]
    want, described = KINDS[kind]
    examples = {}
    for param, split in (("training_file", "train"), ("validation_file", "eval")):
        stats = report.stats.get(split)
        if stats is None:
            continue
        examples[param] = stats["examples"]
        if stats.get("records") not in (None, want):
            errors.append(
                {
                    "param": param,
                    "line": None,
                    "message": f"its examples are {stats['records']} records; a {kind} job trains on "
                    f"{described} per line",
                }
            )
    warnings = [entry(p) for p in report.warnings]
    return {
        "errors": errors[:most],
        "error_count": len(errors),
        "warnings": warnings[:most],
        "warning_count": len(warnings),
        "examples": examples,
    }


def auto_values(kind: str, given: dict, examples: int) -> dict:
    """The hyperparameters of a `kind` job on `examples` training examples, "auto" (or absent) resolved."""
    resolved = dict(given)
    if given.get("n_epochs", "auto") == "auto":
        resolved["n_epochs"] = auto_epochs(examples)
    if given.get("batch_size", "auto") == "auto":
        resolved["batch_size"] = max(1, min(256, round(0.002 * examples)))
    if given.get("learning_rate_multiplier", "auto") == "auto":
        resolved["learning_rate_multiplier"] = 1.0
    if kind == "dpo" and given.get("beta", "auto") == "auto":
        resolved["beta"] = 0.1
    if kind == "reinforcement":
        if given.get("compute_multiplier", "auto") == "auto":
            resolved["compute_multiplier"] = 1.0
        if given.get("eval_samples", "auto") == "auto":
            resolved["eval_samples"] = 64
    return resolved


def write_config(
    job: dict,
    db,
    path: Path,
    run_dir: Path,
    folder: Path,
    base_of: Callable[[str], str | None],
    processes: int = 1,
) -> Path:
    """The run config of `job` (its hyperparameters resolved, its run in `run_dir`), written to `path`; on
    `processes` processes each takes its share of the job's batch (`per_process_batch`)."""
    from tunelab.config import DEFAULT_LR, save_config, validate_run
    from tunelab.jobs.files import file_path

    kind = job["method"]["type"]
    hp = job["method"][kind]["hyperparameters"]
    mode = hp.get("tuning_mode", "lora")
    data: dict[str, Any] = {"train": str(file_path(folder, _stored(job, "training_file", db)))}
    if job.get("validation_file"):
        data["eval"] = str(file_path(folder, _stored(job, "validation_file", db)))
    if kind != "reinforcement":  # its rows are prompts, read as OpenAI's reinforcement format
        data.update(tool_template(Path(data["train"]), base_of(job["model"])))
    train: dict[str, Any] = {
        "epochs": hp["n_epochs"],
        "batch_size": per_process_batch(hp["batch_size"], processes),
        "seed": job["seed"],
        "lr": DEFAULT_LR[mode] * hp["learning_rate_multiplier"],
        "log_every": 1,
        "save_every": "epoch",
        "keep_checkpoints": 3,
        **({"eval_every": "epoch"} if job.get("validation_file") else {}),
        **({"report_to": ["wandb"]} if job.get("integrations") else {}),
    }
    raw = {
        "method": JOB_METHODS[kind],
        "model": base_of(job["model"]),
        "output_dir": str(run_dir),
        "data": data,
        "tuning": {
            "mode": mode,
            **(
                {
                    "lora": {
                        "r": hp.get("lora_rank", 16),
                        "alpha": 2 * hp.get("lora_rank", 16),
                        "target_modules": "all-linear",
                    }
                }
                if mode == "lora"
                else {}
            ),
        },
        "train": train,
    }
    if kind == "dpo":
        raw["dpo"] = {"beta": hp["beta"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "reinforcement":
        data["format"] = FORMATS[kind]
        raw["grpo"] = {
            "rewards": [f"{write_grader(job['method'][kind]['grader'], path.parent)}:reward"],
            "num_generations": max(2, round(GENERATIONS * hp["compute_multiplier"])),
            "max_new_tokens": COMPLETION_TOKENS,
            "eval_prompts": hp["eval_samples"],
        }
        if hp.get("eval_interval", "auto") != "auto" and job.get("validation_file"):
            train["eval_every"] = hp["eval_interval"]
    cfg = validate_run(raw, {}, path)
    save_config(cfg, path)
    return path


GRADER_MODULE = '''"""A reinforcement fine-tuning job's grader as a reward function (method grpo), written by tunelab
serve beside the job's grader.json: each completion graded against its row (the `item` of the templates)."""

import json
from pathlib import Path

from tunelab.eval.graders import grade

GRADER = json.loads((Path(__file__).parent / "grader.json").read_text(encoding="utf-8"))


def reward(prompts, completions, **columns):
    items = [{key: values[i] for key, values in columns.items()} for i in range(len(completions))]
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [grade(GRADER, text, item).reward for text, item in zip(texts, items)]
'''


def write_grader(grader: dict, folder: Path) -> Path:
    """The job's grader (checked when the job was created) and the reward module that applies it, in the
    job's folder; the module's path."""
    import json

    from tunelab.fs import atomic_write_text

    atomic_write_text(folder / "grader.json", json.dumps(grader, indent=1))
    atomic_write_text(folder / "grader.py", GRADER_MODULE)
    return folder / "grader.py"


def tool_template(train: Path, model: str | None) -> dict:
    """OpenAI's API has no template to choose: for rows that declare tools on a model whose own chat template
    takes none, the job trains with tunelab's ChatML template with Hermes-style calls (`data.template:
    hermes`), which the served `ft:` model then answers with; otherwise the model's own."""
    from tunelab.data.formats import iter_records
    from tunelab.data.records import Chat, Preference

    if model is None or not any(isinstance(r, (Chat, Preference)) and r.tools for r in iter_records(train)):
        return {}
    from transformers import AutoTokenizer

    from tunelab.models.resolve import resolve_model

    template = AutoTokenizer.from_pretrained(resolve_model(model, prepare=False)).chat_template or ""
    return {} if "tools" in template else {"template": "hermes"}


def wandb_environment(job: dict) -> dict[str, str]:
    """The environment that points the job's W&B run where its integration says."""
    for item in job.get("integrations") or []:
        settings = item["wandb"]
        env = {"WANDB_PROJECT": settings["project"]}
        if settings.get("name"):
            env["WANDB_NAME"] = settings["name"]
        if settings.get("entity"):
            env["WANDB_ENTITY"] = settings["entity"]
        if settings.get("tags"):
            env["WANDB_TAGS"] = ",".join(settings["tags"])
        return env
    return {}


def per_process_batch(batch_size: int, processes: int) -> int:
    """Examples per process and step, so that a step takes the job's batch_size in all (rounded up where
    it is not a multiple of the processes: each process takes the same number)."""
    return -(-batch_size // processes)


def _stored(job: dict, param: str, db) -> dict:
    file = db.file(job[param])
    if file is None:
        raise RequestError(
            400, f"{param} {job[param]}: the file was deleted before the job started", param, f"invalid_{param}"
        )
    return file


def _problem(problem: dict, file: dict, count: int) -> str:
    where = f"line {problem['line']}: " if problem["line"] else ""
    more = f" ({count - 1} more problems: `tunelab data validate` lists them all)" if count > 1 else ""
    return f"{file['id']} ({file['filename']}): {where}{problem['message']}{more}"
