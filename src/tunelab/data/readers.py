"""Readers: a data file becomes a stream of rows, each with the line it starts on, or problems.

    for item in read_rows("train.jsonl.gz"):
        if isinstance(item, Problem): ...      # "train.jsonl.gz:7: invalid JSON: ..."
        else: item.value                         # a dict (or what the JSON line holds)

Formats: JSON (a list of records), JSONL, CSV and TSV (with or without a header), line-aligned
parallel text given as `path/train.{en,de}.gz`; any of them gzipped. A reader never raises for
what a file holds: it yields a `Problem` and goes on, so validation can report every bad line at once.
JSONL, CSV, TSV and parallel text are streamed line by line; a JSON list is read once, then each
element is decoded from the text in place, which keeps every element's line number.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, BinaryIO, cast

# Column names that mark the first row of a CSV/TSV as a header (when `header` is not given).
KNOWN_COLUMNS = {
    "text",
    "sentence",
    "sentence1",
    "sentence2",
    "text_pair",
    "label",
    "labels",
    "class",
    "category",
    "source",
    "target",
    "input",
    "output",
    "instruction",
    "prompt",
    "completion",
    "question",
    "answer",
    "context",
    "document",
    "summary",
    "dialogue",
    "premise",
    "hypothesis",
    "title",
    "description",
}
WHERE = re.compile(r"^(.*):(\d+)(?: \(record (\d+)\))?$")  # Row.where, parsed back
PARALLEL = re.compile(r"\{([^{},]+),([^{},]+)\}")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    message: str
    severity: str = "error"  # "warning": the example is skipped, the rest of the data is usable

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"

    @classmethod
    def at(cls, where: str, message: str, severity: str = "error") -> Problem:
        """A problem at a record's `where` (`file:line`, or `file:line (record N)` in a JSON list)."""
        match = WHERE.match(where)
        if not match:
            return cls(where, None, message, severity)
        file, line, record = match.groups()
        return cls(file, int(line), f"{message} (record {record})" if record else message, severity)


@dataclass(frozen=True)
class Row:
    file: str
    line: int
    value: Any
    record: int | None = None  # the element's index (from 1) in a JSON list, whose lines may be few

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" + (f" (record {self.record})" if self.record else "")


def read_rows(spec: str | Path, header: bool | None = None) -> Iterator[Row | Problem]:
    """Rows of the file (or parallel pair of files) `spec` names; `header` None = detect for CSV/TSV."""
    spec = str(spec)
    pair = parallel_paths(spec)
    if pair:
        yield from read_parallel(*pair)
        return
    path = Path(spec)
    if not path.is_file():
        yield Problem(spec, None, "no such file" if not path.exists() else "not a file")
        return
    kind = file_kind(path)
    if kind == "json":
        yield from read_json(path)
    elif kind == "jsonl":
        yield from read_jsonl(path)
    elif kind in ("csv", "tsv"):
        yield from read_table(path, "\t" if kind == "tsv" else ",", header)
    else:
        yield Problem(
            spec,
            None,
            "unknown file type: expected .json, .jsonl, .csv, .tsv (optionally .gz), "
            "or parallel text files written as path/train.{en,de}",
        )


def file_kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    return {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(last, last)


def parallel_paths(spec: str) -> tuple[Path, Path] | None:
    """`dir/train.{en,de}.gz` -> (dir/train.en.gz, dir/train.de.gz)."""
    match = PARALLEL.search(spec)
    if not match:
        return None
    before, after = spec[: match.start()], spec[match.end() :]
    return Path(before + match.group(1) + after), Path(before + match.group(2) + after)


def open_binary(path: Path) -> BinaryIO:
    if path.suffix.lower() == ".gz":
        return cast(BinaryIO, gzip.open(path, "rb"))  # a GzipFile: a binary file, though typeshed does not say so
    return open(path, "rb")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, problem or None) for each line, decoding UTF-8 line by line."""
    try:
        with open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8"), None
                except UnicodeDecodeError as e:
                    yield number, None, f"invalid UTF-8 (byte {e.start + 1} of the line)"
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        yield 0, None, f"cannot read the file ({e})"


def read_jsonl(path: Path) -> Iterator[Row | Problem]:
    yield from _json_lines(str(path), _decoded_lines(path))


def _json_lines(name: str, lines: Iterator[tuple[int, str | None, str | None]]) -> Iterator[Row | Problem]:
    for number, text, problem in lines:
        if problem:
            yield Problem(name, number or None, problem)
        elif text is not None and text.strip():
            try:
                yield Row(name, number, json.loads(text))
            except json.JSONDecodeError as e:
                yield Problem(name, number, f"invalid JSON: {e.msg} (column {e.colno})")


def read_json(path: Path) -> Iterator[Row | Problem]:
    """A JSON list of records; each element's line is where it starts."""
    name = str(path)
    try:
        with open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        yield Problem(name, None, f"cannot read the file ({e})")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield Problem(name, data.count(b"\n", 0, e.start) + 1, "invalid UTF-8")
        return
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos == len(text):
        return  # empty: the caller reports a file with no examples
    if text[pos] != "[":
        yield from _not_a_list(name, text, pos, decoder)
        return
    pos, line, counted, index = _skip_space(text, pos + 1), 1, 0, 0
    while pos < len(text) and text[pos] != "]":
        index += 1
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield Problem(name, e.lineno, f"invalid JSON: {e.msg} (column {e.colno}); the rest of the file is not read")
            return
        yield Row(name, line, value, index)
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            lineno = text.count("\n", 0, pos) + 1
            yield Problem(name, lineno, "invalid JSON: expected ',' or ']' after a list element")
            return
    if pos >= len(text):
        yield Problem(name, text.count("\n") + 1, "invalid JSON: the list is not closed with ']'")


def _not_a_list(name: str, text: str, pos: int, decoder: json.JSONDecoder) -> Iterator[Row | Problem]:
    """A .json file that is not a list: JSON Lines under another name, a wrapper object, or junk."""
    try:
        value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        yield Problem(name, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})")
        return
    if _skip_space(text, end) < len(text) and isinstance(value, dict):
        # More objects follow: this is JSON Lines in a .json file. Parse the text we have as such.
        yield from _json_lines(name, ((n, line, None) for n, line in enumerate(text.split("\n"), 1)))
        return
    lists = [k for k, v in value.items() if isinstance(v, list)] if isinstance(value, dict) else []
    if lists:
        key = lists[0]
        yield Problem(
            name,
            1,
            f"expected a JSON list of records, found an object whose {key!r} holds a list; "
            f"write that list out as the file (e.g. `jq '.{key}' {name} > records.json`)",
        )
    else:
        yield Problem(
            name, 1, f"expected a JSON list of records (or JSON Lines), found a single {type(value).__name__}"
        )


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_table(path: Path, delimiter: str, header: bool | None = None) -> Iterator[Row | Problem]:
    """CSV or TSV rows as dicts: by header name, or by column index ("0", "1", ...) without a header.

    TSV is read without quote handling: in the TSV files people share (GLUE's among them), a `"`
    is part of the text, not a quote.
    """
    name, names, start = str(path), None, 1
    try:
        with io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="") as text:
            reader = csv.reader(
                text, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            )
            for cells in reader:
                line, start = start, reader.line_num + 1
                if not cells or not any(c.strip() for c in cells):
                    continue
                if names is None and line == 1 and (header if header is not None else _looks_like_header(cells)):
                    names = [c.strip() for c in cells]
                    continue
                if names is not None and len(cells) != len(names):
                    yield Problem(name, line, f"expected {len(names)} columns ({', '.join(names)}), found {len(cells)}")
                    continue
                keys = names if names is not None else [str(i) for i in range(len(cells))]
                yield Row(name, line, dict(zip(keys, cells)))
    except UnicodeDecodeError:
        yield Problem(name, start, "invalid UTF-8; the rest of the file is not read")
    except (OSError, EOFError, csv.Error) as e:
        yield Problem(name, start, f"cannot read the file ({e})")


def _looks_like_header(cells: list[str]) -> bool:
    return any(c.strip().lower() in KNOWN_COLUMNS for c in cells)


def read_parallel(source: Path, target: Path) -> Iterator[Row | Problem]:
    """Line-aligned files: line N of `source` translates to line N of `target`."""
    missing = [p for p in (source, target) if not p.is_file()]
    if missing:
        for p in missing:
            yield Problem(str(p), None, "no such file (one side of a parallel pair)")
        return
    name = f"{source}+{target.name}"
    extra, longer = 0, None
    for left, right in zip_longest(_decoded_lines(source), _decoded_lines(target)):
        if left is None or right is None:
            extra, longer = extra + 1, target if left is None else source
            continue
        (number, src, p1), (_, tgt, p2) = left, right
        if problem := p1 or p2:
            yield Problem(str(source if p1 else target), number or None, problem)
        elif src is not None and tgt is not None:  # a line without a problem has its text
            yield Row(name, number, {"source": src.rstrip("\r\n"), "target": tgt.rstrip("\r\n")})
    if extra:
        yield Problem(str(longer), None, f"has {extra} more lines than the other side of the pair")
