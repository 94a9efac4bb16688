"""No path of the server's machine in what it answers: the paths a response could carry (a job's run
config, a training error, a run's evaluation file) are replaced by what the client knows them by.

An uploaded file becomes `file-ID (name.jsonl)`, a job's run folder its job id, a served model's folder
the model's id, and the folders everything lives in a label: `<data>` (--data-dir), `<runs>` (--runs),
`$TUNELAB_HOME` and `~`. Applied by the server to every JSON answer of the dashboard, the files and
fine-tuning jobs API, and to every error, in one place (serve/app.py's guard).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

# a path inside a longer name is not that path: /srv/data must not match in /srv/database or /x/srv/data
_BEFORE, _AFTER = r"(?<![\w.~/-])", r"(?![\w.~-])"


class Redactor:
    def __init__(self, names: Callable[[], dict[Path, str]]):
        self.names = names  # path -> what a client is shown instead; read afresh for every answer

    def pattern(self) -> tuple[re.Pattern | None, dict[str, str]]:
        labels: dict[str, str] = {}
        for path, label in self.names().items():
            for spelling in {str(path), os.path.realpath(path)}:
                if spelling not in ("", "/", "."):
                    labels.setdefault(spelling.rstrip("/"), label)
        if not labels:
            return None, labels
        alternatives = "|".join(re.escape(p) for p in sorted(labels, key=len, reverse=True))  # the longest first
        return re.compile(f"{_BEFORE}(?:{alternatives}){_AFTER}"), labels

    def value(self, value):
        """`value` (JSON: dicts, lists, strings) with every known path in its strings replaced."""
        pattern, labels = self.pattern()
        return value if pattern is None else _walk(value, lambda s: pattern.sub(lambda m: labels[m.group(0)], s))

    def json_bytes(self, body: bytes) -> bytes:
        if b"/" not in body:  # no path can be in it: the metrics rows a page polls for, most errors
            return body
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            return body
        return json.dumps(self.value(value), ensure_ascii=False, separators=(",", ":")).encode()


def _walk(value, replace: Callable[[str], str]):
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, dict):
        return {replace(k): _walk(v, replace) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, replace) for v in value]
    return value
