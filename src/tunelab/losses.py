"""Losses: small pure functions of tensors, each tested against a reference computation."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from tunelab.data.render import IGNORE
from tunelab.precision import in_compute_dtype

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in fp32 (the cross-entropy's: up to a 131k vocabulary)
# the cross-entropy's rows a chunk at the least: fewer, and its (rows x vocabulary) matmul runs slower
# (Gemma-3's 262k-column head on machine A: 300 GFLOP/s with 64 rows, 344 with 128; its whole LoRA step on
# machine C: 1.04-1.09x)
MIN_CHUNK = 128
TAIL = 2.0**-12  # probabilities below it are sampled: 16x under the smallest p that bf16 can still add to 1


def selective_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk: int | None = None,
    softcap: float | None = None,
    tail: float | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy over the trained positions only; their count; how many argmax hits.

    hidden: (B, T, H) last hidden states; labels: (B, T) aligned with the inputs, IGNORE where untrained.
    Position t predicts labels[t + 1]. The output layer runs only on the trained positions, and `chunk`
    of them at a time (`linear_cross_entropy`), so no (tokens x vocabulary) logits tensor is ever kept:
    with Gemma-3's 262k vocabulary, 1,000 trained tokens would hold 1 GB of fp32 logits (twice, with
    the softmax autograd saves). Summing (not averaging) lets the caller divide by the trained tokens
    of a whole accumulated batch. `softcap`: final logit soft-capping (Gemma-2), `cap * tanh(z / cap)`.
    `tail`: the hidden states' gradient estimated from the vocabulary's sampled tail (`LinearCrossEntropy`)
    where the output layer is frozen and its matmuls run in bf16/fp16 on the CPU; None: exact.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE  # (B, T-1)
    selected = hidden[:, :-1][keep]  # (N, H)
    targets = targets[keep]  # (N,)
    if chunk is None:  # SmolLM2 (49k vocabulary): 341 positions a chunk; Gemma-3 (262k): 128
        chunk = max(MIN_CHUNK, CHUNK_ELEMENTS // cast(torch.Tensor, head.weight).shape[0])
    if type(head) is torch.nn.Linear:
        stats = torch.zeros(1, dtype=torch.long)  # argmax hits, filled in by the forward
        grads = torch.is_grad_enabled()  # inside forward() it is always off, and needs_input_grad ignores it
        total = LinearCrossEntropy.apply(selected, head.weight, head.bias, targets, chunk, softcap, stats, grads, tail)
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

    `tail` (a probability, e.g. `TAIL`): with a frozen output layer the backward pass is one matmul, the
    chunk's (n x V) softmax gradient by the (V x H) weights, as costly as the forward's logits; yet almost
    all of the V columns are probabilities far below bf16's resolution (Gemma-3 on Alpaca: 2,300 of its
    262k columns hold a probability above 2^-12 in a 64-position chunk). Dropping them (Cut Cross-Entropy's
    gradient filtering, Wijmans et al. 2024) biases the gradient: their many small terms all point one
    way (measured: 1.3% of the probability mass, a 2% error, 16% in the chunk's mean gradient). Here each
    column is kept with probability min(1, p_max / tail), p_max its largest probability in the chunk, and
    scaled by the inverse: an unbiased estimate that keeps every column above `tail` exactly and samples
    the rest, each sampled entry at most `tail`. Measured there: 4,100 columns a chunk, 0.20% error against
    the fp32 gradient, the exact bf16 matmul's own rounding being 0.24%. The draws use torch's generator
    (saved in checkpoints). Only for the hidden states' gradient on the CPU: a weight or bias gradient, and
    a GPU's, stay exact.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, softcap, stats, grads, tail):  # hidden (N, H), weight (V, H)
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
        # measured on the CPU only: a GPU's exact backward is one fast matmul, and the draw's nonzero() a sync
        sample = (
            tail is not None
            and device == "cpu"
            and dtype != torch.float32
            and grad_weight is None
            and grad_bias is None
        )
        # One chunk's logits, allocated once and reused: glibc serves a block over 32 MB (its mmap threshold's
        # ceiling; Gemma-3's 128 x 262k fp32 chunk is 134 MB) from a fresh mapping whose pages fault in zeroed
        # on first touch, and allocated per chunk that was a third of the loss's time (profiled on machine A)
        rows = min(chunk, targets.numel())
        scores = torch.empty((rows, w.shape[0]), dtype=torch.float32, device=hidden.device)
        low = None if dtype == torch.float32 else torch.empty((rows, w.shape[0]), dtype=dtype, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, targets.numel(), chunk):
                h, target = h_all[start : start + chunk], targets[start : start + chunk]
                n = len(target)
                if low is None:
                    logits = torch.mm(h, w.T, out=scores[:n])  # (n, V); reused in place below
                else:
                    logits = scores[:n].copy_(torch.mm(h, w.T, out=low[:n]))
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
                if sample and grad_hidden is not None:
                    grad_hidden[start : start + chunk] = _sampled_tail_grad(g, tanh, target, w, tail).to(hidden.dtype)
                    continue
                g[torch.arange(len(target), device=g.device), target] -= 1
                if tanh is not None:  # soft-capped
                    g.mul_(1 - tanh**2)  # d(cap * tanh(z / cap)) / dz
                if grad_bias is not None:
                    grad_bias += g.sum(0)
                g = g if low is None else low[:n].copy_(g)
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
        return (*out, None, None, None, None, None, None)


def _sampled_tail_grad(p, tanh, target, w, tail: float) -> torch.Tensor:
    """(n, H): an unbiased estimate of (softmax - onehot) @ w from the columns of softmax `p` (n, V) that a
    draw keeps (`LinearCrossEntropy`'s `tail`), each kept column scaled by the inverse of its chance."""
    chance = p.amax(0).div_(tail).clamp_(max=1)  # (V,)
    chance[target] = 1  # the targets' columns carry the -1
    cols = (torch.rand_like(chance) < chance).nonzero().squeeze(1)  # sorted
    g = p.index_select(1, cols).div_(chance[cols])
    g[torch.arange(len(target), device=g.device), torch.searchsorted(cols, target)] -= 1
    if tanh is not None:  # soft-capped
        g.mul_(1 - tanh.index_select(1, cols) ** 2)
    return g.to(w.dtype) @ w.index_select(0, cols)


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


def token_log_probs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    softcap: float | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trained token's log-probability, ((B, T-1) with 0 elsewhere), and the (B, T-1) mask of them.

    Position t predicts labels[t + 1], as in `selective_cross_entropy`. The output layer runs on the trained
    positions only, `chunk` at a time, each under activation checkpointing: a chunk's logits are computed
    again in the backward pass instead of being kept, so no (tokens x vocabulary) tensor stays alive."""
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    keep = targets != IGNORE
    selected, wanted = hidden[:, :-1][keep], targets[keep]
    if chunk is None:
        chunk = max(16, CHUNK_ELEMENTS // cast(torch.Tensor, head.weight).shape[0])
    pieces = [
        checkpoint(
            _chosen_log_probs, selected[s : s + chunk], wanted[s : s + chunk], head, softcap, use_reentrant=False
        )
        for s in range(0, selected.shape[0], chunk)
    ]
    values = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)
    return torch.zeros(targets.shape, dtype=values.dtype, device=hidden.device).masked_scatter(keep, values), keep


def _chosen_log_probs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None):
    log_p = torch.log_softmax(_capped(head(hidden).float(), softcap), dim=-1)
    return log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The sample standard deviation (n - 1) of the values that are not NaN, over `dim` (or all of them);
    NaN where fewer than two are."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim)
    count = (~values.isnan()).sum(dim=dim)
    return (variance * count / (count - 1)).sqrt()


def weighted_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) rewards from (N, F), one column per reward function, with its weight: NaN (a function that
    returned None for that completion) counts as nothing, and a row that is NaN throughout stays NaN."""
    total = (per_function * weights.to(per_function).unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(per_function.isnan().all(dim=1), float("nan"))


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """(N,) GRPO advantages: each reward less the mean of its group (consecutive runs of `group`: one
    prompt's completions), divided by the group's standard deviation (`scale` "group", GRPO), the whole
    batch's ("batch") or not at all ("none", Dr. GRPO), plus 1e-4. NaN rewards (unscorable) are left out
    of the means and get advantage 0."""
    grouped = rewards.view(-1, group)
    advantages = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)
    if scale == "group":
        advantages = advantages / (nanstd(grouped, dim=1).repeat_interleave(group) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (nanstd(rewards) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale: expected group, batch or none, got {scale!r}")
    return torch.nan_to_num(advantages, nan=0.0)


GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    max_length: int | None = None,
) -> tuple[torch.Tensor, float, dict]:
    """GRPO's clipped surrogate (PPO's, per token), summed as `kind` reduces it; what to divide it by; stats.

    logps, old_logps, ref_logps: (B, L) per-token log-probs of the completions under the policy (with
    gradients), the policy that sampled them, the reference; mask (B, L): the completion tokens trained on;
    advantages (B,). Per token: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) with r = exp(logp -
    old_logp), plus beta times the k3 estimate of KL(policy || reference) when beta > 0. The reductions
    (Shao et al. 2024; Liu et al. 2025; Yu et al. 2025), as (sum, count) so that the training loop's
    division by the count of a whole accumulated batch gives each:

        grpo     the mean over completions of each one's mean over its tokens     (sum, completions)
        dr_grpo  the sum over tokens / (completions x max_length)                 (sum / max_length, completions)
        dapo     the sum over tokens / the tokens of the whole batch              (sum, tokens)
        bnpo     the mean over a micro-batch's tokens, averaged over micro-batches (mean, 1)

    The stats: clip fractions (low: ratio below 1 - epsilon with A < 0; high: above 1 + epsilon_high with
    A > 0) and the mean KL, over the tokens trained on."""
    high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(1).to(logps.dtype)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + high) * a)
    stats = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
    tokens = mask.sum().clamp(min=1.0)
    low_clipped = ((ratio < 1 - epsilon) & (a < 0)).to(mask) * mask
    high_clipped = ((ratio > 1 + high) & (a > 0)).to(mask) * mask
    stats.update(
        clip_low=float(low_clipped.sum() / tokens),
        clip_high=float(high_clipped.sum() / tokens),
        clip=float((low_clipped + high_clipped).sum() / tokens),
    )
    masked = per_token * mask
    if kind == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), float(logps.shape[0]), stats
    if kind == "dr_grpo":
        if max_length is None:
            raise ValueError("grpo_loss: dr_grpo needs max_length (the longest completion sampled)")
        return masked.sum() / max_length, float(logps.shape[0]), stats
    if kind == "dapo":
        return masked.sum(), float(mask.sum()), stats
    if kind == "bnpo":
        return masked.sum() / tokens, 1.0, stats
    raise ValueError(f"kind: expected one of {', '.join(GRPO_LOSSES)}, got {kind!r}")
