"""Which floating-point precision a run computes in: `train.precision`, with `auto` decided by the hardware.

bf16 autocast pays only where the hardware does bf16 matmuls natively: CUDA GPUs from Ampere on, and
CPUs with AMX or AVX-512 BF16 (a 1024x1024 matmul on an AVX-512 BF16 AMD EPYC of ours: 423 GFLOP/s
against 185 in fp32). Without them it is emulated and far slower: on an AVX2-only AMD EPYC a bf16
matmul ran at 0.84 GFLOP/s against 74 for fp32, so `auto` means fp32 there. The CPU check is oneDNN's
own (`_is_mkldnn_bf16_supported`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32: what autocast computes matmuls in (weights stay fp32)
    reason: str  # why, in words: "set by train.precision", "this CPU does bf16 natively (...)"


def resolve_precision(
    precision: str, device: torch.device | str = "cpu", setting: str = "train.precision"
) -> Precision:
    """The precision `precision` means on this device (`auto`: what the hardware does natively); `setting`
    names where it was set, for the reason (`train.precision`, or a flag such as `--precision`)."""
    if precision != "auto":
        return Precision(precision, f"set by {setting}")
    if torch.device(device).type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "this GPU has bf16")
        return Precision("fp16", "this GPU has no bf16; fp16 with loss scaling")
    if cpu_has_fast_bf16():
        return Precision("bf16", f"this CPU does bf16 natively ({torch.backends.cpu.get_cpu_capability()})")
    return Precision("fp32", f"this CPU emulates bf16 ({torch.backends.cpu.get_cpu_capability()}), fp32 is faster")


def runs_on(precision: Precision, device: torch.device | str = "cpu") -> str:
    """How a run computes, for its first lines: its precision and why, and on a CPU the memory allocator
    (docs/development.md#the-memory-allocator)."""
    from tunelab import allocator

    text = f"precision {precision.name} ({precision.reason})"
    return text if torch.device(device).type != "cpu" else f"{text}; memory allocator: {allocator.described()}"


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


_compute_copies: dict[int, torch.Tensor] = {}  # id(a frozen fp32 output layer tied to the embeddings) -> it in bf16


def in_compute_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`: the copy held of it (`hold_compute_copy`: a frozen tied output layer), else a cast."""
    copy = _compute_copies.get(id(weight))
    return copy if copy is not None and copy.dtype == dtype else weight.to(dtype)


def hold_compute_copy(weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Keep `weight` in `dtype` for `in_compute_dtype` (train.frozen.FrozenInComputeDtype, while it trains)."""
    _compute_copies[id(weight)] = weight.detach().to(dtype)


def drop_compute_copy(weight: torch.Tensor) -> None:
    _compute_copies.pop(id(weight), None)
