"""Frozen weights held in the compute dtype while a model trains under autocast (`train.frozen_weights`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tunelab.precision import drop_compute_copy, hold_compute_copy
from tunelab.train.memory import forget_file_pages, release_freed_memory


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
    and when the loop ends (a merge, final/ and the final evaluation see the fp32 weights). Where the system
    can (Linux), the file's name is removed as soon as it is written and it is read back through its open
    descriptor, so that a training killed (a crash, `kill -9`, Gemma-3: 400 MB) leaves no file behind.

        with FrozenInComputeDtype(objective, torch.bfloat16) as frozen:
            ...train...
            with frozen.restored():
                ...evaluate in fp32...
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None):
        # without a compute dtype nothing is held (weights and tied stay empty), so float32 is never used
        self.dtype: torch.dtype = dtype or torch.float32
        self.file: str | None = None  # the frozen weights' fp32 values, while they are held in self.dtype
        self._opened: int | None = None  # its descriptor, once its name is gone
        self.module = module
        embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
        self.weights: dict[str, torch.nn.Parameter] = {}
        self.tied: dict[int, torch.nn.Parameter] = {}  # frozen output layers that are the embeddings
        seen = set()
        for name, m in module.named_modules():
            w = getattr(m, "weight", None)
            if (
                dtype is None
                or not isinstance(m, torch.nn.Linear)
                or w is None
                or w.requires_grad
                or w.dtype != torch.float32
                or id(w) in seen
            ):
                continue
            seen.add(id(w))
            if id(w) in embeddings:
                self.tied[id(w)] = w
            else:
                self.weights[name] = w

    def __enter__(self) -> FrozenInComputeDtype:
        spans = self._frozen_spans()  # before the casts: the linear weights' fp32 pages go too
        self._hold_copies()
        if self.weights:
            import tempfile

            from safetensors.torch import save_file

            with tempfile.NamedTemporaryFile(prefix="tunelab-frozen-", suffix=".safetensors", delete=False) as f:
                self.file = file = f.name
            save_file({name: w.data.contiguous() for name, w in self.weights.items()}, file)
            self._unlink_while_open()
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
            forget_file_pages(self._frozen_spans())

    def _frozen_spans(self) -> list[tuple[int, int]]:
        frozen = {id(t): t for t in [*self.module.parameters(), *self.module.buffers()] if not t.requires_grad}
        return [(t.data_ptr(), t.numel() * t.element_size()) for t in frozen.values()]

    def __exit__(self, *exc) -> None:
        import os

        self._drop_copies()
        if self.file is not None:
            self._to_fp32()
            if self._opened is None:
                os.unlink(self.file)
            else:
                os.close(self._opened)
                self._opened = None
            self.file = None

    def _unlink_while_open(self) -> None:
        import os

        assert self.file is not None
        opened = os.open(self.file, os.O_RDONLY)
        through = f"/proc/self/fd/{opened}"  # the open file by a name that needs no directory entry
        if not os.path.exists(through):  # (no /proc: the named file stays until the loop ends)
            os.close(opened)
            return
        os.unlink(self.file)
        self.file, self._opened = through, opened

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
        for w in self.tied.values():
            hold_compute_copy(w, self.dtype)

    def _drop_copies(self) -> None:
        for w in self.tied.values():
            drop_compute_copy(w)

    def _to_compute(self) -> None:
        for w in self.weights.values():
            w.data = w.data.to(self.dtype)
        release_freed_memory()

    def _to_fp32(self) -> None:
        from safetensors.torch import load_file

        assert self.file is not None  # only called while the weights are held
        saved = load_file(self.file)
        for name, w in self.weights.items():
            w.data = saved[name].to(w.device)
