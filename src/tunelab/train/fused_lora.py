"""LoRA layers computed in fewer passes over their activations while a model trains.

peft's `lora.Linear.forward` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: under autocast
that casts `x` to the compute dtype twice (once for the base layer, once for lora_A), then writes the
(tokens x out) low-rank product, multiplies it by the scaling and adds it to the base output: three more
passes over a (tokens x out) tensor forward and as many in the backward pass. On the CPU those passes,
not the matmuls, are what a LoRA layer costs beyond the base layer (SmolLM2-135M, 512-token rows, machine
C: the casts and elementwise multiplies and adds were a quarter of an optimizer step).

`fused_lora(module)` swaps, for the duration, the forward of every plain LoRA linear layer (one active
adapter, not merged, no DoRA or other variant, an `nn.Linear` base) for one that casts `x` once and adds
the low-rank product into the base output inside the matmul: `addmm(base(x), lora_A(x), lora_B.T,
alpha=scaling)`. The weights, the saved adapter and what peft loads are unchanged; the outputs are the
same up to bf16 rounding (the sum is rounded once instead of three times). Layers that read the same
input (q, k and v; gate and up) are computed as one: `Siblings`. Outside the context (inference, merging,
saving) peft's own forward runs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tunelab.infer.steps import shared_rows


def _plain_lora_layers(module: torch.nn.Module) -> list:
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, LoraLinear) and type(m.base_layer) is torch.nn.Linear]


def _live_adapter(layer) -> str | None:
    """The one adapter `layer` computes with now, where the fused forward can compute it (else peft does)."""
    active = layer.active_adapters
    if (
        layer.disable_adapters
        or layer.merged
        or len(active) != 1
        or active[0] not in layer.lora_A
        or active[0] in layer.lora_variant
        or layer.lora_B[active[0]].bias is not None
    ):
        return None
    return active[0]


def _fused_forward(layer, original, siblings: Siblings | None = None):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else _live_adapter(layer)
        if name is None:
            return original(x, *args, **kwargs)
        if siblings is not None and (out := siblings.output(layer, x)) is not None:
            return out
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = _cast(x, torch.get_autocast_dtype(device))
        base = layer.base_layer(x)
        low = layer.lora_A[name](layer.lora_dropout[name](x))
        out = torch.addmm(
            base.reshape(-1, base.shape[-1]),
            low.reshape(-1, low.shape[-1]),
            layer.lora_B[name].weight.t(),
            alpha=layer.scaling[name],
        )
        return out.view(base.shape)

    return forward


class _SiblingLinear(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T for the siblings i, in x's dtype: forward one matmul by their
    weights side by side, one by their A matrices stacked, and one adding the block-diagonal product of their
    B matrices; backward per sibling, from each output's own gradient. (Autograd over the same forward would
    concatenate the outputs' gradients into one tokens x 3072 tensor for gate and up, a copy, and multiply it
    by the 3072 x 576 weights in one matmul, which oneDNN runs at half the speed of two 1536-deep ones on
    machine C: 2.1 ms against 2 x 0.66 for SmolLM2's 512-token rows.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, scalings, *adapters):
        dtype = x.dtype
        weight = weight.to(dtype)  # no copy where the frozen weights are held in the compute dtype
        a = torch.cat(adapters[0::2]).to(dtype)
        bs = [b.to(dtype) for b in adapters[1::2]]
        low = x @ a.t()
        out = x @ weight.t() if bias is None else torch.addmm(bias.to(dtype), x, weight.t())
        out.addmm_(low, torch.block_diag(*(b * s for b, s in zip(bs, scalings))).t())
        ctx.save_for_backward(x, weight, low, a, *bs)
        ctx.sizes, ctx.scalings = sizes, scalings
        ctx.ranks = [m.shape[0] for m in adapters[0::2]]
        ctx.dtypes = [m.dtype for m in adapters]
        return out.split(sizes, dim=1)

    @staticmethod
    def backward(ctx, *grads):
        x, weight, low, a, *bs = ctx.saved_tensors
        grad_x, grad_lows, grad_bs = None, [], []
        weights = weight.split(ctx.sizes)
        for g, w, b, scaling, low_i in zip(grads, weights, bs, ctx.scalings, low.split(ctx.ranks, dim=1)):
            if g is None:
                g = x.new_zeros(x.shape[0], w.shape[0])
            g = g.to(x.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
            grad_lows.append((g @ b).mul_(scaling))
            grad_bs.append((g.t() @ low_i).mul_(scaling))
        grad_low = torch.cat(grad_lows, dim=1)
        if grad_x is not None:
            grad_x.addmm_(grad_low, a)
        grad_as = (grad_low.t() @ x).split(ctx.ranks)
        adapters = [g for pair in zip(grad_as, grad_bs) for g in pair]
        return grad_x, None, None, None, None, *(g.to(d) for g, d in zip(adapters, ctx.dtypes))


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # read one input, one after another


class Siblings:
    """LoRA layers that read the same input one after another (an attention block's q, k and v; an MLP's
    gate and up) computed as one (`_SiblingLinear`): the first of them called computes all, the others take
    their part. SmolLM2's q, k and v forward are then one 576 x 960 matmul and one of rank 48 where they
    were three of each and three additions; the input's gradient is summed inside the matmuls. Per layer
    (its projections and MLP, 512-token rows, forward and backward, bf16 on machine C) 12.6-14.4 ms against
    14.6-16.2 with each layer alone.

    The frozen weights become views of one buffer (no copy is kept): fused the first time they are used,
    and again whenever something replaced them (the fp32 weights restored for an evaluation); tensors of
    their own again when the context ends. A group that ever sees a sibling called with another input (a
    cross-attention's k and v read the encoder's output) computes each layer alone from then on."""

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.apart = False  # called with different inputs once: each layer computes alone
        self.waiting: dict[int, torch.Tensor] = {}  # id(layer) -> its output, computed for the input below
        self.input: tuple = (None, None, None)  # (the tensor, its version, grad mode)

    @classmethod
    def of(cls, module: torch.nn.Module, layers: list) -> list[Siblings]:
        """The groups among `layers` (children of one module of `module`, named as in SIBLINGS) whose frozen
        weights can be one: plain parameters in one dtype and device, and no dropout on the adapters' input."""
        plain = {id(m) for m in layers}
        groups = []
        for parent in module.modules():
            for names in SIBLINGS:
                members = [getattr(parent, n, None) for n in names]
                if all(id(m) in plain for m in members) and cls._joinable(members):
                    groups.append(cls(members))
        return groups

    @staticmethod
    def _joinable(layers: list) -> bool:
        weights = [m.base_layer.weight for m in layers]
        return (
            all(type(w) is torch.nn.Parameter and not w.requires_grad for w in weights)
            and all(m.base_layer.bias is None or not m.base_layer.bias.requires_grad for m in layers)
            and len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1
            and all(isinstance(d, torch.nn.Identity) for m in layers for d in m.lora_dropout.values())
        )

    def output(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s output for `x`: computed with its siblings', or waiting since they were (None: alone)."""
        if self.apart:
            return None
        source, version, grad = self.input
        now = (None if x.is_inference() else x._version, torch.is_grad_enabled())
        if self.waiting:
            if source is x and (version, grad) == now and id(layer) in self.waiting:
                out = self.waiting.pop(id(layer))
                if not self.waiting:
                    self.input = (None, None, None)
                return out
            self.apart = True  # a sibling read another input: they are not siblings here
            self.waiting, self.input = {}, (None, None, None)
            return None
        live = [_live_adapter(m) for m in self.layers]
        names = [name for name in live if name is not None]
        if len(names) < len(live):
            return None
        outs = self._forward(x, names)
        self.waiting = {id(m): out for m, out in zip(self.layers, outs) if m is not layer}
        self.input = (x, *now)
        return outs[self.layers.index(layer)]

    def _forward(self, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = _cast(x, torch.get_autocast_dtype(device))
        bases = [m.base_layer for m in self.layers]
        bias = None
        if any(m.bias is not None for m in bases):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in bases])
        adapters = [w for m, n in zip(self.layers, names) for w in (m.lora_A[n].weight, m.lora_B[n].weight)]
        sizes = tuple(m.out_features for m in bases)
        scalings = tuple(float(m.scaling[n]) for m, n in zip(self.layers, names))
        with torch.autocast(device, enabled=False):
            outs = _SiblingLinear.apply(x.reshape(-1, x.shape[-1]), self.weight(), bias, sizes, scalings, *adapters)
        return [out.view(*x.shape[:-1], size) for out, size in zip(outs, sizes)]

    def weight(self) -> torch.Tensor:
        """The siblings' frozen weights side by side, one tensor over their shared storage (fused first where
        they are not: the first call, or after something replaced them)."""
        weights = [m.base_layer.weight for m in self.layers]
        first = weights[0]
        offset, rows = first.storage_offset(), 0
        for w in weights:
            if not (
                w.is_contiguous()
                and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                and w.storage_offset() == offset + rows * w.shape[1]
            ):
                return shared_rows(weights)
            rows += w.shape[0]
        return torch.as_strided(first.detach(), (rows, first.shape[1]), (first.shape[1], 1), offset)

    def separate(self) -> None:
        """Each frozen weight in a tensor of its own again (what saving and merging expect)."""
        weights = [m.base_layer.weight for m in self.layers]
        if len({w.untyped_storage().data_ptr() for w in weights}) < len(weights):
            for w in weights:
                w.data = w.data.clone()
        self.waiting, self.input = {}, (None, None, None)


_last_cast: tuple = (None,) * 5  # (source, its version, grad mode, dtype, cast): sibling layers read one input


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, cast once for the layers that read the same input one after another (q, k and v;
    gate and up). Their gradients then add up in `dtype` before the one cast back, as a bf16 model's do."""
    global _last_cast
    if x.dtype == dtype:
        return x
    if x.is_inference():  # inference_mode tensors have no version counter to tell a changed input by
        return x.to(dtype)
    grad = torch.is_grad_enabled()
    source, version, mode, kind, cast = _last_cast
    if source is x and version == x._version and mode == grad and kind == dtype:
        return cast
    cast = x.to(dtype)
    _last_cast = (x, x._version, grad, dtype, cast)
    return cast


@contextmanager
def fused_lora(module: torch.nn.Module | None, siblings: bool = True):
    """The plain LoRA linear layers of `module` computed fused for the duration (none: nothing changes);
    `siblings`: layers that read one input computed as one (`Siblings`; off where the weights are sharded)."""
    global _last_cast
    layers = [] if module is None else _plain_lora_layers(module)
    groups = Siblings.of(module, layers) if module is not None and siblings else []
    group_of = {id(m): group for group in groups for m in group.layers}
    for layer in layers:
        layer.forward = _fused_forward(layer, layer.forward, group_of.get(id(layer)))
    try:
        yield len(layers)
    finally:
        _last_cast = (None,) * 5
        for group in groups:
            group.separate()
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to the class's (peft's) forward
