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


_compute_copies: dict[int, torch.Tensor] = {}  # id(a frozen fp32 output layer tied to the embeddings) -> it in bf16


def in_compute_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`: the copy `FrozenInComputeDtype` holds of a frozen tied output layer, else a cast."""
    copy = _compute_copies.get(id(weight))
    return copy if copy is not None and copy.dtype == dtype else weight.to(dtype)


class FrozenInComputeDtype:
    """The frozen weights of a model's linear layers held in the compute dtype (bf16) while it trains under
    autocast, instead of fp32 (`train.frozen_weights: compute`, the default).

    Autocast casts a weight to bf16 at every use and caches the cast only for weights that train, so a
    frozen fp32 base (LoRA's, a freeze or head run's) is read and cast again by every micro-batch's forward,
    and held twice. Held in bf16 it is what autocast would have made of it, bit for bit: the losses and
    gradients are the same, with half the weights' memory and no cast. Embeddings (and a head tied to them)
    stay fp32, so the residual stream stays fp32 as under plain autocast; a frozen head tied to them gets a
    bf16 copy beside them (`in_compute_dtype`), which the loss would otherwise cast from the whole
    vocabulary's fp32 weights at every micro-batch (Gemma-3: 262k x 640). The fp32 values go to a temporary
    safetensors file and come back for whatever runs outside autocast (`restored()`: a method's evaluator)
    and when the loop ends (a merge, final/ and the final evaluation see the fp32 weights).

        with FrozenInComputeDtype(objective, torch.bfloat16) as frozen:
            ...train...
            with frozen.restored():
                ...evaluate in fp32...
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None):
        self.dtype, self.file, self.module = dtype, None, module
        embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
        self.weights: dict[str, torch.nn.Parameter] = {}
        self.tied: dict[int, torch.nn.Parameter] = {}  # frozen output layers that are the embeddings
        seen = set()
        for name, m in module.named_modules():
            w = getattr(m, "weight", None)
            if (dtype is None or not isinstance(m, torch.nn.Linear) or w is None or w.requires_grad
                    or w.dtype != torch.float32 or id(w) in seen):
                continue
            seen.add(id(w))
            if id(w) in embeddings:
                self.tied[id(w)] = w
            else:
                self.weights[name] = w

    def __enter__(self) -> FrozenInComputeDtype:
        from tunelab.train.memory import forget_file_pages

        spans = self._frozen_spans()  # before the casts: the linear weights' fp32 pages go too
        self._hold_copies()
        if self.weights:
            import tempfile

            from safetensors.torch import save_file

            with tempfile.NamedTemporaryFile(prefix="tunelab-frozen-", suffix=".safetensors", delete=False) as f:
                self.file = f.name
            save_file({name: w.data.contiguous() for name, w in self.weights.items()}, self.file)
            self._to_compute()
        if self.weights or self.tied:
            # transformers maps an fp32 checkpoint into memory, and reading every frozen weight once (for the
            # file and the copies above) made all of it resident: give back those pages; from here on only
            # what a batch reads is (rows of the embeddings). Gemma-3-270M: 1.07 GB of checkpoint.
            forget_file_pages(spans)
        return self

    def forget_read_pages(self) -> None:
        """Give back the checkpoint pages the frozen tensors still mapped from it were read into: each
        embedding lookup brings in the pages around its row too (the kernel maps 64 kB around a fault),
        so the resident part of Gemma-3's 671 MB embedding table grew by ~80 MB a step. The loop calls
        this after each optimizer step; it costs a system call."""
        if self.weights or self.tied:
            from tunelab.train.memory import forget_file_pages

            forget_file_pages(self._frozen_spans())

    def _frozen_spans(self) -> list[tuple[int, int]]:
        frozen = {id(t): t for t in [*self.module.parameters(), *self.module.buffers()] if not t.requires_grad}
        return [(t.data_ptr(), t.numel() * t.element_size()) for t in frozen.values()]

    def __exit__(self, *exc) -> None:
        self._drop_copies()
        if self.file is not None:
            import os

            self._to_fp32()
            os.unlink(self.file)
            self.file = None

    @contextmanager
    def restored(self):
        """The fp32 weights back for the duration (an evaluation outside autocast)."""
        self._drop_copies()
        if self.file is not None:
            self._to_fp32()
        try:
            yield
        finally:
            if self.file is not None:
                self._to_compute()
            self._hold_copies()

    def _hold_copies(self) -> None:
        for key, w in self.tied.items():
            _compute_copies[key] = w.detach().to(self.dtype)

    def _drop_copies(self) -> None:
        for key in self.tied:
            _compute_copies.pop(key, None)

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
