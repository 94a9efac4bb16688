"""Token-by-token decoding of one request, as a server streams it: sampling parameters and a seed of its
own, stop strings (never returned), the log-probabilities of each chosen token and of its best
alternatives, and a way to stop it from outside (a client that went away).

    for step in decode(model, tokenizer, prompt_ids, Params(max_tokens=64, temperature=0.0), stop_ids):
        print(step.text, end="")            # step.finish_reason is set on the last step

Greedy decoding here computes what transformers' `generate` computes (a prefill, then one token at a
time with the KV cache), so a greedy answer equals `tunelab generate`'s token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Params:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # the same seed gives the same sample
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these; it is not returned
    top_logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the k best


@dataclass
class Step:
    text: str  # the new text since the previous step (may be empty while a possible stop string is held back)
    token: int | None  # the token this step chose (None on a closing step that only releases text)
    logprob: float | None = None
    token_text: str = ""  # the chosen token's own text (with log-probabilities)
    top: list[tuple[str, float]] = field(default_factory=list)  # the best alternatives (their text, logprob)
    finish_reason: str | None = None  # "stop" or "length" on the last step


def sample(logits: torch.Tensor, params: Params, generator: torch.Generator | None) -> int:
    """The next token from (V,) logits: the argmax at temperature 0, else a draw from the tempered
    distribution cut to its top-p nucleus."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = (logits.float() / params.temperature).softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def decode(model, tokenizer, prompt_ids: list[int], params: Params, stop_ids: set[int],
           cancelled: Callable[[], bool] = lambda: False) -> Iterator[Step]:
    """The continuation of `prompt_ids`, step by step (see the module docstring)."""
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    device = next(model.parameters()).device
    tokens: list[int] = []
    sent = 0  # characters of the decoded text already yielded
    hold = max((len(s) for s in params.stop), default=0)  # text that might begin a stop string waits
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
        for _ in range(params.max_tokens):
            if cancelled():
                return
            logits = out.logits[0, -1].float()
            token = sample(logits, params, generator)
            if token in stop_ids:  # counted as generated, but neither text nor a log-probability of the answer
                yield Step(_decode(tokenizer, tokens)[sent:], token, finish_reason="stop")
                return
            logprob, top = None, []
            if params.top_logprobs is not None:
                logprobs = logits.log_softmax(-1)
                logprob = float(logprobs[token])
                values, ids = logprobs.topk(params.top_logprobs) if params.top_logprobs else (logprobs[:0], logprobs[:0])
                top = [(tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]
            token_text = tokenizer.decode([token]) if logprob is not None else ""
            tokens.append(token)
            text = _decode(tokenizer, tokens)
            cut = min((i for i in (text.find(s, max(sent - hold, 0)) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                yield Step(text[sent:cut], token, logprob, token_text, top, "stop")
                return
            ready = len(text) - hold if not text.endswith("\ufffd") else len(text.rstrip("\ufffd")) - hold
            yield Step(text[sent:max(ready, sent)], token, logprob, token_text, top)
            sent = max(ready, sent)
            out = model(input_ids=torch.tensor([[token]], device=device), **_cache(out), use_cache=True)
    yield Step(_decode(tokenizer, tokens)[sent:], None, finish_reason="length")


def _cache(out) -> dict:
    """The KV cache of a forward's output, as the next forward takes it (transformers 5 renamed
    `past_key_values` to `cache` in 5.2x)."""
    return {"cache": out.cache} if hasattr(out, "cache") else {"past_key_values": out.past_key_values}


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)
