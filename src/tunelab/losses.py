"""Losses: small pure functions of tensors, each tested against a reference computation."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from tunelab.data.render import IGNORE
from tunelab.precision import in_compute_dtype

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in fp32, whatever the vocabulary


def selective_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy over the trained positions only; their count; how many argmax hits.

    hidden: (B, T, H) last hidden states; labels: (B, T) aligned with the inputs, IGNORE where untrained.
    Position t predicts labels[t + 1]. The output layer runs only on the trained positions, and `chunk`
    of them at a time (`linear_cross_entropy`), so no (tokens x vocabulary) logits tensor is ever kept:
    with Gemma-3's 262k vocabulary, 1,000 trained tokens would hold 1 GB of fp32 logits (twice, with
    the softmax autograd saves). Summing (not averaging) lets the caller divide by the trained tokens
    of a whole accumulated batch. `softcap`: final logit soft-capping (Gemma-2), `cap * tanh(z / cap)`.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE  # (B, T-1)
    selected = hidden[:, :-1][keep]  # (N, H)
    targets = targets[keep]  # (N,)
    if chunk is None:  # SmolLM2 (49k vocabulary): 341 positions a chunk; Gemma-3 (262k): 64
        chunk = max(16, CHUNK_ELEMENTS // cast(torch.Tensor, head.weight).shape[0])
    if type(head) is torch.nn.Linear:
        stats = torch.zeros(1, dtype=torch.long)  # argmax hits, filled in by the forward
        grads = torch.is_grad_enabled()  # inside forward() it is always off, and needs_input_grad ignores it
        total = LinearCrossEntropy.apply(selected, head.weight, head.bias, targets, chunk, softcap, stats, grads)
        return total, targets.numel(), int(stats.item())
    total = hidden.new_zeros((), dtype=torch.float32)  # any other head (a peft-wrapped one): chunked autograd
    correct = 0
    for start in range(0, targets.numel(), chunk):
        logits = _capped(head(selected[start : start + chunk]).float(), softcap)  # (n, V)
        target = targets[start : start + chunk]
        total = total + F.cross_entropy(logits, target, reduction="sum")
        correct += int((logits.detach().argmax(-1) == target).sum())
    return total, targets.numel(), correct


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)), with the gradients computed chunk by chunk.

    torch has no fused linear + cross-entropy; autograd through a chunked loop still keeps every chunk's
    logits and softmax for the backward pass. Here each chunk's gradient (softmax - onehot) is turned
    into the gradients of `hidden` and `weight` right away and the logits are freed, so memory is one
    chunk of logits whatever the number of tokens, and no matmul is recomputed. Matmuls run in the
    autocast dtype when autocast is on; softmax and the loss in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, softcap, stats, grads):  # hidden (N, H), weight (V, H)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        h_all, w = hidden.to(dtype), in_compute_dtype(weight, dtype)
        grad_hidden = torch.zeros_like(hidden) if grads and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32)
            if grads and bias is not None and ctx.needs_input_grad[2]
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, targets.numel(), chunk):
                h, target = h_all[start : start + chunk], targets[start : start + chunk]
                logits = (h @ w.T).float()  # (n, V); the one big buffer, reused in place below
                if bias is not None:
                    logits += bias.float()
                tanh = None
                if softcap:
                    tanh = torch.tanh(logits / softcap)
                    logits = torch.mul(tanh, softcap, out=logits)
                # log-sum-exp by hand, in place: torch.logsumexp allocates a second (n x V) buffer, and the
                # max it takes anyway also says whether the target was the top prediction (argmax, a third pass)
                top = logits.amax(-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                stats += int((picked >= top).sum())
                e = logits.sub_(top[:, None]).exp_()
                sums = e.sum(-1)
                total += (top + sums.log() - picked).sum()
                if grad_hidden is None and grad_weight is None and grad_bias is None:
                    continue
                g = e.div_(sums[:, None])  # softmax: d loss / d logits = softmax - onehot
                g[torch.arange(len(target), device=g.device), target] -= 1
                if tanh is not None:  # soft-capped
                    g.mul_(1 - tanh**2)  # d(cap * tanh(z / cap)) / dz
                if grad_bias is not None:
                    grad_bias += g.sum(0)
                g = g.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = (g @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g.T @ h).float()
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        scale = grad_output.float()
        out = [
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.dtypes[0]),
            None if grad_bias is None else (grad_bias * scale).to(ctx.dtypes[1]),
        ]
        ctx.grads = None
        return (*out, None, None, None, None, None)


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return softcap * torch.tanh(logits / softcap) if softcap else logits


# --- preference losses ----------------------------------------------------------------------------------
# Each takes per-pair tensors (B,) and returns the per-pair loss (B,); the recipe averages. The rewards
# they imply (for the metrics: accuracy, margin) come from `implicit_rewards`.


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Reward-model loss: -log sigmoid(r_chosen - r_rejected - margin), per pair (InstructGPT; Llama 2 adds the margin)."""
    return -F.logsigmoid(chosen - rejected - margin)


def dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), per pair.

    The log-probs are each response's summed token log-probabilities under the policy and the
    frozen reference.
    """
    return -F.logsigmoid(beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)))


def simpo(chosen_avg_logps, rejected_avg_logps, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (avg_c - avg_r) - gamma), on the
    responses' mean token log-probabilities."""
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


def implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """DPO's implicit rewards beta * (log pi - log ref) of the chosen and the rejected responses (detached)."""
    return beta * (chosen_logps - ref_chosen_logps).detach(), beta * (rejected_logps - ref_rejected_logps).detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Pairwise accuracy (chosen scored strictly higher), mean margin, mean chosen and rejected reward."""
    return {
        "accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "margin": float((chosen_rewards - rejected_rewards).mean()),
        "chosen": float(chosen_rewards.mean()),
        "rejected": float(rejected_rewards.mean()),
    }


def sequence_log_probs(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its trained tokens, and their count: ((B,), (B,)).

    Row by row through `selective_cross_entropy`, so that no (tokens x vocabulary) logits tensor is kept
    for the backward pass, whatever the vocabulary.
    """
    sums, counts = [], []
    for b in range(hidden.shape[0]):
        total, count, _ = selective_cross_entropy(hidden[b : b + 1], head, labels[b : b + 1], softcap=softcap)
        sums.append(-total)
        counts.append(count)
    return torch.stack(sums), torch.tensor(counts, device=hidden.device)


@torch.no_grad()
def mean_token_entropy(
    hidden: torch.Tensor, head: torch.nn.Module, softcap: float | None = None, chunk: int = 256
) -> float:
    """The mean entropy (nats) of the next-token distributions at the rows of `hidden` (N, H), computed
    `chunk` positions at a time so that no (N x vocabulary) tensor is kept."""
    total = 0.0
    for start in range(0, hidden.shape[0], chunk):
        log_p = torch.log_softmax(_capped(head(hidden[start : start + chunk]).float(), softcap), dim=-1)
        total += float(-(log_p.exp() * log_p).sum())
    return total / max(hidden.shape[0], 1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) REINFORCE leave-one-out advantages (RLOO, Ahmadian et al. 2024): each reward minus the mean
    of the other k - 1 rewards of its group; the groups are consecutive runs of k (one prompt's samples)."""
    groups = rewards.view(-1, k)
    return (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).view(-1)
