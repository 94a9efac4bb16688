"""Model FLOPs utilisation of LoRA training: the FLOPs a training token needs (from the model's config), and
the machine's measured matmul peak to divide by.

    flops = lora_training_flops_per_token(folder, trained_fraction=0.6, r=16)
    peak = matmul_peak(torch.bfloat16)       # FLOP/s of a 2048 x 2048 matmul, median of 20
    mfu = tokens_per_s * flops / peak

The count is the useful work, as PaLM's MFU counts it (a recomputed forward under gradient checkpointing
is not counted): per token, the forward of every linear layer of the blocks (2 FLOPs a weight) and the
gradient of its input (2 more; the frozen weights need no weight gradient), attention's two matmuls
(QK^T and AV) over the causal context of a `seq_len` row, three times (forward and two backward), the
output layer on the trained positions only (its forward and the gradient of the hidden state: the
tied embedding is frozen), and the LoRA matmuls (forward, input gradient, weight gradient).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopCount:
    per_token: float  # FLOPs one real token of training costs (on average, at the trained fraction)
    linear: float  # of which: the blocks' linear layers (forward + input gradient)
    attention: float
    output: float
    lora: float


def lora_training_flops_per_token(folder, trained_fraction: float, r: int, seq_len: int = 512) -> FlopCount:
    """FLOPs per real token of LoRA training (all linear layers of the blocks adapted, rank `r`) of the
    causal LM in `folder`, built from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    weights = sum(m.in_features * m.out_features for m in linears)
    adapters = sum(r * (m.in_features + m.out_features) for m in linears)
    text = getattr(config, "text_config", config)
    layers = text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    width = text.num_attention_heads * head_dim  # of the queries (keys and values are shared by groups)
    context = (seq_len + 1) / 2  # the mean causal context of a full row
    linear = 4 * weights
    attention = 3 * layers * 2 * 2 * context * width
    output = 4 * head.in_features * head.out_features * trained_fraction
    lora = 6 * adapters
    return FlopCount(linear + attention + output + lora, linear, attention, output, lora)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 20) -> float:
    """FLOP/s of an n x n matmul in `dtype` on the CPU: the median of `repeats` timings after a warm-up (the
    best single timing swung from 0.7 to 2.0 TFLOP/s between runs on machine C; the median holds)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2]
