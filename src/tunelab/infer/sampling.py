"""How a row chooses its next token: the one sampling-parameter type (`Sampling`, from an OpenAI request to
the decoder), and `sample`. Before a row samples, the controls reshape its logits, as vLLM applies them
(its `SamplingParams`): `min_tokens` (no stop token before then), `logit_bias` (OpenAI's: added to a
token's logit, -100 bans it), `repetition_penalty` (CTRL's, on every token of the prompt and the answer: a
positive logit divided by it, a negative one multiplied), `frequency_penalty` and `presence_penalty`
(OpenAI's, on the tokens the row wrote: minus count x frequency, minus presence once seen), then `top_k`;
then temperature and top-p. Log-probabilities are the model's own, before any of these (vLLM's default,
`raw_logprobs`).

Written by hand because transformers' `LogitsProcessor`s take a whole (B, T) batch of ids with one setting
for the batch, and every row of the server's continuous batch has its own.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Sampling:
    max_tokens: int = 256  # 0: the prompt is only scored (with prompt_logprobs)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # the same seed gives the same sample
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these; it is not returned
    top_logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the k best
    prompt_logprobs: int | None = None  # k >= 0: each prompt token's log-probability too, and the k best there
    # the controls that reshape the logits before sampling (`reshaped`)
    top_k: int = 0  # 0: every token
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    grammar: Any = None  # a compiled grammar (`infer.constrain`): each row's answer must match it


def sample(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None, best: int | None = None) -> int:
    """The next token from (V,) logits: the argmax at temperature 0 (`best`, when the batch computed it),
    else a draw from the tempered distribution cut to its top-p nucleus."""
    if params.temperature == 0:
        return best if best is not None else int(logits.argmax())
    probs = (logits.float() / params.temperature).softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def reshapes(params: Sampling) -> bool:
    """Whether any control is set (a row without one samples from the logits as they are)."""
    return bool(
        params.min_tokens
        or params.logit_bias
        or params.repetition_penalty != 1.0
        or params.frequency_penalty
        or params.presence_penalty
        or params.top_k > 0
    )


def reshaped(
    logits: torch.Tensor, params: Sampling, prompt_ids: list[int], tokens: list[int], stop_ids: Collection[int]
) -> torch.Tensor:
    """A copy of (V,) `logits` with the row's controls applied; `tokens` are those it generated so far."""
    out = logits.float().clone()
    if len(tokens) < params.min_tokens and stop_ids:
        out[torch.tensor(sorted(stop_ids), device=out.device)] = -torch.inf
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=out.device)
        out[ids] += torch.tensor(list(params.logit_bias.values()), device=out.device)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*prompt_ids, *tokens}), device=out.device)
        values = out[seen]
        out[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if tokens and (params.frequency_penalty or params.presence_penalty):
        ids, counts = torch.tensor(tokens, device=out.device).unique(return_counts=True)
        out[ids] -= counts.float() * params.frequency_penalty + params.presence_penalty
    if 0 < params.top_k < out.numel():
        kth = out.topk(params.top_k).values[-1]
        out[out < kth] = -torch.inf
    return out
