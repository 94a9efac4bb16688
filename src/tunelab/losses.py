"""Losses: small pure functions of tensors, each tested against a reference computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.render import IGNORE


def selective_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int = 4096, softcap: float | None = None
) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy over the trained positions only; their count; how many argmax hits.

    hidden: (B, T, H) last hidden states; labels: (B, T) aligned with the inputs, IGNORE where untrained.
    Position t predicts labels[t + 1]. The output layer runs only on the trained positions, `chunk` at a
    time, so the (B*T, vocabulary) logits tensor never exists: with Gemma-3's 262k vocabulary and an
    Alpaca batch of 1,024 tokens of which ~30% are trained, that is 1 GB of fp32 logits not made.
    Summing (not averaging) lets the caller divide by the trained tokens of a whole accumulated batch.
    `softcap`: the final logit soft-capping of models that have it (Gemma-2), `cap * tanh(logits / cap)`.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE  # (B, T-1)
    selected = hidden[:, :-1][keep]  # (N, H)
    targets = targets[keep]  # (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    for start in range(0, targets.numel(), chunk):
        logits = head(selected[start : start + chunk]).float()  # (n, V), softmax in fp32
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        target = targets[start : start + chunk]
        total = total + F.cross_entropy(logits, target, reduction="sum")
        correct += int((logits.detach().argmax(-1) == target).sum())
    return total, targets.numel(), correct
