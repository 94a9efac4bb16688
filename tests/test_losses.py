"""Loss functions against their reference computations; precision choice by hardware."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.render import IGNORE
from tunelab.losses import TAIL, selective_cross_entropy
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


def _long_tail_case(seed: int = 3):
    """A frozen head whose softmax has a head of likely tokens and a long tail below TAIL, as a real LM's has."""
    torch.manual_seed(seed)
    hidden = torch.randn(1, 65, 32)
    head = torch.nn.Linear(32, 3000, bias=False)
    head.weight.data *= 6  # logits with a spread of several nats: most of the 3,000 probabilities far below TAIL
    head.weight.requires_grad_(False)
    labels = torch.randint(0, 3000, (1, 65))
    return hidden, head, labels


def _bf16_loss_and_grad(hidden, head, labels, tail, chunk=16):
    x = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _, _ = selective_cross_entropy(x, head, labels, chunk=chunk, tail=tail)
    total.backward()
    return total.item(), x.grad


def test_the_sampled_tail_is_unbiased_and_within_bf16_rounding_of_the_exact_gradient():
    hidden, head, labels = _long_tail_case()
    with torch.no_grad():
        p = torch.softmax(head(hidden[0, :-1]), -1)
    assert (p < TAIL).float().mean() > 0.8  # the case has a tail to sample
    # the exact gradient, in fp32 from the bf16-rounded inputs the bf16 paths start from
    x = hidden.bfloat16().float().requires_grad_(True)
    logits = x[0, :-1] @ head.weight.bfloat16().float().T
    F.cross_entropy(logits, labels[0, 1:], reduction="sum").backward()

    def error(grad):
        return float((grad - x.grad).norm() / x.grad.norm())

    loss, exact = _bf16_loss_and_grad(hidden, head, labels, tail=None)
    rounding = error(exact)  # the exact path's own bf16 rounding
    draws = [_bf16_loss_and_grad(hidden, head, labels, tail=TAIL) for _ in range(20)]
    assert all(d[0] == loss for d in draws)  # the loss itself is exact
    assert all(error(d[1]) < 2 * rounding for d in draws)  # TAIL: each draw as close as bf16 rounding
    # a coarse tail (every column below 1% sampled) shows the sampling: one draw is off by percents,
    # their mean converges on the exact gradient (a biased estimate would stay off)
    coarse = torch.stack([_bf16_loss_and_grad(hidden, head, labels, tail=0.01)[1] for _ in range(400)])
    assert error(coarse[0]) > 5 * rounding
    assert error(coarse.mean(0)) < 2 * rounding


def test_the_sampled_tail_is_exact_where_nothing_is_below_it_and_in_fp32():
    hidden, head, labels = _long_tail_case(4)
    _, exact = _bf16_loss_and_grad(hidden, head, labels, tail=None)
    _, everything = _bf16_loss_and_grad(hidden, head, labels, tail=1e-30)  # every column kept, scaled by 1
    assert torch.allclose(everything, exact, rtol=1e-3, atol=1e-6)
    grads = []
    for tail in (None, TAIL):  # fp32 matmuls: no sampling, whatever is asked
        x = hidden.clone().requires_grad_(True)
        selective_cross_entropy(x, head, labels, chunk=16, tail=tail)[0].backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


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
