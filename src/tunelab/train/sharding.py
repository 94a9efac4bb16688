"""FSDP: the model's weights, gradients and optimizer state sharded over the processes (`train.distributed:
fsdp`), with torch's own FSDP2 (`torch.distributed.fsdp.fully_shard`): gloo on CPUs, NCCL on GPUs, the
same code.

    shards = Shards(objective, model)     # after the process group is up, before the optimizer is made
    loss = shards.run(objective, **batch) # each block's weights gathered for its forward and backward
    final = shards.unsharded()            # every process calls it; the main one gets a plain model

Each transformer block is one FSDP unit, whole only while it computes. The rest (embeddings, head, final
norm, whatever else the method's objective holds) is the root unit, around an entry module through which
everything that runs the model goes: the objective's forward passes and the methods' evaluations, which
call the model their own way (`generate`, a classifier's forward), so the root's weights are whole
whatever the entry point (`shards.run(fn, ...)`). Parameters are plain fp32 (no FSDP mixed-precision
policy): autocast computes in bf16 as it does on one process, so the losses are the one-process run's.

A model cannot be un-sharded in place, so before sharding the main process keeps a copy of the model on
torch's meta device (shapes only, no memory); at the end the gathered weights fill it in, and that plain
model is what final/ and any merge see.
"""

from __future__ import annotations

import copy

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when it is sharded (every process must call this)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def block_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The model's stacks of transformer blocks: its longest ModuleLists (an encoder-decoder has two)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    longest = max((len(m) for m in lists), default=0)
    return [m for m in lists if len(m) == longest]


class Shards:
    """The objective sharded in place: every block of `model` its own FSDP unit, the objective the root."""

    def __init__(self, objective: torch.nn.Module, model: torch.nn.Module, device: torch.device):
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        self.objective, self.model = objective, model
        self.main = dist.get_rank() == 0
        objective.to(device)
        # DDP broadcasts the main process's weights when it wraps a model; FSDP keeps what each process
        # built, so the broadcast is done here (a seeded LoRA init is the same everywhere, but a custom one
        # need not be).
        with torch.no_grad():
            for tensor in [*objective.parameters(), *objective.buffers()]:
                dist.broadcast(tensor.data, src=0)
        # tied weights (a head that is the embeddings), by name, to tie them again in the plain copy
        self.ties = _tied_names(model)
        self.meta = _meta_copy(model) if self.main else None
        blocks = block_lists(model)
        if not blocks:
            raise ValueError("train.distributed fsdp: this model has no list of transformer blocks to shard")
        for stack in blocks:
            for block in stack:
                fully_shard(block)
        self.root = _Entry(objective)
        # the root too is resharded after each forward: else an evaluation (forward only) would leave its
        # weights gathered, and the module would hold them in place of the sharded ones the optimizer knows
        fully_shard(self.root, reshard_after_forward=True)

    def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` with the root's weights gathered (the blocks gather their own as they run);
        what returns carries the hooks that gather them again for its backward. Every process calls this
        with the same work."""
        return self.root(fn, *args, **kwargs)

    def unsharded(self) -> torch.nn.Module | None:
        """The model with its trained weights, unsharded: on the main process (None on the others). Every
        process must call this (the weights are gathered)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        model = self.meta
        assert model is not None  # kept on the main process
        model.load_state_dict(weights, assign=True, strict=False)  # a tied weight may come once: tied below
        own = dict(model.named_buffers())
        for name, buffer in self.model.named_buffers():  # non-persistent ones (rotary frequencies) too
            if name in own:
                _set(model, name, buffer.detach().cpu().clone(), buffer=True)
        for names in self.ties:
            tied = model.get_parameter(names[0])
            for name in names[1:]:
                _set(model, name, tied)
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"FSDP: weights the gathered state did not fill: {left[:3]}")
        return model


class _Entry(torch.nn.Module):
    """The root FSDP unit: holds the objective, and runs whatever it is given as its forward pass."""

    def __init__(self, objective: torch.nn.Module):
        super().__init__()
        self.objective = objective

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _tied_names(model: torch.nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose tensors are on the meta device: the structure, no memory."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _set(model: torch.nn.Module, name: str, tensor: torch.Tensor, buffer: bool = False) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if buffer:
        module._buffers[leaf] = tensor
    else:
        module._parameters[leaf] = tensor  # type: ignore[assignment]
