"""Loss functions against their reference computations; precision choice by hardware."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.render import IGNORE
from tunelab.losses import selective_cross_entropy
from tunelab.train.precision import cpu_has_fast_bf16, resolve_precision


def test_selective_cross_entropy_equals_full_logits_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (3, 7))
    labels[:, :3] = IGNORE
    labels[1, 5] = IGNORE
    full = head(hidden)[:, :-1].reshape(-1, 50)  # position t predicts labels[t + 1]
    expected = F.cross_entropy(full, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    for chunk in (2, 4096):  # several chunks or one
        total, count, _ = selective_cross_entropy(hidden, head, labels, chunk=chunk)
        assert count == int((labels[:, 1:] != IGNORE).sum()) == 11
        assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    grad_expected = torch.autograd.grad(expected, hidden)[0]
    grad = torch.autograd.grad(selective_cross_entropy(hidden, head, labels, chunk=2)[0], hidden)[0]
    assert torch.allclose(grad, grad_expected, atol=1e-6)


def test_no_trained_token_gives_zero_loss_and_count():
    total, count, correct = selective_cross_entropy(torch.randn(1, 4, 8), torch.nn.Linear(8, 10), torch.full((1, 4), IGNORE))
    assert count == correct == 0 and total.item() == 0.0


def test_precision_auto_follows_the_cpu_and_explicit_settings_win():
    precision, why = resolve_precision("auto", "cpu")
    assert precision == ("bf16" if cpu_has_fast_bf16() else "fp32") and why
    assert resolve_precision("fp32", "cpu")[0] == "fp32"
    assert resolve_precision("bf16", "cpu") == ("bf16", "set by train.precision")
