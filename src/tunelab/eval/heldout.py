"""Held-out instruction evaluation: tasks a model never trained on, scored as their benchmark does.

    tunelab eval runs/sft-gemma3-alpaca --suite ../shared/data/eval/super-natural-instructions/tasks
    tunelab eval gemma3-270m --suite ../shared/data/eval/super-natural-instructions/tasks   # the base model

Three formats are read: Super-NaturalInstructions task files (`Definition`, `Positive Examples`,
`Instances` with several reference outputs, `Categories`), Natural Instructions v1 task files (`Title`,
`Prompt`, `Definition`, `Things to Avoid`, `Examples`, `Instances`) and Self-Instruct's
user-oriented instructions (JSON Lines of `instruction` and `instances`, grouped by `motivation_app`).

Each instance is asked as Tk-Instruct's evaluation asks it (`src/ni_collator.py`): the definition,
k positive examples (0 by default), then "Now complete the following example - Input: ... Output:".
A model with a chat template gets that text as its user turn; a base model gets it raw. An answer
ends at the first line break (at the first blank line for Self-Instruct, whose answers span lines),
since a base model goes on after it. Scores follow
the benchmark's `eval/automatic/evaluation.py`: exact match after lower-casing and removing punctuation
and extra spaces (articles stay), ROUGE-L F1 with stemming, each the best over the references, as
percentages; averaged per task, per category and over all instances.

These suites are for evaluation only: never train or tune prompts or hyperparameters on them.
"""

from __future__ import annotations

import json
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import UserError

SUITE_FORMATS = ("sni", "ni-v1", "self-instruct")
# A base model does not stop by itself: after its answer it goes on ("Explanation: ...", the next
# example). Every model's output is cut at the first of these (an instruction-tuned model usually ends
# with EOS before any of them). No reference of the SNI or NI v1 tasks here spans two lines, so their
# answers end at the first line break; half of Self-Instruct's do (lists, letters): they end at a blank line.
STOP = {
    "sni": ("\n",),
    "ni-v1": ("\n",),
    "self-instruct": ("\n\n", "\nInput:", "\nOutput:", "\nNow complete the following example", "\nDefinition:"),
}


@dataclass
class Instance:
    id: str
    input: str
    references: list[str]


@dataclass
class HeldOutTask:
    name: str
    category: str
    definition: str
    demos: list[tuple[str, str]]  # positive examples, (input, output)
    instances: list[Instance] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------------------


def read_suite(path: str | Path) -> tuple[str, list[HeldOutTask]]:
    """(format, tasks) of a suite: a folder of task files, one task file, or a Self-Instruct .jsonl."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise UserError(f"{path}: no .json task files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"{path}: no such file or folder")
    if len(files) == 1 and files[0].suffix == ".jsonl":
        return "self-instruct", _read_self_instruct(files[0])
    tasks, formats = [], set()
    for f in files:
        kind, task = _read_task_file(f)
        formats.add(kind)
        tasks.append(task)
    if len(formats) > 1:
        raise UserError(f"{path}: mixes task formats ({', '.join(sorted(formats))}); give one suite per format")
    return formats.pop(), tasks


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def _read_task_file(path: Path) -> tuple[str, HeldOutTask]:
    data = _load_json(path)
    if not isinstance(data, dict) or "Instances" not in data or "Definition" not in data:
        raise UserError(
            f"{path}: not a task file (expected the fields Definition and Instances of "
            "Super-NaturalInstructions or Natural Instructions v1)"
        )
    instances = [_instance(path, i, row) for i, row in enumerate(data["Instances"])]
    if "Positive Examples" in data:  # Super-NaturalInstructions
        definition = data["Definition"]
        definition = definition[0] if isinstance(definition, list) else definition
        demos = [(e["input"], e["output"]) for e in data["Positive Examples"]]
        category = (data.get("Categories") or ["uncategorised"])[0]
        return "sni", HeldOutTask(path.stem, category, definition.strip(), demos, instances)
    # Natural Instructions v1: the instruction is spread over several fields; "-" means empty
    parts = [
        f"{key}: {str(data[key]).strip()}"
        for key in ("Definition", "Prompt", "Things to Avoid", "Emphasis & Caution")
        if str(data.get(key, "-")).strip() not in ("", "-")
    ]
    demos = [(e["input"], e["output"]) for e in data.get("Examples", {}).get("Positive Examples", [])]
    return "ni-v1", HeldOutTask(path.stem, data.get("Title", path.stem), "\n".join(parts), demos, instances)


def _instance(path: Path, i: int, row) -> Instance:
    if not isinstance(row, dict) or not isinstance(row.get("input"), str) or "output" not in row:
        raise UserError(f"{path}: Instances[{i}]: expected {{input, output}}")
    refs = row["output"] if isinstance(row["output"], list) else [row["output"]]
    if not refs or not all(isinstance(r, str) for r in refs):
        raise UserError(f"{path}: Instances[{i}].output: expected a string or a list of strings")
    return Instance(str(row.get("id", f"{path.stem}-{i}")), row["input"], refs)


def _read_self_instruct(path: Path) -> list[HeldOutTask]:
    tasks = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            instruction, rows = row["instruction"], row["instances"]
            instances = [
                Instance(f"{row.get('id', line_no)}-{k}", r["input"], [r["output"]]) for k, r in enumerate(rows)
            ]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{line_no}: expected {{instruction, instances: [{{input, output}}]}}") from None
        # each instruction is a task of its own; the app it was written for is its category
        tasks.append(
            HeldOutTask(
                str(row.get("id", line_no)),
                row.get("motivation_app", "uncategorised"),
                instruction.strip(),
                [],
                instances,
            )
        )
    if not tasks:
        raise UserError(f"{path}: no instructions in this file")
    return tasks


# --- prompting ----------------------------------------------------------------------------------------


def _period(text: str) -> str:
    """Tk-Instruct ends every field with a full stop unless it already ends in punctuation."""
    text = text.strip()
    return text if not text or text[-1] in string.punctuation else text + "."


def encode(task: HeldOutTask, instance: Instance, shots: int = 0) -> str:
    """The prompt text for one instance: Tk-Instruct's "definition + k positive examples" encoding.

    The final "Output:" has no trailing space (Tk-Instruct's T5 tokenizer dropped it; a BPE tokenizer
    would make a token of it that no answer starts with).
    """
    text = f"Definition: {_period(task.definition)}\n\n" if task.definition else ""
    for k, (demo_in, demo_out) in enumerate(task.demos[:shots]):
        text += f" Positive Example {k + 1} -\nInput: {_period(demo_in)}\n Output: {_period(demo_out)}\n\n"
    return text + f"Now complete the following example -\nInput: {_period(instance.input)}\nOutput:"


# --- scoring (Super-NaturalInstructions' eval/automatic/evaluation.py) ---------------------------------


PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces; unlike SQuAD, the articles stay."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(text.split())


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _scorer.score(reference, prediction)["rougeL"].fmeasure


def instance_scores(prediction: str, references: Sequence[str]) -> dict:
    """Exact match and ROUGE-L of one prediction: the best over its references, 0-100."""
    return {
        "exact_match": 100.0 * max(normalize_answer(prediction) == normalize_answer(r) for r in references),
        "rougeL": 100.0 * max(rouge_l(prediction, r) for r in references),
    }


def aggregate(rows: list[dict]) -> dict:
    """Mean scores over `rows` (each {task, category, exact_match, rougeL}): all, per task, per category."""

    def mean(group: list[dict]) -> dict:
        return {m: round(sum(r[m] for r in group) / len(group), 4) for m in ("exact_match", "rougeL")} | {
            "instances": len(group)
        }

    by_task, by_category = defaultdict(list), defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
        by_category[r["category"]].append(r)
    return {
        "overall": mean(rows) if rows else {"exact_match": 0.0, "rougeL": 0.0, "instances": 0},
        "per_task": {k: mean(v) for k, v in sorted(by_task.items())},
        "per_category": {k: mean(v) for k, v in sorted(by_category.items())},
    }


# --- running a model on a suite -----------------------------------------------------------------------


@dataclass
class SuiteOptions:
    shots: int = 0
    max_instances: int | None = None  # per task: the first N
    max_new_tokens: int = 64
    max_prompt_tokens: int = 1024
    batch_size: int = 32
    seed: int = 0
    prefix_cache: bool = True  # a task's shared definition computed once (the same answers, faster)
    quantize: str = "none"  # "int8": decode steps with int8 weights, as `tunelab serve --quantize int8`


def truncated_prompt_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The model's input for one prompt: through its chat template when it has one, else the raw text
    (`infer.prompts.encode_prompt`). A prompt over `max_tokens` loses the middle of its text, so that the
    definition and the closing "Output:" both stay."""
    from tunelab.infer.prompts import encode_prompt

    ids = encode_prompt(tokenizer, text)[0].tolist()
    if len(ids) > max_tokens:
        keep = max_tokens // 2
        ids = ids[:keep] + ids[len(ids) - (max_tokens - keep) :]
    return ids


def evaluate_suite(model, tokenizer, path: str | Path, options: SuiteOptions, description: str = "held-out") -> dict:
    """Generate for every instance of the suite at `path` and score it; the result dict of `tunelab eval --suite`."""
    from tunelab.infer.generate import BatchRequest, generate_batch
    from tunelab.infer.sampling import Sampling

    kind, tasks = read_suite(path)
    chosen = [(t, inst) for t in tasks for inst in t.instances[: options.max_instances]]
    texts = [encode(t, inst, options.shots) for t, inst in chosen]
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if encoder_decoder:
        ids = tokenizer(texts, truncation=True, max_length=options.max_prompt_tokens)["input_ids"]
    else:
        ids = [truncated_prompt_ids(tokenizer, text, options.max_prompt_tokens) for text in texts]
    # a task's instances share their definition: computed once per task (prefix caching)
    request = BatchRequest(
        Sampling(options.max_new_tokens, temperature=0.0, seed=options.seed, stop=list(STOP[kind])),
        batch_size=options.batch_size,
        prefix_cache=options.prefix_cache,
        description=description,
        quantize=options.quantize,
    )
    predictions = generate_batch(model, tokenizer, ids, request, groups=[t.name for t, _ in chosen])
    rows = []
    for (task, inst), prediction in zip(chosen, predictions):
        rows.append(
            {
                "task": task.name,
                "category": task.category,
                "id": inst.id,
                "prediction": prediction,
                "references": inst.references,
                **instance_scores(prediction, inst.references),
            }
        )
    return {
        "suite": str(path),
        "format": kind,
        "tasks": len(tasks),
        "shots": options.shots,
        "stop": STOP[kind],
        "prompt": "chat template" if (tokenizer.chat_template and not encoder_decoder) else "raw",
        "options": vars(options),
        "scores": aggregate(rows),
        "predictions": rows,
    }
