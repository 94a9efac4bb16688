"""A data file, tokenised for one model and one set of data options: read, render, cached.

    data = tokenize_file("alpaca.json", tokenizer, DataOptions(max_length=512))
    data.examples     # [Example(input_ids, labels, where, status)]
    data.problems     # everything reading found (errors and warnings), each with file and line

The result is cached under `$TUNELAB_HOME/cache/data/`, keyed by a hash of the file's bytes, the
tokenizer's files and the options, so a second run (or a resumed one) reads it back instantly and any
change to the data, tokenizer, template or options makes a fresh entry. The cache holds only ids and
labels (safetensors) and JSON: nothing in it is unpickled.

A run reads its data through the functions below `read_records`: the records of the family its method
needs (pairs, labelled text, preferences, prompts), every error in the file reported at once, and the
seeded held-out split (`read_split` of the run's `Files`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tunelab.data.formats import load_records
from tunelab.data.options import DataOptions
from tunelab.data.readers import Problem, parallel_paths
from tunelab.data.records import Chat, Labeled, Pair, Preference, Prompt, message
from tunelab.data.render import Example, Renderer
from tunelab.errors import UserError
from tunelab.fs import atomic_dir, partial_prefix, remove_stale

CACHE_VERSION = 1  # bump whenever reading or rendering changes what a cached entry would hold
STATUSES = ("ok", "truncated", "dropped", "untrained", "invalid")


@dataclass
class Tokenized:
    examples: list[Example]
    problems: list[Problem] = field(default_factory=list)
    cached: bool = False

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def tokenize_file(spec: str | Path, tokenizer, options: DataOptions | None = None, cache: bool = True) -> Tokenized:
    """Instruction data (chat records, or source/target pairs as prompts) as examples for `tokenizer`."""
    options = options or DataOptions()
    renderer = renderer_for(tokenizer, options)
    folder = cache_dir() / cache_key(spec, tokenizer, renderer, options) if cache else None
    if folder is not None and (folder / "meta.json").is_file():
        return _load(folder)
    records, problems = load_records(spec, options.format, options.columns, options.header)
    chats = [r for r in records if isinstance(r, Chat)]
    pairs = [r for r in records if isinstance(r, Pair)]
    if len(chats) + len(pairs) < len(records):
        kind = type(next(r for r in records if not isinstance(r, (Chat, Pair)))).__name__
        raise UserError(
            f"{spec}: holds {kind} records; instruction-tuning needs instruction or chat data (or source/target pairs)"
        )
    examples = renderer.chats(chats) if chats else renderer.pairs(pairs, options.prompt)
    result = Tokenized(examples, problems)
    if folder is not None and not result.errors:
        _store(folder, result)
    return result


def renderer_for(tokenizer, options: DataOptions) -> Renderer:
    """The renderer the data options describe: one place that maps the `data.*` keys onto it."""
    return Renderer(tokenizer, options.template, options.max_length, options.train_on_inputs, options.truncation)


def cache_dir() -> Path:
    from tunelab.models.registry import tunelab_home

    return tunelab_home() / "cache" / "data"


def cache_key(spec: str | Path, tokenizer, renderer: Renderer, options: DataOptions) -> str:
    """sha256 of the data bytes, the tokenizer's files, the resolved template and the options."""
    digest = hashlib.sha256(f"tunelab-data-v{CACHE_VERSION}".encode())
    pair = parallel_paths(str(spec))
    for path in pair or (Path(spec),):
        _hash_file(digest, path)
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    tokenizer_files = sorted(folder.glob("tokenizer*")) + sorted(folder.glob("*.jinja")) if folder.is_dir() else []
    if not tokenizer_files:  # a tokenizer built in memory: hash what it is
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    for path in tokenizer_files:
        _hash_file(digest, path)
    settings = {**asdict(options), "template": renderer.template}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _hash_file(digest, path: Path) -> None:
    if not path.is_file():
        return  # a missing file: reading reports it, and nothing is stored for a failed read
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)


def _store(folder: Path, result: Tokenized) -> None:
    """ids and labels as flat int32 arrays with offsets (safetensors), the rest as JSON; atomically."""
    from safetensors.numpy import save_file

    remove_stale(folder.parent, partial_prefix(folder.name))
    lengths = [len(e.input_ids) for e in result.examples]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat: dict[str, np.ndarray] = {
        "input_ids": np.fromiter((t for e in result.examples for t in e.input_ids), np.int32, offsets[-1]),
        "labels": np.fromiter((t for e in result.examples for t in e.labels), np.int32, offsets[-1]),
        "offsets": offsets,
        "status": np.array([STATUSES.index(e.status) for e in result.examples], dtype=np.int8),
    }
    meta = {
        "where": [e.where for e in result.examples],
        "problem": [e.problem for e in result.examples],
        "problems": [asdict(p) for p in result.problems],
    }
    with atomic_dir(folder) as tmp:
        save_file(flat, str(tmp / "examples.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def _load(folder: Path) -> Tokenized:
    from safetensors.numpy import load_file

    flat = load_file(str(folder / "examples.safetensors"))
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    ids, labels, offsets = flat["input_ids"].tolist(), flat["labels"].tolist(), flat["offsets"].tolist()
    examples = [
        Example(ids[a:b], labels[a:b], where, STATUSES[status], problem)
        for a, b, where, status, problem in zip(
            offsets[:-1], offsets[1:], meta["where"], flat["status"].tolist(), meta["problem"]
        )
    ]
    return Tokenized(examples, [Problem(**p) for p in meta["problems"]], cached=True)


# --- a run's data: records of one family, errors reported at once, the held-out split ---------------------

SHOWN_PROBLEMS = 20  # problems listed in an error; `tunelab data validate` lists them all


def _raise_problems(errors: list, spec) -> None:
    shown = [str(p) for p in errors[:SHOWN_PROBLEMS]]
    if len(errors) > SHOWN_PROBLEMS:
        shown.append(f"... and {len(errors) - SHOWN_PROBLEMS} more (tunelab data validate {spec} lists them)")
    raise UserError(*shown)


def tokenized_for_training(spec: str, tokenizer, options: DataOptions) -> Tokenized:
    """`tokenize_file`, or a UserError naming every unreadable row and every example the template refused."""
    data = tokenize_file(spec, tokenizer, options)
    if data.errors:
        _raise_problems(data.errors, spec)
    invalid = [e for e in data.examples if e.status == "invalid"]
    if invalid:
        raise UserError(*[f"{e.where}: {e.problem}" for e in invalid[:SHOWN_PROBLEMS]])
    return data


def read_records(spec: str, options: DataOptions, kind: type | tuple[type, ...], need: str) -> list:
    """Every record of a data file read as `options` say (format, columns, header), all of type `kind`
    (else `need` says what the method needs); any error in the file is a UserError naming its lines."""
    records, problems = load_records(spec, options.format, options.columns, options.header)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        _raise_problems(errors, spec)
    other = next((r for r in records if not isinstance(r, kind)), None)
    if other is not None:
        raise UserError(f"{spec}: holds {type(other).__name__} records; {need}")
    return records


def read_pairs(spec: str, options: DataOptions) -> list[Pair]:
    return read_records(
        spec,
        options,
        Pair,
        "method task needs (source, target) pairs (e.g. dialogue/summary, "
        "source/target, or parallel text dir/train.{en,de})",
    )


def read_labeled(spec: str, options: DataOptions, label_names: dict | None = None) -> list[Labeled]:
    """The file's labelled records, labels renamed by `label_names` (data.label_names)."""
    records = read_records(
        spec,
        options,
        Labeled,
        "classification needs labelled text (text + label fields, or a CSV/TSV with data.columns)",
    )
    lookup = {str(k): v for k, v in (label_names or {}).items()}
    for r in records:
        r.label = lookup.get(str(r.label), r.label)
    return records


def read_preferences(spec: str, options: DataOptions, method: str) -> list[Preference]:
    return read_records(
        spec,
        options,
        Preference,
        f"method {method} needs preference pairs (prompt, chosen, "
        "rejected; or the OpenAI DPO, ShareGPT or HH-RLHF layouts)",
    )


def read_prompts(spec: str, options: DataOptions) -> list[list[dict]]:
    """The prompts of a data file (as messages, all of weight 0): {prompt} rows, a preference pair's
    prompt, or a conversation up to its last assistant turn."""
    return [p.messages for p in read_prompt_records(spec, options)]


def read_prompt_records(spec: str, options: DataOptions) -> list[Prompt]:
    """The prompts of a data file as `read_prompts` reads them, as Prompt records: with their rows' other
    columns ({prompt, answer} rows: {"answer": ...}; a pair or a conversation has none)."""
    records = read_records(
        spec,
        options,
        (Prompt, Preference, Chat),
        "online RL needs prompts: {prompt} rows, "
        "preference pairs, or conversations (their last assistant turn is left out)",
    )
    prompts = []
    for r in records:
        messages = r.prompt if isinstance(r, Preference) else r.messages
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if messages:
            cleaned = [message(m["role"], m["content"], 0) for m in messages]
            if isinstance(r, Prompt):
                prompts.append(Prompt(cleaned, r.where, r.columns, r.conversational))
            else:
                prompts.append(Prompt(cleaned, r.where))
    return prompts


@dataclass(frozen=True)
class Split:
    """How a run's training records are split (`RunConfig.split()`): `eval_split` of them held out (a
    fraction, or a count), then at most `max_examples` to train; the order seeded by `seed`."""

    eval_split: float | None = None
    max_examples: int | None = None
    seed: int = 0


def split_records(train: list, held_out: list, split: Split) -> tuple[list, list]:
    """data.eval_split held out of the training records (seeded by train.seed, so the same rows every
    time), then at most data.max_examples to train."""
    split_, limit = split.eval_split, split.max_examples
    if split_ is None and limit is None:
        return train, held_out
    order = list(range(len(train)))
    random.Random(split.seed).shuffle(order)
    if split_ is not None:
        n = round(split_ * len(train)) if split_ < 1 else int(split_)
        if not 0 < n < len(train):
            raise UserError(f"data.eval_split: {split_} leaves {n} of {len(train)} examples for evaluation")
        held_out, order = [train[i] for i in order[:n]], order[n:]
    return [train[i] for i in sorted(order[:limit])], held_out


@dataclass(frozen=True)
class Files:
    """A run's data files and how each is read (`RunConfig.files()`): data.train, data.eval (with
    data.eval_columns where given), and how the training records are split."""

    train: str
    eval: str | None
    options: DataOptions
    eval_options: DataOptions
    split: Split


def read_split(files: Files, read: Callable[[str, DataOptions], list]) -> tuple[list, list]:
    """(training records, held-out records) as `read` (read_pairs, read_prompts, ...) reads them: data.eval's
    held out, or data.eval_split of data.train's; at most data.max_examples to train."""
    held_out = read(files.eval, files.eval_options) if files.eval else []
    return split_records(read(files.train, files.options), held_out, files.split)


def preference_examples(files: Files, method: str, tokenizer) -> tuple[str | None, list, list]:
    """(the chat template, training pairs, held-out pairs): the preference records of `files`, each rendered
    as (chosen, rejected) examples; pairs longer than data.max_length are cut or dropped as data.truncation
    says."""
    train, held_out = read_split(files, lambda spec, options: read_preferences(spec, options, method))
    renderer = renderer_for(tokenizer, files.options)
    train_pairs = [p for p in renderer.preferences(train) if p[0].usable and p[1].usable]
    eval_pairs = [p for p in renderer.preferences(held_out) if p[0].usable and p[1].usable]
    if not train_pairs:
        raise UserError(f"{files.train}: no pair left to train on within data.max_length {files.options.max_length}")
    return renderer.template, train_pairs, eval_pairs


def class_names(records: list[Labeled]) -> list[str]:
    """The classes, in id order: integer labels sorted by value, names sorted alphabetically."""
    labels = {r.label for r in records}
    return [str(x) for x in sorted(labels, key=lambda x: (isinstance(x, str), x if isinstance(x, int) else 0, str(x)))]


def labeled_examples(records: list[Labeled], tokenizer, names: list[str], max_length: int, spec: str) -> list[Example]:
    """Labelled records as examples whose one label is the class id; a label outside `names` is an error."""
    label2id = {name: i for i, name in enumerate(names)}
    unknown = [r for r in records if str(r.label) not in label2id]
    if unknown:
        r = unknown[0]
        raise UserError(
            f"{r.where or spec}: label {r.label!r} does not occur in the training data "
            f"(classes: {', '.join(names)}); map it with data.label_names"
        )
    for r in records:
        r.label = str(r.label)
    return Renderer(tokenizer, "chat", max_length).labeled(records, label2id)
