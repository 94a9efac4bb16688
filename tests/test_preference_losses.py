"""Preference losses: hand-computed values, and DPO equal to TRL's own implementation on the same
inputs and log-probs (TRL's DPOTrainer._compute_loss runs as the reference, on a stand-in model that
returns the given log-probs)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.render import IGNORE
from tunelab.losses import (
    bradley_terry,
    dpo_sigmoid,
    implicit_rewards,
    preference_metrics,
    rloo_advantages,
    sequence_log_probs,
    simpo,
)


def test_bradley_terry_matches_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, 0, -2
    expected = [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(2))]
    assert bradley_terry(chosen, rejected).tolist() == pytest.approx(expected)
    assert bradley_terry(chosen, rejected, margin=1.0).tolist() == pytest.approx(
        [math.log(2), math.log(1 + math.e), math.log(1 + math.exp(3))]
    )
    assert preference_metrics(chosen, rejected) == pytest.approx(
        {"accuracy": 1 / 3, "margin": -1 / 3, "chosen": 1 / 3, "rejected": 2 / 3}
    )


def test_dpo_and_simpo_match_hand_computed_values():
    pi_c, pi_r = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    ref_c, ref_r = torch.tensor([-11.0, -18.0]), torch.tensor([-11.0, -16.0])
    # log-ratio margins: (1 - (-1)) = 2 and (-2 - 1) = -3; beta 0.1 -> 0.2 and -0.3
    assert dpo_sigmoid(pi_c, pi_r, ref_c, ref_r, beta=0.1).tolist() == pytest.approx(
        [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.3))]
    )
    chosen, rejected = implicit_rewards(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    assert chosen.tolist() == pytest.approx([0.1, -0.2]) and rejected.tolist() == pytest.approx([-0.1, 0.1])
    # SimPO: beta 2, gamma 0.5 on mean log-probs -1 vs -1.5: -log sigmoid(2 * 0.5 - 0.5)
    assert simpo(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5).item() == pytest.approx(
        math.log(1 + math.exp(-0.5))
    )


def test_rloo_advantages_match_hand_computed_values():
    """Each reward minus the mean of the other samples of its prompt (groups of k, consecutive)."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    # group 1: 1 - (2+3+6)/3, 2 - (1+3+6)/3, 3 - (1+2+6)/3, 6 - (1+2+3)/3; group 2 likewise
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0 - 4 / 3, 0 - 4 / 3, 0 - 4 / 3, 4 - 0]
    assert rloo_advantages(rewards, 4).tolist() == pytest.approx(expected)
    # k = 2: each advantage is the difference to the other sample, so a group's advantages sum to 0
    assert rloo_advantages(torch.tensor([0.5, -1.5, 3.0, 3.0]), 2).tolist() == pytest.approx([2.0, -2.0, 0.0, 0.0])
    # the baseline leaves the sample out: with k = 3, a reward shared by the others gives r_i - r_other
    assert rloo_advantages(torch.tensor([9.0, 3.0, 3.0]), 3).tolist() == pytest.approx([6.0, -3.0, -3.0])


def test_sequence_log_probs_are_each_rows_trained_token_log_probs():
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 8)
    head = torch.nn.Linear(8, 20, bias=False)
    labels = torch.randint(0, 20, (3, 6))
    labels[:, :2] = IGNORE
    labels[2, 4:] = IGNORE
    logps, counts = sequence_log_probs(hidden, head, labels)
    token_logps = F.log_softmax(head(hidden)[:, :-1], -1)  # position t predicts labels[t + 1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    gathered = token_logps.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * keep
    assert logps.tolist() == pytest.approx(gathered.sum(1).tolist(), rel=1e-5)
    assert counts.tolist() == keep.sum(1).tolist() == [4, 4, 2]


def _trl_dpo(per_token_logps: torch.Tensor, completion_mask: torch.Tensor, ref_chosen, ref_rejected, beta: float):
    """TRL 1.x's DPO loss and metrics for the batch [chosen rows; rejected rows] with these token log-probs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    rows, width = completion_mask.shape
    outputs = SimpleNamespace(
        log_probs=per_token_logps,
        entropy=torch.zeros(rows, width - 1),
        mean_logits=torch.zeros(rows, width - 1),
        is_top1=torch.zeros(rows, width - 1, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trls_implementation(beta):
    torch.manual_seed(3)
    pairs, width = 4, 9
    completion_mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row in range(2 * pairs):
        completion_mask[row, 3 + row % 3 :] = 1  # prompts of different lengths
    per_token = -torch.rand(2 * pairs, width - 1) * 3 * completion_mask[:, 1:]  # log-probs of the completion tokens
    ref_chosen, ref_rejected = -torch.rand(pairs) * 15, -torch.rand(pairs) * 15
    trl_loss, trl_metrics = _trl_dpo(per_token, completion_mask, ref_chosen, ref_rejected, beta)

    chosen_logps, rejected_logps = per_token.sum(1).chunk(2)
    loss = dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta).mean()
    metrics = preference_metrics(*implicit_rewards(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta))
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert metrics["chosen"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    assert metrics["rejected"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-5)
    assert metrics["margin"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)
    assert chosen_logps.mean().item() == pytest.approx(trl_metrics["logps/chosen"], abs=1e-5)
    assert 0 < metrics["accuracy"] < 1  # the inputs exercise both outcomes
