"""The recipes: one module per method of `tunelab.methods`, `recipes/<name>.py`, with
`run(cfg, resume) -> summary`.

    from tunelab import recipes
    recipes.run(cfg, resume=False)

Recipes are leaves: nothing but this module imports one, and only when its method runs (so that reading a
config imports no recipe, and no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tunelab.methods import METHODS, Method  # noqa: F401  (re-exported: what the recipes are for)

if TYPE_CHECKING:
    from tunelab.config import RunConfig


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """Train as the run config `cfg` says (continue its run directory with `resume`); the summary."""
    return importlib.import_module(f"{__name__}.{cfg.method}").run(cfg, resume=resume)
