"""Batching and collation, the one place: rendered examples become model inputs, packed or padded.
Nothing here decides labels.

Two strategies (`data.batching`):
- `pack`: best-fit-decreasing packing of whole examples into rows of at most `max_length` tokens.
  Examples never attend to each other: `position_ids` restart at 0 for each one, and transformers
  builds a block-diagonal causal mask from them when no `attention_mask` is given (and no KV cache:
  call the model with `use_cache=False`). The first token of each example is never predicted from
  the previous example (its label is -100).
- `group`: examples of similar length batched together and right-padded, with an attention mask
  (the length-grouped sampling of transformers' `group_by_length`).
Which is faster depends on the hardware: `benchmarks/batching.py` measures it, the README has numbers.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tunelab.data.render import IGNORE, Example

STRATEGIES = ("pack", "group")


@dataclass
class Row:
    """One packed row: whole examples back to back, each with positions from 0."""

    input_ids: np.ndarray  # (T,)
    labels: np.ndarray  # (T,)
    position_ids: np.ndarray  # (T,)
    examples: list[int]  # indices of the examples in it, in order


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest example first, each into the open bin it fills most tightly.

    Returns bins of example indices. An example longer than `capacity` is an error (render with the same
    max_length first). O(n log n) lookups over the free space of open bins, kept sorted.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the row capacity {capacity}")
        j = bisect.bisect_left(free, (size, -1))  # the tightest bin with room
        if j == len(free):
            bins.append([i])
            b, space = len(bins) - 1, capacity - size
        else:
            space, b = free.pop(j)
            bins[b].append(i)
            space -= size
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


def pack(examples: Sequence[Example], capacity: int) -> list[Row]:
    """Examples packed into rows of at most `capacity` tokens (see the module docstring)."""
    rows = []
    for members in pack_best_fit([len(e.input_ids) for e in examples], capacity):
        labels = [np.asarray(examples[i].labels, dtype=np.int64) for i in members]
        for label in labels:
            label[0] = IGNORE  # would be predicted from the previous example's last token
        rows.append(
            Row(
                input_ids=np.concatenate([np.asarray(examples[i].input_ids, dtype=np.int64) for i in members]),
                labels=np.concatenate(labels),
                position_ids=np.concatenate([np.arange(len(examples[i].input_ids)) for i in members]),
                examples=members,
            )
        )
    return rows


def sorted_groups(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices in groups of `size` by increasing length, in a fixed order: evaluation batches with the
    least padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k : k + size] for k in range(0, len(order), size)]


def group_by_length(lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 50) -> list[list[int]]:
    """Batches of example indices with similar lengths, in a random order.

    As transformers' `LengthGroupedSampler`: shuffle, cut into mega-batches of `mega` batches, sort each
    by length, split into batches, so padding is small and the order still random.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = batch_size * mega
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_prompts(prompts: Sequence[Sequence[int]], pad: int, left: bool = True):
    """(B, T) ids of token lists padded with `pad` to the longest (on the left, so that generation
    continues each prompt's last token; on the right for an encoder's input), and their (B, T) mask."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        span = slice(width - len(p), width) if left else slice(0, len(p))
        ids[b, span], mask[b, span] = torch.as_tensor(list(p), dtype=torch.long), 1
    return ids, mask


def pad_inputs(examples: Sequence[Example], pad_id: int) -> dict:
    """input_ids (B, T) right-padded with `pad_id`, attention_mask (B, T), and the real tokens' count
    (`real_tokens`, for throughput: the loop takes it out before the forward). A sequence classifier
    reads each row's last real token (a decoder's) or its first (an encoder's)."""
    input_ids, attention_mask = pad_prompts([e.input_ids for e in examples], pad_id, left=False)
    real = sum(len(e.input_ids) for e in examples)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "real_tokens": real}


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict:
    """(B, T) input_ids / labels / attention_mask, right-padded to the longest example (labels with
    IGNORE), and `real_tokens`."""
    batch = pad_inputs(examples, pad_id)
    batch["labels"] = pad_prompts([e.labels for e in examples], IGNORE, left=False)[0]
    return {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "real_tokens")}


def collate_labeled(examples: Sequence[Example], pad_id: int) -> dict:
    """A classifier's batch: right-padded inputs, a class id per example (`labels`), `count` = examples."""
    import torch

    labels = torch.tensor([e.labels[0] for e in examples], dtype=torch.long)
    return {**pad_inputs(examples, pad_id), "labels": labels, "count": len(examples)}


def collate_pairs(pairs: Sequence[tuple[Example, Example]], pad_id: int, labels: bool = True) -> dict:
    """Preference pairs as one batch: the pairs' chosen rows, then their rejected rows, right-padded
    (2P, T), with `labels` on the responses (or inputs alone, for a reward model); `count` = pairs."""
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    return {**(collate_padded(rows, pad_id) if labels else pad_inputs(rows, pad_id)), "count": len(pairs)}


def collate_seq2seq(examples: Sequence[Example], pad_id: int) -> dict:
    """An encoder-decoder's batch: right-padded sources with their attention mask, targets as `labels`
    padded with IGNORE; `count` = target tokens."""
    batch = pad_inputs(examples, pad_id)
    labels = pad_prompts([e.labels for e in examples], IGNORE, left=False)[0]
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": labels,
        "count": int((labels != IGNORE).sum()),
        "real_tokens": sum(len(e.input_ids) + len(e.labels) for e in examples),
    }


PACKED_WIDTH_MULTIPLE = 64


def collate_packed(rows: Sequence[Row], pad_id: int, multiple: int = PACKED_WIDTH_MULTIPLE) -> dict:
    """(B, T) input_ids / labels / position_ids (and `real_tokens`); no attention_mask, so transformers
    masks by position.

    Rows shorter than the longest are filled with pad tokens that form a sequence of their own
    (positions from 0 again), never attended to by the real examples and never trained. T is rounded up
    to a multiple of `multiple` (64): packed rows are all a little short of max_length by different amounts, and
    each new width is a new shape for every matmul, which on the CPU oneDNN plans (and caches) anew
    (SmolLM2-135M, 512-token rows, machine C: 18 widths in the first 48 rows; the process grew by 250 MB
    in 6 steps against 130 with widths rounded, at a few pad tokens a row).
    """
    import torch

    width = -(-max(len(r.input_ids) for r in rows) // multiple) * multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[b, :n] = torch.from_numpy(r.input_ids)
        labels[b, :n] = torch.from_numpy(r.labels)
        position_ids[b, :n] = torch.from_numpy(r.position_ids)
        position_ids[b, n:] = torch.arange(width - n)
    real = sum(len(r.input_ids) for r in rows)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "real_tokens": real}
