"""Which weights train: `tuning.mode` full, lora (peft, DoRA too), freeze (last N blocks, or patterns), or
head (a classifier's new head only: a linear probe)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import torch

from tunelab.errors import UserError


class LoraSpec(Protocol):
    """What a LoRA adapter is made of (config.LoraConfig, the `tuning.lora:` section)."""

    @property
    def r(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def dropout(self) -> float: ...
    @property
    def target_modules(self) -> list[str]: ...
    @property
    def dora(self) -> bool: ...


class TuningSpec(Protocol):
    """Which weights train (config.TuningConfig, the `tuning:` section)."""

    @property
    def mode(self) -> str: ...
    @property
    def lora(self) -> LoraSpec: ...
    @property
    def train_last_layers(self) -> int | None: ...
    @property
    def trainable(self) -> list[str]: ...


def apply_tuning(
    model: torch.nn.Module, tuning: TuningSpec, head: Sequence[str] = (), task_type: str = "CAUSAL_LM"
) -> torch.nn.Module:
    """The model to train, with `requires_grad` set as `tuning` says.

    `head` names the parameters the task adds to the pretrained model (a classifier's head, which
    from_pretrained initialises): they train in every mode. `task_type` is peft's (CAUSAL_LM, SEQ_CLS,
    SEQ_2_SEQ_LM); with SEQ_CLS peft trains and saves the head beside the adapter.
    """
    if tuning.mode == "full":
        model.requires_grad_(True)
        return model
    if tuning.mode == "lora":
        return _lora(model, tuning.lora, task_type)
    if tuning.mode == "head" and not head:
        raise UserError("tuning.mode: head trains a classification head, and this model has none to train")
    if tuning.mode == "freeze":
        _freeze(model, tuning.train_last_layers, tuning.trainable)
    else:
        model.requires_grad_(False)
    names = set(head)
    for name, parameter in model.named_parameters():
        if name in names:
            parameter.requires_grad_(True)
    return model


def _lora(model: torch.nn.Module, lora: LoraSpec, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int in peft; it scales by alpha / r
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_dora=lora.dora,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft names the target modules it could not find
        raise UserError(f"tuning.lora.target_modules: {e}") from None


def _freeze(model: torch.nn.Module, last: int | None, patterns: list[str]) -> None:
    """Train the last `last` blocks (with the final norm after them) and parameters matching `patterns`."""
    model.requires_grad_(False)
    if last:
        blocks = transformer_blocks(model)
        if last > len(blocks):
            raise UserError(f"tuning.train_last_layers: {last}, but the model has {len(blocks)} blocks")
        for block in blocks[-last:]:
            block.requires_grad_(True)
        for name, module in model.named_modules():
            if name.endswith(("norm", "ln_f", "final_layernorm")) and not any(c in name for c in (".layers.", ".h.")):
                module.requires_grad_(True)  # the final norm: it shapes what the trained blocks feed the head
    if patterns:
        compiled = [re.compile(p) for p in patterns]
        matched = [p for n, p in model.named_parameters() if any(c.search(n) for c in compiled)]
        if not matched:
            raise UserError(f"tuning.trainable: no parameter name matches {patterns}")
        for parameter in matched:
            parameter.requires_grad_(True)


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: the longest ModuleList in it."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise UserError("tuning.train_last_layers: this model has no list of blocks to choose from")
    return max(lists, key=len)


def layer_lr_groups(model: torch.nn.Module, lr: float, decay: float | None) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: one at `lr`, or with a layer-wise decay
    (ULMFiT, ELECTRA) block k of L at lr * decay ** (L - 1 - k), the embeddings at lr * decay ** L, the
    rest (head, pooler, final norm) at lr. Lower layers hold more general features and move less."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not decay or decay == 1:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    blocks = transformer_blocks(model)
    depth = {id(p): k for k, block in enumerate(blocks) for p in block.parameters()}
    scales: dict[float, list] = {}
    for name, p in trainable:
        if id(p) in depth:
            scale = decay ** (len(blocks) - 1 - depth[id(p)])
        elif "embed" in name:
            scale = decay ** len(blocks)
        else:
            scale = 1.0
        scales.setdefault(scale, []).append(p)
    return [{"params": params, "lr": lr * scale} for scale, params in sorted(scales.items())]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def add_neftune(model: torch.nn.Module, alpha: float):
    """NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): while the
    model trains, its input embeddings get uniform noise in [-m, m], m = alpha / sqrt(L x d) (L the batch's
    sequence length, d the embedding width), as transformers' Trainer and TRL add it; evaluation and
    generation (eval mode) see none. Returns the hook's handle."""

    def noisy(module, inputs, output):
        if not module.training:
            return output
        magnitude = alpha / (output.size(1) * output.size(2)) ** 0.5
        return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)

    embeddings: torch.nn.Module = model.get_input_embeddings()  # type: ignore[operator]  # a transformers model
    return embeddings.register_forward_hook(noisy)
