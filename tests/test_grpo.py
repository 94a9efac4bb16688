"""GRPO's pieces against TRL 1.16's own: the advantages (TRL's formula over its nanstd), and the loss with
its gradients for each reduction, TRL's GRPOTrainer._compute_loss run on the same model, completions,
rewards and old and reference log-probs (a stand-in trainer holding only the settings it reads)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.data.render import IGNORE
from tunelab.losses import group_advantages, grpo_loss, nanstd, token_log_probs, weighted_rewards


def test_group_advantages_are_trls_for_each_scaling():
    from trl.trainer.utils import nanstd as trl_nanstd

    torch.manual_seed(0)
    per_function = torch.randn(12, 2)
    per_function[3, 0] = float("nan")  # one function had nothing to say about one completion
    per_function[7] = float("nan")  # nothing could score this one
    weights = torch.tensor([1.0, 0.5])
    rewards = weighted_rewards(per_function, weights)
    expected = (per_function * weights).nansum(1)
    expected[7] = float("nan")
    torch.testing.assert_close(rewards, expected, equal_nan=True)
    assert rewards[3] == pytest.approx(0.5 * per_function[3, 1].item())
    grouped = rewards.view(-1, 4)
    centred = rewards - torch.nanmean(grouped, dim=1).repeat_interleave(4)
    assert torch.allclose(nanstd(rewards), trl_nanstd(rewards), equal_nan=True)
    for scale, std in (
        ("group", trl_nanstd(grouped, dim=1).repeat_interleave(4)),
        ("batch", trl_nanstd(rewards).expand_as(rewards)),
        ("none", None),
    ):
        want = torch.nan_to_num(centred if std is None else centred / (std + 1e-4), nan=0.0)
        torch.testing.assert_close(group_advantages(rewards, 4, scale), want)
    assert group_advantages(rewards, 4)[7] == 0  # unscorable: no signal
    assert group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [0.0] * 4  # one reward a group: none


def _trl_loss(kind: str, per_token_logps, inputs: dict, beta: float, max_completion_length: int):
    """TRL's GRPOTrainer._compute_loss on a stand-in trainer: the model's per-token log-probs as given."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    accelerator = SimpleNamespace(
        num_processes=1,
        sync_gradients=True,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction="sum": t,
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (
            per_token_logps,
            torch.zeros_like(per_token_logps),
            None,
        ),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=kind,
        epsilon_low=0.2,
        epsilon_high=0.28,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_the_loss_and_its_gradients_are_trls(kind, beta, tmp_path):
    """Four completions of different lengths for one prompt, sampled by an older policy (num_iterations > 1:
    ratios away from 1, some clipped), with DAPO's clip-higher (epsilon 0.2, epsilon_high 0.28)."""
    from tiny_models import tiny_llama_dir
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(tmp_path / "llama"))
    rows, prompt, width, longest = 4, 5, 7, 8
    prompt_ids = torch.randint(5, 60, (1, prompt)).repeat(rows, 1)
    completion_ids = torch.randint(5, 60, (rows, width))
    completion_mask = torch.ones(rows, width, dtype=torch.long)
    for row, length in enumerate((7, 5, 3, 6)):
        completion_mask[row, length:] = 0
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0]), rows)
    old = torch.randn(rows, width) * 0.3  # an older policy's log-probs, relative to the current's
    ref = torch.randn(rows, width) * 0.3

    def logps_now():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, prompt - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)

    plain = logps_now()
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": plain.detach() + old,
        "ref_per_token_logps": plain.detach() + ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    trl, metrics = _trl_loss(kind, plain, inputs, beta, longest)
    trl.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # tunelab: the log-probs through the chunked, checkpointed head, the loss summed and divided by its count
    labels = torch.cat(
        [torch.full_like(prompt_ids, IGNORE), completion_ids.masked_fill(completion_mask == 0, IGNORE)], 1
    )
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    logps, mask = token_log_probs(hidden, model.lm_head, labels, chunk=3)
    torch.testing.assert_close(logps[mask], plain.detach()[completion_mask.bool()], atol=1e-5, rtol=1e-5)
    shift = prompt - 1  # position t of the (B, T-1) layout predicts token t + 1: completions start at prompt - 1
    old_full, ref_full = torch.zeros_like(logps), torch.zeros_like(logps)
    old_full[:, shift:] = inputs["old_per_token_logps"]
    ref_full[:, shift:] = inputs["ref_per_token_logps"]
    total, count, stats = grpo_loss(
        logps,
        old_full,
        advantages,
        mask,
        kind,
        epsilon=0.2,
        epsilon_high=0.28,
        ref_logps=ref_full,
        beta=beta,
        max_length=longest,
    )
    loss = total / count
    loss.backward()
    assert loss.item() == pytest.approx(trl.item(), abs=1e-5)
    for ours, theirs in zip((p.grad for p in model.parameters()), trl_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert stats["clip_low"] == pytest.approx(metrics["clip_ratio/low_mean"], abs=1e-6)
    assert stats["clip_high"] == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-6)
    assert stats["clip"] == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-6)
    assert 0 < stats["clip"] < 1  # the ratios exercise the clipping
    if beta:
        assert stats["kl"] == pytest.approx(metrics["kl"], abs=1e-6)
