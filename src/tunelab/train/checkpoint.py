"""Checkpoints: what a resumed run needs to continue exactly as if it had never stopped.

    checkpoints/step-00000040/
        trainable.safetensors   the trainable parameters (all of them in full fine-tuning, the adapter in LoRA)
        ema.safetensors         their moving average, where the run keeps one (train.ema_decay)
        state.pt                optimizer and scheduler state, torch RNG states (tensors and numbers only:
                                loaded with weights_only=True, never unpickled as objects)
        trainer.json            step, best metric and step, patience, logging window, tokens and time so far

A run sharded with FSDP (train.distributed fsdp) writes its checkpoints sharded, as each process holds
them, instead of trainable.safetensors and the optimizer's part of state.pt:

        sharded/                the trainable parameters and the optimizer state, each process's shards
                                (torch.distributed.checkpoint: .distcp files and their .metadata); a run
                                resumes from them on any number of processes

Gathering them into one process would take the whole model's state into its memory, which is what FSDP
is there to avoid. final/ is gathered, once, at the end.

Each is written into a temporary directory that is renamed into place when complete, so a run killed
at any moment leaves only whole checkpoints (and a stale temporary directory, removed next time).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunelab.errors import UserError
from tunelab.fs import atomic_dir, partial_prefix, remove_stale

PREFIX = "step-"
EMA_FILE = "ema.safetensors"
SHARDED = "sharded"


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


def save_sharded(
    folder: Path, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, trainer: dict
) -> None:
    """A sharded model's checkpoint: every process writes its shards of the trainable parameters and the
    optimizer state into one temporary directory, then the main one adds `state` and `trainer` and renames
    it into place. Every process calls this; `folder` must be on a filesystem they all share."""
    from contextlib import nullcontext

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = dist.get_rank() == 0
    if main:
        remove_stale(folder.parent, partial_prefix(folder.name))
    with atomic_dir(folder) if main else nullcontext() as tmp:
        where = [str(tmp) if main else None]
        dist.broadcast_object_list(where, src=0)  # the main process's temporary directory, for all
        dcp.save(_sharded_state(objective, optimizer, get_state_dict), checkpoint_id=Path(str(where[0])) / SHARDED)
        if main:
            torch.save(state, Path(str(tmp)) / "state.pt")
            (Path(str(tmp)) / "trainer.json").write_text(json.dumps(trainer, indent=1), encoding="utf-8")
    dist.barrier()  # the checkpoint is in place for every process


def load_sharded(folder: Path, objective: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint's trainable parameters (and the optimizer state) into a model sharded as
    the run's is, on any number of processes (torch.distributed.checkpoint reshards). Every process calls
    this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not (folder / SHARDED).is_dir():
        raise UserError(f"{folder}: not a sharded checkpoint; resume with the train.distributed the run started with")
    state = _sharded_state(objective, optimizer, get_state_dict)
    dcp.load(state, checkpoint_id=folder / SHARDED)
    set_model_state_dict(objective, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(objective, optimizer, state["optimizer"])


def _sharded_state(objective, optimizer, get_state_dict) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(ignore_frozen_params=True)  # LoRA's base stays out, as in trainable.safetensors
    if optimizer is None:
        return {"model": get_model_state_dict(objective, options=options)}
    model, optim = get_state_dict(objective, optimizer, options=options)
    return {"model": model, "optimizer": optim}


def load_trainable(folder: Path, model: torch.nn.Module, file: str = "trainable.safetensors") -> None:
    """Put a checkpoint's trainable parameters (or their average, `file=EMA_FILE`) back into `model`,
    built and tuned as the run did."""
    from safetensors.torch import load_file

    if (folder / SHARDED).is_dir():
        raise UserError(
            f"{folder}: an FSDP run's sharded checkpoint; resume it on several processes (tunelab train --resume "
            "RUN --processes N)"
        )
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
