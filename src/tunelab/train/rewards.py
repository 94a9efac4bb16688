"""Rewards written as Python functions by the user: `FILE.py:FUNCTION` in a run config (rlhf.reward_model,
grpo.rewards), loaded from the file the config names. That runs the user's own code, as the user's config
asks; a server never loads one on a client's say-so.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import UserError


def python_function(spec: str, key: str) -> Callable:
    """The function `spec` (FILE.py:NAME) names; a UserError naming the config `key` when it cannot be had."""
    path, _, name = spec.rpartition(":")
    if not Path(path).is_file():
        raise UserError(f"{key}: {path}: no such file")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"{key}: {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: say which one failed and how
        raise UserError(f"{key}: {path}: {type(e).__name__}: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{key}: {path} has no function {name!r}")
    return function
