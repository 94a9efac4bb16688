"""Loss functions against their reference computations; precision choice by hardware."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.render import IGNORE
from tunelab.losses import selective_cross_entropy
from tunelab.precision import resolve_precision


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


@pytest.mark.parametrize("bias, softcap", [(False, None), (True, None), (False, 30.0)])
def test_the_chunked_linear_cross_entropy_matches_autograd_through_full_logits(bias, softcap):
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=bias)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :4] = IGNORE
    logits = head(hidden)[:, :-1].reshape(-1, 40)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.5, [hidden, *head.parameters()])
    total, count, correct = selective_cross_entropy(hidden, head, labels, chunk=3, softcap=softcap)
    grads = torch.autograd.grad(total * 0.5, [hidden, *head.parameters()])
    assert total.item() == pytest.approx(expected.item(), abs=1e-5)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5)
    hits = (logits.argmax(-1) == labels[:, 1:].reshape(-1))[labels[:, 1:].reshape(-1) != IGNORE]
    assert count == 13 and correct == int(hits.sum())


def test_tied_weights_get_the_gradient_of_both_uses():
    torch.manual_seed(2)
    embed = torch.nn.Embedding(30, 8)
    head = torch.nn.Linear(8, 30, bias=False)
    head.weight = embed.weight  # tied, as SmolLM2 and Gemma-3 have them
    ids = torch.randint(0, 30, (1, 6))
    labels = ids.clone()

    def loss(fn):
        embed.weight.grad = None
        fn(embed(ids)).backward()
        return embed.weight.grad.clone()

    full = loss(lambda h: F.cross_entropy(head(h)[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), reduction="sum"))
    chunked = loss(lambda h: selective_cross_entropy(h, head, labels, chunk=2)[0])
    assert torch.allclose(full, chunked, atol=1e-5)


def test_no_trained_token_gives_zero_loss_and_count():
    total, count, correct = selective_cross_entropy(
        torch.randn(1, 4, 8), torch.nn.Linear(8, 10), torch.full((1, 4), IGNORE)
    )
    assert count == correct == 0 and total.item() == 0.0


def test_precision_auto_follows_the_cpu_and_explicit_settings_win(monkeypatch):
    """auto is bf16 where the CPU has oneDNN's bf16 kernels (AVX-512 BW/VL/DQ, which AVX-512 BF16 and AMX
    machines have), read here from the CPU's own flags; fp32 on AVX2-only CPUs, where bf16 is emulated."""
    from tunelab import precision

    flags = set(
        next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    )
    native = {"avx512bw", "avx512vl", "avx512dq"} <= flags
    assert resolve_precision("auto", "cpu").name == ("bf16" if native else "fp32")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    emulated = resolve_precision("auto", "cpu")
    assert emulated.name == "fp32" and "emulates bf16" in emulated.reason
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", "cpu").name == "bf16"
    assert resolve_precision("fp32", "cpu").name == "fp32"
    assert resolve_precision("bf16", "cpu") == precision.Precision("bf16", "set by train.precision")
