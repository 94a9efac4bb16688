"""RMSNorm with a hand-written backward, while a model trains on the CPU.

transformers' RMSNorm (Llama's, Gemma-3's) is six elementwise operations in fp32, and autograd keeps what
each needs for the backward pass: the fp32 input, the normalised row and, for a bf16 input (Gemma-3's
query and key norms), an fp32 copy of it. Gemma-3 has six norms a layer; on the CPU, where nothing fuses
elementwise operations, they cost memory and passes. Here the forward pass is the same operations in
the same order (the same output, bit for bit) and keeps only the input as given and one reciprocal RMS
per row; the backward pass recomputes the normalised row and applies the closed form
    dx = r * (g - x_hat * mean(g * x_hat)),  g = dy * w,  dw = sum(dy * x_hat)
(torch has no fused RMSNorm backward on the CPU; liger-kernel's is Triton, for GPUs).

`fused_norms(module)` swaps the forward of Llama-style (Llama, Mistral, Qwen2, Qwen3, Phi-3) and Gemma-style
(Gemma, Gemma-2, Gemma-3) RMSNorm layers for the duration; any other norm keeps its own.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, cast_before_scale: bool):
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        n = xf * r
        if cast_before_scale:  # Llama: weight * normed.to(input dtype)
            y = weight * n.to(x.dtype)
        else:  # Gemma: (normed * (offset + weight)).to(input dtype)
            y = (n * (offset + weight.float())).type_as(x)
        ctx.save_for_backward(x, weight, r)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        n = x.to(torch.float32) * r
        dyf = dy.to(torch.float32)
        g = dyf * (ctx.offset + weight.float())
        dx = r * (g - n * (g * n).mean(-1, keepdim=True))
        dw = (dyf * n).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dw, None, None, None


def _fused(layer, eps: float, offset: float, cast_before_scale: bool):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, layer.weight, eps, offset, cast_before_scale)

    return forward


# The classes whose forward is Llama's (weight * normed.to(input dtype)) or Gemma's ((normed * (1 + weight))
# .to(input dtype)), line for line; tests/test_families.py checks each family's against this backward.
LLAMA_STYLE = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")
GEMMA_STYLE = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


def _kind(layer) -> tuple[float, float, bool] | None:
    """(eps, weight offset, cast before scaling) for the RMSNorm classes whose forward this reproduces."""
    name = type(layer).__name__
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not name.endswith("RMSNorm"):
        return None
    if name in LLAMA_STYLE and weight.dtype == torch.float32:
        return float(layer.variance_epsilon), 0.0, True
    if name in GEMMA_STYLE:
        return float(layer.eps), 1.0, False
    return None


@contextmanager
def fused_norms(module: torch.nn.Module | None):
    """The RMSNorm layers of `module` with the hand-written backward for the duration (none: nothing)."""
    layers = []
    modules = [] if module is None else list(module.modules())
    for m in modules:
        # transformers >= 5.25 kernelizes a model again (the `kernels` package) on every train()/eval()
        # switch, and that pops any forward set on a layer: its kernelization is reset for the duration (the
        # hub has no CPU RMSNorm kernel; these norms are fused on the CPU only)
        reset = getattr(m, "reset_kernels", None) if getattr(m, "use_kernels", False) else None
        if callable(reset):
            reset()
    for m in modules:
        kind = _kind(m)
        if kind is not None:
            m.forward = _fused(m, *kind)
            layers.append(m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)  # back to the class's forward
