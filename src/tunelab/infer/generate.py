"""Generation: one reply (streamed to a terminal), or continuations of many prompts in batches.

    reply = generate(model, tokenizer, "Give three tips for staying healthy.", Sampling(64, temperature=0))
    texts = generate_batch(model, tokenizer, prompts, BatchRequest(Sampling(48, temperature=0, stop=["\n"])))

One sampling type (`infer.sampling.Sampling`) from a server request or a CLI flag to the decoder.

A conversation goes through the model's chat template when it has one (`infer.prompts.encode_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunelab.infer.prompts import encode_prompt
from tunelab.infer.sampling import Sampling
from tunelab.models.load import pad_id

if TYPE_CHECKING:
    from tunelab.config import RunConfig


@dataclass
class BatchRequest:
    """What `generate_batch` is asked: how every row samples, and how the prompts are batched."""

    sampling: Sampling = field(default_factory=lambda: Sampling(128, temperature=0.0))  # seed None: 0
    num_beams: int = 1  # more: beam search, on transformers' `generate`
    batch_size: int = 16
    continuous: bool = True  # a decoder on the server's continuous batcher; False: transformers' `generate`
    prefix_cache: bool = True  # the beginning a group of prompts shares computed once
    join_at: int | None = None  # rows joining the batch at once (default an eighth of batch_size)
    quantize: str = "none"  # "int8": the continuous batcher's decode steps with int8 weights (infer.steps)
    description: str = "generating"  # the progress bar's


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a response: the generation config's EOS ids (an end-of-turn token for chat
    models) and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generate(
    model,
    tokenizer,
    messages: list[dict] | str,
    sampling: Sampling | None = None,
    raw: bool = False,
    stream: bool = False,
) -> str:
    """The model's reply to `messages` (or one prompt); with `stream`, printed as it comes."""
    import torch
    from transformers import TextStreamer

    sampling = sampling or Sampling(256, temperature=0.0)
    ids = encode_prompt(tokenizer, messages, raw)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    sample = sampling.temperature > 0
    options = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0} if sample else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sampling.max_tokens,
            do_sample=sample,
            streamer=streamer,
            pad_token_id=pad_id(tokenizer),
            **options,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def generate_batch(
    model, tokenizer, prompts: list[list[int]], request: BatchRequest | None = None, groups: list | None = None
) -> list[str]:
    """The model's continuation of every prompt (token ids), in the prompts' order.

    Prompts go in batches of similar length (left-padded for a decoder, right-padded as encoder input
    for an encoder-decoder); generation stops at the end-of-turn / EOS tokens, and the text is cut at
    the first of `stop`. Greedy (or beam search) unless `temperature` > 0; sampling is seeded (a seed of
    None is 0), so the same call gives the same texts. A progress bar with generated tokens/s shows on a terminal.

    A decoder without beam search runs on the continuous batcher of the server (`infer.decode`): a row
    that stops leaves the batch and the next prompt takes its place at once, where `generate` holds a
    batch until its longest row ends (held-out suite of compare-quick on Gemma-3-270M, machine C: 1.27x
    faster, the same 44 predictions). Its sampling is seeded per prompt (`seed` + the prompt's index), so
    a sampled text does not depend on the prompts beside it. `continuous=False`: transformers' `generate`.

    With `prefix_cache`, the beginning all prompts of a group share (`groups`: a label per prompt, such
    as a held-out task's name, whose definition begins each of its instances; without it, all prompts
    are one group) is computed once, and each prompt's prefill computes only its own rest; a group's
    prompts are decoded together (`infer.decode.PrefixCache`).

    Rows join the continuous batch `join_at` at a time (default an eighth of `batch_size`): fewer, fuller
    prefill passes for a small wait (all 325 SNI instances, Gemma-3-270M bf16, 32 rows, machine C, three
    runs: joining 4 at a time 65.4-68.0 s against one at a time 72.6-75.8 s; in fp32 the same texts, in
    bf16 35 of 325 differ, as any change of who shares a batch changes bf16 sums).
    """
    import torch

    from tunelab.data.batching import pad_prompts
    from tunelab.progress import TokenProgress

    request = request or BatchRequest()
    sampling, batch_size, description = request.sampling, request.batch_size, request.description
    max_new_tokens, temperature, top_p, seed = (
        sampling.max_tokens,
        sampling.temperature,
        sampling.top_p,
        sampling.seed or 0,
    )
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    sample = temperature > 0
    options = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {"do_sample": False}
    )
    stop = tuple(s for s in sampling.stop if s)
    device = next(model.parameters()).device
    if request.continuous and not encoder_decoder and request.num_beams == 1:  # the server's engine (infer.decode)
        from tunelab.infer.decode import PrefixCache, Row, run_to_end, shared_prefixes

        stop_ids = stop_token_ids(model, tokenizer)
        prefix_cache = request.prefix_cache
        shared = shared_prefixes(prompts, groups) if prefix_cache else [0] * len(prompts)
        if prefix_cache:  # a group's prompts together, groups by their longest prompt, each longest first
            head = [tuple(p[:n]) for p, n in zip(prompts, shared)]
            longest: dict[tuple, int] = {}
            for i, p in enumerate(prompts):
                longest[head[i]] = max(longest.get(head[i], 0), len(p))
            order = sorted(order, key=lambda i: (-longest[head[i]], head[i], -len(prompts[i])))
        rows = [
            Row(
                i,
                prompts[i],
                Sampling(max_new_tokens, temperature, top_p, seed + i if sample else None, list(stop)),
                tokenizer,
                stop_ids,
                prefix=shared[i],
            )
            for i in order
        ]
        with TokenProgress(description, len(prompts)) as bar:
            run_to_end(
                model,
                rows,
                batch_size,
                lambda row: bar.advance(1, len(row.tokens)),
                PrefixCache() if prefix_cache else None,
                request.join_at or max(1, batch_size // 8),
                _int8_decoder(model) if request.quantize == "int8" else None,
            )
        for row in rows:
            texts[row.tag] = row.answer.strip()
        return texts
    with TokenProgress(description, len(prompts)) as bar, torch.no_grad():
        torch.manual_seed(seed)
        for k in range(0, len(order), batch_size):
            chosen = order[k : k + batch_size]
            ids, mask = pad_prompts([prompts[i] for i in chosen], pad, left=not encoder_decoder)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                num_beams=request.num_beams,
                pad_token_id=pad,
                **options,
                **_stopping(tokenizer, stop, 0 if encoder_decoder else width),
            )
            new = out if encoder_decoder else out[:, width:]
            for b, i in enumerate(chosen):
                text = tokenizer.decode(new[b], skip_special_tokens=True)
                cuts = [text.find(s) for s in stop if s in text]
                texts[i] = (text[: min(cuts)] if cuts else text).strip()
            bar.advance(len(chosen), int((new != pad).sum()))
    return texts


def _int8_decoder(model):
    from tunelab.errors import UserError
    from tunelab.infer.steps import Decoder, unsupported

    reason = unsupported(model)
    if reason:
        raise UserError(f"quantize: int8: {reason}")
    return Decoder(model)


def _stopping(tokenizer, stop: tuple[str, ...], start: int) -> dict:
    """generate() options that end a row once its generated text holds one of `stop`.

    transformers' own `stop_strings` also matches a stop string that begins in the prompt (a prompt
    ending in a newline stops a "\n\n" at the first newline generated); this looks only at the new text.
    """
    if not stop:
        return {}
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenWritten(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # (B, T) -> (B,) bool: the row is done
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return {"stopping_criteria": StoppingCriteriaList([StopWhenWritten()])}


def predict_targets(
    model, tokenizer, records, renderer, encoder_decoder: bool, cfg: RunConfig, description: str = "generating"
) -> list[str]:
    """A task model's output for each (source, target) record's source, as the run config's `data.prompt`
    and `generation.*` say (greedy or beam search; seeded by train.seed)."""
    from tunelab.infer.prompts import task_prompts

    g = cfg.generation
    prompts = task_prompts(records, tokenizer, renderer, encoder_decoder, cfg.data.prompt, cfg.data.max_length)
    request = BatchRequest(
        Sampling(g.max_new_tokens, temperature=0.0, seed=cfg.train.seed),
        num_beams=g.num_beams,
        batch_size=g.batch_size,
        description=description,
    )
    return generate_batch(model, tokenizer, prompts, request)
