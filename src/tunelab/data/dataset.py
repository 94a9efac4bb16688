"""A data file, tokenised for one model and one set of data options: read, render, cached.

    data = tokenize_file("alpaca.json", tokenizer, DataOptions(max_length=512))
    data.examples     # [Example(input_ids, labels, where, status)]
    data.problems     # everything reading found (errors and warnings), each with file and line

The result is cached under `$TUNELAB_HOME/cache/data/`, keyed by a hash of the file's bytes, the
tokenizer's files and the options, so a second run (or a resumed one) reads it back instantly and any
change to the data, tokenizer, template or options makes a fresh entry. The cache holds only ids and
labels (safetensors) and JSON: nothing in it is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.formats import load_records
from tunelab.data.readers import Problem, parallel_paths
from tunelab.data.records import Chat, Pair
from tunelab.data.render import Example, Renderer
from tunelab.errors import UserError
from tunelab.fs import atomic_dir, partial_prefix, remove_stale

CACHE_VERSION = 1  # bump whenever reading or rendering changes what a cached entry would hold
STATUSES = ("ok", "truncated", "dropped", "untrained", "invalid")


@dataclass
class DataOptions:
    """The `data.*` keys that decide what a file becomes (see `tunelab config keys`)."""

    format: str = "auto"
    columns: dict[str, Any] | None = None
    header: bool | None = None
    template: str = "auto"
    max_length: int = 1024
    train_on_inputs: bool = False
    truncation: str = "keep_response"
    prompt: str = "{source}"  # source/target pairs: the user turn made from the source

    @classmethod
    def from_config(cls, data) -> DataOptions:
        """From a `DataConfig` (the `data:` section of a run config)."""
        keys = cls.__dataclass_fields__.keys() & type(data).model_fields.keys()
        return cls(**{k: getattr(data, k) for k in keys})


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
        raise UserError(f"{spec}: holds {kind} records; instruction-tuning needs instruction or chat data "
                        "(or source/target pairs)")  # fmt: skip
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
    flat = {
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
