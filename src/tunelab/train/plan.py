"""Which micro-batches a run trains on, and in which order: a pure function of the seed and the epoch,
so that a resumed run needs only its step number to continue on the very next micro-batch.

    plan = BatchPlan.grouped(len(examples), batch_size, seed, lambda idx: collate_padded([examples[i] for i in idx], pad))
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunelab.data.batching import collate_packed, collate_padded, group_by_length, pack, sorted_groups

if TYPE_CHECKING:
    from tunelab.config import DataConfig, TrainConfig


@dataclass
class BatchPlan:
    """Micro-batches of one epoch, from the seed and the epoch number alone."""

    items: int  # rows (packing), examples, pairs or prompts
    make: Callable[[int], list[dict]]  # epoch -> collated micro-batches, in order

    def epoch(self, epoch: int) -> list[dict]:
        return self.make(epoch)

    @classmethod
    def grouped(
        cls,
        count: int,
        size: int,
        seed: int,
        collate: Callable[[list[int]], dict],
        lengths: Sequence[int] | None = None,
    ) -> BatchPlan:
        """`count` items in batches of `size`, shuffled by seed + epoch; with `lengths`, items of similar
        length batched together (least padding). `collate(indices)` makes a batch."""

        def make(epoch: int) -> list[dict]:
            groups = (
                shuffled_groups(count, size, seed + epoch)
                if lengths is None
                else group_by_length(lengths, size, seed + epoch)
            )
            return [collate(g) for g in groups]

        return cls(count, make)


def shuffled_groups(count: int, size: int, seed: int) -> list[list[int]]:
    """Indices 0..count-1 in a seeded random order, cut into groups of `size`."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i : i + size] for i in range(0, count, size)]


# --- a causal LM's examples: packed rows, or length-grouped padded batches (`data.batching`) ---------------


def lm_plan(examples: list, data: DataConfig, train: TrainConfig, pad_id: int) -> BatchPlan:
    """Training micro-batches of rendered examples, packed or grouped as data.batching says."""
    from tunelab.errors import UserError

    if not examples:
        raise UserError(f"{data.train}: no example left to train on (see `tunelab data validate`)")
    size, seed = train.batch_size, train.seed
    if data.batching == "pack":
        rows = pack(examples, data.max_length)
        return BatchPlan.grouped(len(rows), size, seed, lambda g: collate_packed([rows[i] for i in g], pad_id))
    lengths = [len(e.input_ids) for e in examples]
    return BatchPlan.grouped(
        len(examples), size, seed, lambda g: collate_padded([examples[i] for i in g], pad_id), lengths
    )


def lm_eval_batches(examples: list, data: DataConfig, train: TrainConfig, pad_id: int) -> list[dict] | None:
    """Held-out batches of rendered examples (None without any), packed or padded as training is."""
    if not examples:
        return None
    size = train.batch_size
    if data.batching == "pack":
        rows = pack(examples, data.max_length)
        return [collate_packed(rows[i : i + size], pad_id) for i in range(0, len(rows), size)]
    groups = sorted_groups([len(e.input_ids) for e in examples], size)
    return [collate_padded([examples[i] for i in g], pad_id) for g in groups]
