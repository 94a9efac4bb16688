"""The `data.*` options that decide what a file becomes, with their defaults: the one place they are set.

The run config's `data:` section (config.DataConfig, whose `options()` gives a file's DataOptions),
`tunelab data validate` and the renderer all take their defaults from `DEFAULTS`, so that a file validated
on its own renders as a run would render it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DataOptions:
    """How a data file is read (format, columns, header) and rendered (the rest); see `tunelab config keys`."""

    format: str = "auto"
    columns: dict[str, Any] | None = None
    header: bool | None = None
    template: str = "auto"
    max_length: int = 1024
    train_on_inputs: bool = False
    truncation: str = "keep_response"
    prompt: str = "{source}"  # source/target pairs: the user turn made from the source


DEFAULTS = DataOptions()
