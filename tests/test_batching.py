"""Packing and padding: whole examples, no attention across them, the same loss as one by one."""

import random

import pytest
import torch

from tunelab.data.batching import collate_packed, collate_padded, group_by_length, pack, pack_best_fit
from tunelab.data.render import IGNORE, Example
from tunelab.losses import selective_cross_entropy


def examples(lengths, seed=0, vocab=64):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))  # prompt half, response half
    return out


def test_best_fit_decreasing_places_every_example_whole_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack_best_fit(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))  # each example once, none split
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1  # BFD is within ~11/9 of optimal; here near-full rows


def test_best_fit_picks_the_tightest_bin():
    assert pack_best_fit([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_best_fit([11], 10)


def test_packed_rows_restart_positions_and_never_predict_across_examples():
    data = examples([5, 9, 3, 12])
    rows = pack(data, 16)
    for row in rows:
        start = 0
        for i in row.examples:
            n = len(data[i].input_ids)
            assert row.position_ids[start : start + n].tolist() == list(range(n))
            assert row.input_ids[start : start + n].tolist() == data[i].input_ids
            assert row.labels[start] == IGNORE  # not predicted from the previous example's last token
            assert row.labels[start + 1 : start + n].tolist() == data[i].labels[1:]
            start += n
        assert start == len(row.input_ids) <= 16


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def per_example_loss(model, batch, spans):
    """Mean loss of each example, given (row, start, length) spans in the batch."""
    with torch.no_grad():
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        hidden = model.model(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
    losses = []
    for row, start, n in spans:
        labels = batch["labels"][row : row + 1, start : start + n].clone()
        labels[0, 0] = IGNORE
        total, count, _ = selective_cross_entropy(hidden[row : row + 1, start : start + n], model.lm_head, labels)
        losses.append((total / count).item())
    return losses


def test_a_packed_forward_gives_each_example_the_loss_it_has_alone(tiny_llama):
    data = examples([5, 9, 3, 12, 7, 4, 10, 16])
    alone = [per_example_loss(tiny_llama, collate_padded([e], 0), [(0, 0, len(e.input_ids))])[0] for e in data]
    rows = pack(data, 16)
    batch = collate_packed(rows, pad_id=0)
    assert "attention_mask" not in batch  # the block-diagonal mask comes from position_ids
    spans, order = [], []
    for r, row in enumerate(rows):
        start = 0
        for i in row.examples:
            spans.append((r, start, len(data[i].input_ids)))
            order.append(i)
            start += len(data[i].input_ids)
    packed = per_example_loss(tiny_llama, batch, spans)
    assert packed == pytest.approx([alone[i] for i in order], abs=1e-4)


def test_padded_batches_give_each_example_the_loss_it_has_alone(tiny_llama):
    data = examples([5, 9, 3, 12])
    alone = [per_example_loss(tiny_llama, collate_padded([e], 0), [(0, 0, len(e.input_ids))])[0] for e in data]
    batch = collate_padded(data, pad_id=0)
    assert batch["attention_mask"].sum(1).tolist() == [5, 9, 3, 12]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    padded = per_example_loss(tiny_llama, batch, [(b, 0, len(e.input_ids)) for b, e in enumerate(data)])
    assert padded == pytest.approx(alone, abs=1e-4)


def test_length_grouping_covers_every_example_once_and_pads_less_than_random_batches():
    rng = random.Random(2)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    batches = group_by_length(lengths, batch_size=8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    random_padded = sum(8 * max(lengths[i] for i in shuffled[k : k + 8]) for k in range(0, 1000, 8))
    assert padded < 0.7 * random_padded
    assert group_by_length(lengths, 8, seed=0) == batches  # deterministic under a seed
