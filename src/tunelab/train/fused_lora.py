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
same up to bf16 rounding (the sum is rounded once instead of three times). Outside the context (inference,
merging, saving) peft's own forward runs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _plain_lora_layers(module: torch.nn.Module) -> list:
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, LoraLinear) and type(m.base_layer) is torch.nn.Linear]


def _fused_forward(layer, original):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = layer.active_adapters
        if (
            args
            or kwargs
            or layer.disable_adapters
            or layer.merged
            or len(active) != 1
            or active[0] not in layer.lora_A
            or active[0] in layer.lora_variant
            or layer.lora_B[active[0]].bias is not None
        ):
            return original(x, *args, **kwargs)
        name = active[0]
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
def fused_lora(module: torch.nn.Module | None):
    """The plain LoRA linear layers of `module` computed fused for the duration (none: nothing changes)."""
    global _last_cast
    layers = [] if module is None else _plain_lora_layers(module)
    for layer in layers:
        layer.forward = _fused_forward(layer, layer.forward)
    try:
        yield len(layers)
    finally:
        _last_cast = (None,) * 5
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to the class's (peft's) forward
