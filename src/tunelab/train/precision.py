"""Which floating-point precision a run computes in: `train.precision`, with `auto` decided by the hardware.

bf16 autocast pays only where the hardware does bf16 matmuls natively: CUDA GPUs from Ampere on, and
CPUs with AMX or AVX-512 BF16 (a 1024x1024 matmul on an AVX-512 BF16 AMD EPYC of ours: 423 GFLOP/s
against 185 in fp32). Without them it is emulated and far slower: on an AVX2-only AMD EPYC a bf16
matmul ran at 0.84 GFLOP/s against 74 for fp32, so `auto` means fp32 there. The CPU check is oneDNN's
own (`_is_mkldnn_bf16_supported`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32: what autocast computes matmuls in (weights stay fp32)
    reason: str  # why, in words: "set by train.precision", "this CPU does bf16 natively (...)"


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> Precision:
    """The precision `train.precision` means on this device (`auto`: what the hardware does natively)."""
    if precision != "auto":
        return Precision(precision, "set by train.precision")
    if torch.device(device).type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "this GPU has bf16")
        return Precision("fp16", "this GPU has no bf16; fp16 with loss scaling")
    if cpu_has_fast_bf16():
        return Precision("bf16", f"this CPU does bf16 natively ({torch.backends.cpu.get_cpu_capability()})")
    return Precision("fp32", f"this CPU emulates bf16 ({torch.backends.cpu.get_cpu_capability()}), fp32 is faster")


def training_device() -> str:
    """Where a run trains: the GPU when there is one (accelerate places the model there), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or oneDNN-less build: assume emulation
        return False


def autocast(precision: Precision | str, device: torch.device | str = "cpu"):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    dtype = compute_dtype(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def compute_dtype(precision: Precision | str) -> torch.dtype | None:
    """The dtype autocast computes in at `precision` (None for fp32: no autocast)."""
    if isinstance(precision, Precision):
        precision = precision.name
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class FrozenInComputeDtype:
    """The frozen weights of a model's linear layers held in the compute dtype (bf16) while it trains under
    autocast, instead of fp32 (`train.frozen_weights: compute`, the default).

    Autocast casts a weight to bf16 at every use and caches the cast only for weights that train, so a
    frozen fp32 base (LoRA's, a freeze or head run's) is read and cast again by every micro-batch's forward,
    and held twice. Held in bf16 it is what autocast would have made of it, bit for bit: the losses and
    gradients are the same, with half the weights' memory and no cast. Embeddings (and a head tied to them)
    stay fp32, so the residual stream stays fp32 as under plain autocast. The fp32 values go to a temporary
    safetensors file and come back for whatever runs outside autocast (`restored()`: a method's evaluator)
    and when the loop ends (a merge, final/ and the final evaluation see the fp32 weights).

        with FrozenInComputeDtype(objective, torch.bfloat16) as frozen:
            ...train...
            with frozen.restored():
                ...evaluate in fp32...
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None):
        self.dtype, self.file = dtype, None
        embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
        self.weights: dict[str, torch.nn.Parameter] = {}
        seen = set()
        for name, m in module.named_modules():
            w = getattr(m, "weight", None)
            if (dtype is None or not isinstance(m, torch.nn.Linear) or w is None or w.requires_grad
                    or w.dtype != torch.float32 or id(w) in embeddings or id(w) in seen):
                continue
            seen.add(id(w))
            self.weights[name] = w

    def __enter__(self) -> FrozenInComputeDtype:
        if self.weights:
            import tempfile

            from safetensors.torch import save_file

            with tempfile.NamedTemporaryFile(prefix="tunelab-frozen-", suffix=".safetensors", delete=False) as f:
                self.file = f.name
            save_file({name: w.data.contiguous() for name, w in self.weights.items()}, self.file)
            self._to_compute()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            import os

            self._to_fp32()
            os.unlink(self.file)
            self.file = None

    @contextmanager
    def restored(self):
        """The fp32 weights back for the duration (an evaluation outside autocast)."""
        if self.file is None:
            yield
            return
        self._to_fp32()
        try:
            yield
        finally:
            self._to_compute()

    def _to_compute(self) -> None:
        from tunelab.train.memory import release_freed_memory

        for w in self.weights.values():
            w.data = w.data.to(self.dtype)
        release_freed_memory()

    def _to_fp32(self) -> None:
        from safetensors.torch import load_file

        saved = load_file(self.file)
        for name, w in self.weights.items():
            w.data = saved[name].to(w.device)
