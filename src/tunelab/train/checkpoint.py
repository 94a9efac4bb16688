"""Checkpoints: what a resumed run needs to continue exactly as if it had never stopped.

    checkpoints/step-00000040/
        trainable.safetensors   the trainable parameters (all of them in full fine-tuning, the adapter in LoRA)
        ema.safetensors         their moving average, where the run keeps one (train.ema_decay)
        state.pt                optimizer and scheduler state, torch RNG states (tensors and numbers only:
                                loaded with weights_only=True, never unpickled as objects)
        trainer.json            step, best metric and step, patience, logging window, tokens and time so far

Each is written into a temporary directory that is renamed into place when complete, so a run killed
at any moment leaves only whole checkpoints (and a stale temporary directory, removed next time).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunelab.fs import atomic_dir, partial_prefix, remove_stale

PREFIX = "step-"
EMA_FILE = "ema.safetensors"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(
    folder: Path, model: torch.nn.Module, state: dict, trainer: dict, average: dict[str, torch.Tensor] | None = None
) -> Path:
    from safetensors.torch import save_file

    remove_stale(folder.parent, partial_prefix(folder.name))
    with atomic_dir(folder) as tmp:
        weights = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        if average is not None:
            save_file(average, str(tmp / EMA_FILE))
        torch.save(state, tmp / "state.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1), encoding="utf-8")
    return folder


def load_trainable(folder: Path, model: torch.nn.Module, file: str = "trainable.safetensors") -> None:
    """Put a checkpoint's trainable parameters (or their average, `file=EMA_FILE`) back into `model`,
    built and tuned as the run did."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / file))
    params = dict(model.named_parameters())
    missing = [name for name in saved if name not in params]
    if missing:
        raise RuntimeError(f"{folder}: parameters not in the model: {missing[:3]}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def load_state(folder: Path) -> tuple[dict, dict]:
    state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    trainer = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    return state, trainer


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are dot-named and never match)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if (p / "trainer.json").is_file())


def prune(root: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those at `keep_steps` (the best)."""
    checkpoints = list_checkpoints(root)
    for folder in checkpoints[: max(len(checkpoints) - keep_last, 0)]:
        if int(folder.name[len(PREFIX) :]) not in keep_steps:
            shutil.rmtree(folder, ignore_errors=True)
