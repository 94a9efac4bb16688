"""Attention over packed rows on the CPU: each example's causal attention on its own, with no mask.

A packed row holds several examples, told apart by position_ids that restart at 0. transformers' `sdpa`
turns that into a (T x T) block-diagonal mask, and with a mask torch's CPU flash-attention kernel can skip
nothing: it computes every query against every key of the row, the other examples' included, and its
backward with a mask is slow (SmolLM2-135M, LoRA, 512-token rows, bf16 on machine C: 3.3 s of a 14.8 s
optimizer step went to the masked attention backward, 4.1 s to attention in all). CUDA has varlen flash
attention for this; the CPU has none. Here each example is a causal attention call of its own (`is_causal`,
the kernel's fast path, which skips the blocks above the diagonal), so the work is the sum of the
examples' squared lengths instead of the row's, halved.

Registered with transformers under the name `tunelab_packed` (as a custom attention implementation, with
its mask function: none where there is no padding mask, `sdpa`'s otherwise), and switched on only around
a training forward pass that gives packed position_ids (`packed_rows`), so inference, saved configs and
padded batches keep `sdpa`.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import pairwise

import torch

NAME = "tunelab_packed"
_registered = False


def packed_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, position_ids=None, **kwargs
):
    """transformers' attention-function contract: query (B, H, T, D), key and value (B, H_kv, T, D) ->
    ((B, T, H, D), None). A padded batch (a 4D mask) goes to `sdpa` unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    dtype = query.dtype
    rows = []
    with torch.autocast(query.device.type, enabled=False):
        query, key, value = query.float(), key.float(), value.float()  # one cast each, not one per example
        for b, starts in enumerate(_segment_starts(position_ids, query.shape[0])):
            lengths = [end - start for start, end in pairwise(starts)]
            # split, not slices: the backward of a split is one concatenation, a slice's a zero-filled row each
            split = ((t if t.shape[0] == 1 else t[b : b + 1]).split(lengths, dim=2) for t in (query, key, value))
            parts = []
            for length, q, k, v in zip(lengths, *split):
                mask = _window_mask(length, window, q.device) if window and length > window else None
                parts.append(
                    sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)[0]
                )
            rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return (torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]).to(dtype), None


_last: tuple = (None, None)  # (position_ids, their segments): every layer of a forward pass gets the same tensor


def _segment_starts(position_ids: torch.Tensor, rows: int) -> list[list[int]]:
    """Per row, where each example starts (a position id that does not follow the one before it), with the
    row's length appended."""
    global _last
    if _last[0] is not position_ids:
        ids = position_ids.expand(rows, -1)
        breaks = torch.ones_like(ids, dtype=torch.bool)
        breaks[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
        _last = (position_ids, [[*torch.nonzero(row).flatten().tolist(), ids.shape[1]] for row in breaks])
    return _last[1]


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """A causal mask that also hides keys more than `window` - 1 positions back (a sliding-window layer)."""
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def packed_mask(*args, attention_mask=None, **kwargs):
    """No mask where there is no padding (the attention function finds the examples in position_ids);
    `sdpa`'s mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)  # type: ignore[misc]  # transformers passes keywords


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, packed_attention_forward)
        AttentionMaskInterface.register(NAME, packed_mask)
        _registered = True


def configs_using_sdpa(model: torch.nn.Module) -> list:
    """The configs of `model` and its parts whose attention is `sdpa` (the ones this can stand in for)."""
    found = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            found[id(config)] = config
    return list(found.values())


@contextmanager
def packed_rows(configs: list):
    """`tunelab_packed` attention for the duration (a forward pass over packed rows), `sdpa` after."""
    if not configs:
        yield
        return
    register()
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield
    finally:
        global _last
        _last = (None, None)
        for config in configs:
            config._attn_implementation = "sdpa"
