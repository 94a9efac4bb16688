"""Decoding with continuous batching, the one generation engine of the server: sequences join the running
batch between two decode steps and leave it when they finish, each with its own sampling parameters, seed,
stop strings and log-probabilities, and each can be stopped from outside (a client that went away).

    batch = Batch(model)
    batch.add(Row("a", prompt_ids, Sampling(max_tokens=64, temperature=0.0), tokenizer, stop_ids))
    while batch.rows:
        for row, step in batch.step():      # one new token for every row in one forward pass
            print(row.tag, step.text)       # step.finish_reason is set on a row's last step

A joining sequence's prompt is computed alone (its prefill), its KV cache left-padded into the batch's;
each decode step then feeds every row's last token at its own position, with an attention mask that hides
the padding. Rows that finish leave the cache, and columns of padding no row needs are trimmed. The cache
keeps every position, also for a sliding-window layer (Gemma-3's), whose window the attention mask then
draws: a left-padded batch keeps its rows' tokens in columns at their true distances, so the window is the
same as alone (tested against transformers' `generate` with a window shorter than the answers). Written
here because transformers' own continuous batching (`generate_batch`, paged attention) has no per-request
seed, no top log-probabilities and no per-request LoRA adapter; a batch here mixes the adapters of one base
through peft's `adapter_names`. In fp32, greedy decoding computes what transformers' `generate` computes:
a row's answer is the same whether it ran alone or beside others (tests/test_serve.py, test_generation.py,
test_real_models.py). In bf16 a row padded beside others is rounded differently (the attention over its
left padding, a wider prefill's matmuls), and its greedy answer may part from its answer alone after a few
tokens, as in other batching servers (docs/serving.md#the-engine-precision-and-speed).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.infer.constrain import Matcher
from tunelab.infer.sampling import Sampling, reshaped, reshapes, sample


@dataclass
class Scored:
    """A prompt token's log-probability given the tokens before it (None for the first), and the k best."""

    token: int
    text: str
    logprob: float | None
    top: list[tuple[str, float]] | None


@dataclass
class Step:
    text: str  # the new text since the previous step (may be empty while a possible stop string is held back)
    token: int | None  # the token this step chose (None on a closing step that only releases text)
    logprob: float | None = None
    token_text: str = ""  # the chosen token's own text (with log-probabilities)
    top: list[tuple[str, float]] = field(default_factory=list)  # the best alternatives (their text, logprob)
    finish_reason: str | None = None  # "stop" or "length" on the last step
    prompt: list[Scored] | None = None  # on a row's first step, with Sampling.prompt_logprobs: its prompt scored
    end: bool = False  # the model's end token: completions give its log-probability (as vLLM does), chat not


class Row:
    """One sequence: its prompt, parameters and sampler, and the text it has written so far. `prefix`: how
    many of its first prompt tokens other rows share (a task's definition): a batch with a `PrefixCache`
    computes their keys and values once and reuses them."""

    def __init__(
        self,
        tag,
        prompt_ids: list[int],
        params: Sampling,
        tokenizer,
        stop_ids: set[int],
        adapter: str | None = None,
        prefix: int = 0,
        reusable: tuple[int, ...] = (),
    ):
        self.tag, self.prompt_ids, self.params, self.tokenizer = tag, list(prompt_ids), params, tokenizer
        self.stop_ids, self.adapter = stop_ids, adapter
        self.prefix = min(prefix, len(self.prompt_ids) - 1)  # at least one token of its own gives its first logits
        # lengths of its beginnings later prompts may begin with (a chat before its last message, the whole
        # chat), kept in the batch's prefix cache once computed (`Batch.remember`)
        self.reusable = tuple(n for n in reusable if 0 < n <= len(self.prompt_ids))
        self.generator: torch.Generator | None = None  # seeded on the batch's device when the row joins it
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already given out
        self.hold = max((len(s) for s in params.stop), default=0)  # text that might begin a stop string waits
        self.position = len(self.prompt_ids)  # the position of the next token fed to the model
        self.logits: torch.Tensor | None = None  # (V,) the distribution of its next token
        self.best: int | None = None  # the argmax of `logits`, computed for the whole batch at once
        self.done = False
        self.answer = ""  # the text given out so far (all of it once done)
        self.finish_reason: str | None = None
        self.stop_token: int | None = None  # the stop token that ended it, if one did
        self.scored: list[Scored] | None = None  # its prompt's log-probabilities, until its first step
        self.matcher = Matcher(params.grammar) if params.grammar is not None else None  # structured outputs
        self.stop_from = 0  # where in its text a stop string may begin (after min_tokens tokens)

    def choose(self) -> list[Step]:
        """Take the next token from `logits`; the steps that says (a second, closing one at max_tokens)."""
        steps = self._choose()
        if self.scored is not None:
            steps[0].prompt, self.scored = self.scored, None
        for step in steps:
            self.answer += step.text
            self.finish_reason = step.finish_reason or self.finish_reason
        return steps

    def _choose(self) -> list[Step]:
        assert self.logits is not None  # each forward pass gives every row its logits before it chooses
        if self.params.max_tokens == 0:  # scored only
            self.done = True
            return [Step("", None, finish_reason="length")]
        if reshapes(self.params) or self.matcher is not None:
            logits = reshaped(self.logits, self.params, self.prompt_ids, self.tokens, self.stop_ids)
            if self.matcher is not None:
                self.matcher.mask(logits)
            token = sample(logits, self.params, self.generator)
            if self.matcher is not None:
                self.matcher.accept(token)
        else:
            token = sample(self.logits, self.params, self.generator, self.best)
        logprob, top, token_text = None, [], ""
        if self.params.top_logprobs is not None:
            logprobs = self.logits.float().log_softmax(-1)
            logprob, token_text = float(logprobs[token]), self.tokenizer.decode([token])
            if self.params.top_logprobs:
                values, ids = logprobs.topk(self.params.top_logprobs)
                top = [(self.tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]
        if token in self.stop_ids:  # counted as generated, with no text
            self.done, self.stop_token = True, token
            return [Step(self._text()[self.sent :], token, logprob, token_text, top, "stop", end=True)]
        self.tokens.append(token)
        text = self._text()
        if len(self.tokens) == self.params.min_tokens:  # stop strings count from here on
            self.stop_from = len(text)
        stops = self.params.stop if len(self.tokens) > self.params.min_tokens else []
        start = max(self.sent - self.hold, self.stop_from)
        cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self.done = True
            return [Step(text[self.sent : cut], token, logprob, token_text, top, "stop")]
        ready = len(text.rstrip("\ufffd")) - self.hold  # an unfinished UTF-8 character waits too
        steps = [Step(text[self.sent : max(ready, self.sent)], token, logprob, token_text, top)]
        self.sent = max(ready, self.sent)
        if len(self.tokens) == self.params.max_tokens:
            self.done = True
            steps.append(Step(text[self.sent :], None, finish_reason="length"))
        return steps

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)


class PrefixCache:
    """The keys and values of shared prompt prefixes, by (adapter, prefix tokens), least recently used
    dropped beyond `max_bytes`. Prefix caching as vLLM and SGLang do it, for the prompts of one call whose
    shared prefixes the caller knows (`shared_prefixes`) rather than found block by block on the fly."""

    def __init__(self, max_bytes: int = 1 << 30):
        from collections import OrderedDict

        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.hits = self.misses = 0  # rows that found their prefix / computed it

    def get(self, key: tuple):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def longest(self, adapter: str | None, ids: list[int]) -> int:
        """The length of the longest cached prefix `ids` begins with (shorter than `ids`), 0 if none."""
        best = 0
        for key in self.entries:
            n = len(key[1])
            if key[0] == adapter and best < n < len(ids) and tuple(ids[:n]) == key[1]:
                best = n
        return best

    def put(self, key: tuple, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.entries[key] = layers
        self.bytes += sum(k.nbytes + v.nbytes for k, v in layers)
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in dropped)


def shared_prefixes(prompts: list[list[int]], groups: list | None = None, min_tokens: int = 16) -> list[int]:
    """For each prompt, how many of its first tokens every prompt of its group begins with (the group's
    longest common prefix: a held-out task's definition, a template's preamble); 0 when that is under
    `min_tokens` or the prompt is alone in its group. Without `groups`, all prompts are one group."""
    groups = groups if groups is not None else [0] * len(prompts)
    members: dict = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    shared = [0] * len(prompts)
    for indices in members.values():
        if len(indices) < 2:
            continue
        low, high = min(prompts[i] for i in indices), max(prompts[i] for i in indices)
        n = next((k for k, (x, y) in enumerate(zip(low, high)) if x != y), min(len(low), len(high)))
        for i in indices:
            shared[i] = n if n >= min_tokens else 0
    return shared


class Batch:
    """The rows decoding together on one model (a base, with any of its loaded adapters)."""

    def __init__(self, model, max_rows: int = 16, prefixes: PrefixCache | None = None, decoder=None):
        self.model = model
        self.max_rows = max_rows
        self.prefixes = prefixes  # None: every prompt is computed whole
        self.decoder = decoder  # an `infer.steps.Decoder` of the model: its decode steps (not its prompts')
        self.adapters = hasattr(model, "peft_config")  # a peft model: rows name their adapter
        self.rows: list[Row] = []
        self.cache: Any = None  # the rows' KV cache (a transformers Cache), left-padded to one width
        self.mask: torch.Tensor | None = None  # (B, T): 1 where the cache holds a real token
        self.device = next(model.parameters()).device
        self.vocabulary = model.get_output_embeddings().weight.shape[0]
        self.scores: torch.Tensor | None = None  # the decode steps' fp32 logits, one buffer reused (`_fp32`)

    def add(self, *rows: Row) -> None:
        """Prefill the rows' prompts and join their cache to the batch's: rows whose prompts begin with a
        cached (or shared) prefix compute only the rest of their prompt, group by group; the others
        together, left-padded to the longest."""
        for row in rows:
            self._seed(row)
        scored = [row for row in rows if row.params.prompt_logprobs is not None]  # every position's logits
        caches, joining = [], []  # joined all at once: each join copies the batch's whole cache
        if scored:
            caches.append(self._prefill_scored(scored))
            joining += scored
        groups: dict[tuple | None, list[Row]] = {}
        for row in (row for row in rows if row.params.prompt_logprobs is None):
            key = (
                (row.adapter, tuple(row.prompt_ids[: row.prefix])) if self.prefixes is not None and row.prefix else None
            )
            groups.setdefault(key, []).append(row)
        for key, group in groups.items():
            caches.append(self._prefill(group) if key is None else self._prefill_after(key, group))
            joining += group
        self._join(joining, *caches)

    def remember(self, rows: list[Row]) -> None:
        """Keep in the prefix cache, for prompts that begin the same later, the keys and values of each
        joined row's `reusable` beginnings (a chat's system prompt; the whole chat, which its next turn
        repeats), copied out of the batch's cache before its first step: vLLM's automatic prefix caching, at
        the boundaries the chat template gives instead of block by block. Rows with an adapter are left out
        (its weights may be replaced under the same name)."""
        if self.prefixes is None or self.cache is None:
            return
        width, index = self.cache.layers[0].keys.shape[-2], {id(row): b for b, row in enumerate(self.rows)}
        for row in rows:
            if row.adapter is not None or id(row) not in index:  # (not joined: its prefill failed)
                continue
            b, start = index[id(row)], width - len(row.prompt_ids)  # right-aligned, no step taken yet
            for n in row.reusable:
                key = (None, tuple(row.prompt_ids[:n]))
                if n > row.prefix and key not in self.prefixes.entries:
                    self.prefixes.put(
                        key,
                        [
                            (
                                layer.keys[b : b + 1, :, start : start + n].clone(),
                                layer.values[b : b + 1, :, start : start + n].clone(),
                            )
                            for layer in self.cache.layers
                        ],
                    )

    def reuse(self, row: Row) -> None:
        """Before `add`: the row's prefix is the longest beginning of its prompt the prefix cache keeps (as
        `remember` keeps them), where it may take one: no adapter, a prompt not scored (every position of a
        scored prompt is computed)."""
        if self.prefixes is not None and row.adapter is None and row.params.prompt_logprobs is None:
            row.prefix = self.prefixes.longest(None, row.prompt_ids)

    def _seed(self, row: Row) -> None:
        if row.params.seed is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(row.params.seed)

    def _prefill(self, rows: list[Row]):
        """The rows' prompts in one forward pass, left-padded: (per-layer (keys, values), mask)."""
        ids, mask, positions = self._left_padded(rows)
        with torch.no_grad():
            out = self._forward(ids, mask, positions, _roomy_cache(), rows)
        _take_logits(rows, out.logits[:, -1].float())
        return _padding_zeroed(_cache_of(out), mask), mask

    def _left_padded(self, rows: list[Row]):
        """(ids, mask, position ids) of the rows' prompts left-padded to the longest, on the batch's device."""
        from tunelab.data.batching import pad_prompts

        ids, mask = pad_prompts([row.prompt_ids for row in rows], 0)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)

    def _prefill_scored(self, rows: list[Row]):
        """Rows whose prompts are scored (vLLM's prompt_logprobs, OpenAI's echo), together: left-padded as
        `_prefill` pads them, with the logits of every position, `SCORED_LOGITS` of them at a time across the
        rows (the cache carried from chunk to chunk), so that a long prompt never holds a (prompt x
        vocabulary) tensor. Each prompt token gets its log-probability given those before it, and the k best
        there; returns (per-layer (keys, values), mask) as `_prefill` does."""
        ids, mask, positions = self._left_padded(rows)
        n, width = ids.shape
        for row in rows:
            first = row.prompt_ids[0]
            row.scored = [Scored(first, row.tokenizer.decode([first]), None, None)]
        cache, last = _roomy_cache(), None
        chunk = max(1, SCORED_LOGITS // (self.vocabulary * n))
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            with torch.no_grad():
                out = self._forward(
                    ids[:, start:end],
                    mask[:, :end],
                    positions[:, start:end],
                    cache,
                    rows,
                    logits_to_keep=torch.arange(end - start, device=self.device),
                )
            cache, logits = _cache_of(out), out.logits.float()  # (n, c, V): column p's next token
            for b, row in enumerate(rows):  # its columns p in [start, end) that predict a prompt token p + 1
                low, high = max(start, width - len(row.prompt_ids)), min(end, width - 1)
                if low < high:
                    _score(row, logits[b, low - start : high - start], ids[b, low + 1 : high + 1])
            last = logits[:, -1]
        assert last is not None  # a prompt has at least one token
        _take_logits(rows, last)
        return _padding_zeroed(cache, mask), mask

    def _prefill_after(self, key: tuple, rows: list[Row]):
        """Rows that begin with the same prefix: its keys and values from the prefix cache (computed once,
        alone, on a miss), then the rest of each prompt in one forward pass, right-padded after the prefix
        so that every row's tokens sit at their true distances (a sliding window sees what it sees alone);
        then each row's cache is moved to the batch's left-padded layout."""
        length, prefixes = len(key[1]), self.prefixes
        assert prefixes is not None  # rows are grouped by prefix only with a prefix cache
        cached = prefixes.get(key)
        if cached is None:
            prefixes.misses += 1
            ids = torch.tensor([list(key[1])], device=self.device)
            with torch.no_grad():
                out = self._forward(
                    ids, torch.ones_like(ids), torch.arange(length, device=self.device)[None], _roomy_cache(), rows[:1]
                )
            cached = [(layer.keys.clone(), layer.values.clone()) for layer in _cache_of(out).layers]
            prefixes.put(key, cached)
        else:
            prefixes.hits += 1
        n, rests = len(rows), [row.prompt_ids[length:] for row in rows]
        width = max(len(r) for r in rests)
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, length + width), dtype=torch.long)
        mask[:, :length] = 1
        for b, rest in enumerate(rests):
            ids[b, : len(rest)] = torch.tensor(rest)
            mask[b, length : length + len(rest)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = torch.arange(length, length + width, device=self.device).expand(n, width)
        cache = _roomy_cache()
        for i, (k, v) in enumerate(cached):
            cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i)
        last = [len(r) - 1 for r in rests]
        wanted = sorted(set(last))  # the positions that are some row's last prompt token
        own = torch.tensor([wanted.index(i) for i in last], device=self.device)
        with torch.no_grad(), _each_row_at(self.model, own):
            out = self._forward(
                ids, mask, positions, cache, rows, logits_to_keep=torch.tensor(wanted, device=self.device)
            )
        logits = out.logits  # (n, 1, V); a model that computes its logits without calling its output layer: all kept
        _take_logits(rows, (logits[:, 0] if logits.shape[1] == 1 else logits[torch.arange(n), own]).float())
        total = length + width  # to the left-padded layout: row b's tokens end at the last column
        shift = [width - len(r) for r in rests]
        left = torch.zeros((n, total), dtype=torch.long, device=self.device)
        layers = []
        for layer in _cache_of(out).layers:
            keys, values = torch.zeros_like(layer.keys[:, :, :total]), torch.zeros_like(layer.values[:, :, :total])
            for b in range(n):
                real = total - shift[b]
                keys[b, :, shift[b] :], values[b, :, shift[b] :] = layer.keys[b, :, :real], layer.values[b, :, :real]
            layers.append((keys, values))
        for b in range(n):
            left[b, shift[b] :] = 1
        return layers, left

    def _join(self, rows: list[Row], *caches: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]) -> None:
        """Append `rows` and their left-padded caches, each (per-layer (keys, values), mask), in their order,
        to the batch's: all right-aligned at the widest, in one new buffer a layer (`RoomyLayer.place`)."""
        if not caches:
            return
        self.rows += rows
        parts = list(caches)
        if self.cache is not None:
            assert self.mask is not None  # set with the cache
            parts.insert(0, ([(layer.keys, layer.values) for layer in self.cache.layers], self.mask))
        width = max(mask.shape[1] for _, mask in parts)
        if self.cache is None:
            self.cache = _roomy_cache()
            self.cache.layers = [self.cache.layer_class_to_replicate() for _ in caches[0][0]]
        for i, layer in enumerate(self.cache.layers):
            layer.place([layers[i] for layers, _ in parts], width)
        self.mask = torch.cat([_pad_left(mask, width) for _, mask in parts])

    def step(self, cancelled: Callable[[Row], bool] = lambda row: False) -> list[tuple[Row, Step]]:
        """Every row takes its next token; finished and cancelled rows leave; the others advance one
        position in one forward pass. Returns the (row, step) events, in row order."""
        events = self.choose(cancelled)
        self.advance()
        return events

    def choose(self, cancelled: Callable[[Row], bool] = lambda row: False) -> list[tuple[Row, Step]]:
        """Every row takes its next token from the logits it has (the first half of `step`: a server sends
        these before the forward pass that follows)."""
        events = []
        for row in self.rows:
            if cancelled(row):
                row.done = True
            else:
                events += [(row, step) for step in row.choose()]
        return events

    def advance(self, riding: Sequence[tuple[Prefill, int]] = ()) -> None:
        """Finished and cancelled rows leave; the others feed the token they chose, in one forward pass.
        `riding`: prompts whose next tokens (that many of each) are computed in the same pass (where
        `fuses`); one whose last tokens these are joins the batch after it. None rides a pass that does not
        run (no row left): the caller computes them apart."""
        self._keep([i for i, row in enumerate(self.rows) if not row.done])
        if self.rows:
            assert self.mask is not None  # rows in the batch: their cache and mask are there
            ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.device)
            positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
            mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)], 1)
            if self.decoder is not None and not any(row.adapter for row in self.rows):
                assert not riding or self.fuses()
                chunks = [prefill.chunk_of(n) for prefill, n in riding]
                logits = self._fp32(self.decoder.step(ids[:, 0], positions[:, 0], self.cache, mask, chunks))
            else:
                assert not riding  # only the written-out steps take prompts beside the rows
                with torch.no_grad():
                    out = self._forward(ids, mask, positions, self.cache, self.rows)
                self.cache, logits = _cache_of(out), self._fp32(out.logits[:, -1])
            self.mask = mask
            rows = len(self.rows)
            _take_logits(self.rows, logits[:rows])
            for row in self.rows:
                row.position += 1
            done = [prefill for (prefill, n), last in zip(riding, logits[rows:]) if prefill.computed_in_step(n, last)]
            self._join([prefill.row for prefill in done], *(prefill.computed_cache() for prefill in done))

    def fuses(self) -> bool:
        """Whether prompts can ride the next decode step (`advance`'s `riding`): rows are decoding, through
        written-out steps with the model's own weights, none with an adapter."""
        return (
            bool(self.rows)
            and self.decoder is not None
            and self.decoder.fuses
            and not any(row.adapter for row in self.rows)
        )

    def _fp32(self, logits: torch.Tensor) -> torch.Tensor:
        """A decode step's (B, V) logits in fp32, written over the last step's (each row has chosen from those
        by now: `step` is `choose`, then `advance`). A fresh cast was a new 34 MB mapping every step (Gemma-3's
        262k vocabulary, 32 rows: glibc maps blocks over 32 MB on their own), its pages faulted in and zeroed
        each time: with the argmax, 14 ms against 5 in a reused buffer, of a step of about 110 ms (machine A;
        whole decodes of 96 prompts moved by less than the machine's own spread). The argmax of the bf16
        logits themselves is slower still (15 ms)."""
        if logits.dtype == torch.float32:
            return logits
        if self.scores is None or self.scores.shape[0] < logits.shape[0] or self.scores.shape[1] != logits.shape[1]:
            self.scores = torch.empty((max(self.max_rows, logits.shape[0]), logits.shape[1]), device=logits.device)
        return self.scores[: logits.shape[0]].copy_(logits)

    def _forward(self, ids, mask, positions, cache, rows: list[Row], logits_to_keep: int | torch.Tensor = 1):
        kwargs = {"attention_mask": mask, "position_ids": positions} if mask is not None else {}
        if cache is not None:
            kwargs.update(_cache_kwarg(cache))
        if self.adapters:
            kwargs["adapter_names"] = [row.adapter or "__base__" for row in rows]
        # logits of the last position only: a prefill's full logits would cost a (prompt x vocabulary) matmul.
        # As positions to gather, not a count: a count slices hidden[:, -1:], a strided view that torch's CPU
        # matmul cannot fold to 2-D, so it runs a bmm on the output weight expanded to every row and copied
        # (Gemma-3, 32 rows: an 11 GB copy and 19 s per prefill, against 0.04 s for the gathered rows)
        if isinstance(logits_to_keep, int) and ids.shape[1] > logits_to_keep:
            logits_to_keep = torch.arange(ids.shape[1] - logits_to_keep, ids.shape[1], device=self.device)
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=logits_to_keep, **kwargs)

    def _keep(self, indices: list[int]) -> None:
        """Keep these rows (drop the others from the cache), then trim padding columns no row needs."""
        if len(indices) == len(self.rows):
            return
        kept = set(indices)
        for i, row in enumerate(self.rows):
            if i not in kept:  # its logits are a view of the whole batch's (B, V): kept, they keep all of it alive
                row.logits = None  # (Gemma-3, 32 rows: 34 MB a finished row; 325 SNI rows climbed to 6-10 GB)
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            self.cache = self.mask = None
            return
        assert self.mask is not None  # rows in the batch: their cache and mask are there
        index = torch.tensor(indices, device=self.device)
        start = int((self.mask.index_select(0, index).sum(0) > 0).nonzero()[0])
        self.mask = self.mask.index_select(0, index)[:, start:]
        for layer in self.cache.layers:
            rows = (layer.keys[:, :, start:].index_select(0, index), layer.values[:, :, start:].index_select(0, index))
            layer.place([rows], self.mask.shape[1])


class Prefill:
    """A prompt computed a chunk at a time, its cache carried from chunk to chunk, while the batch goes on
    decoding (chunked prefill): the rows already decoding wait for one chunk at a time, not for the whole
    prompt. Where the batch `fuses`, each chunk rides a decode step (`Batch.advance(riding)`: one pass
    reads the weights for both, as vLLM runs it); otherwise a chunk of `chunk` tokens is a pass of its own
    between two steps (`advance`: transformers' forward takes rectangular batches, which would pad every
    decode row to the chunk's length). After its last chunk the row joins the batch as `Batch.add` joins it
    (left-padded: every row's cache then spans the prompt's width).

        prefill = Prefill(batch, row, 256)
        while not prefill.advance():   # one chunk in a pass of its own; True once the row has joined
            batch.step()
        # or, riding the steps:  batch.choose(); batch.advance([(prefill, min(prefill.left, 256))])
    """

    def __init__(self, batch: Batch, row: Row, chunk: int):
        self.batch, self.row, self.chunk = batch, row, max(1, chunk)
        self.computed = 0  # prompt tokens whose keys and values are in `cache`
        self.cache: Any = _roomy_cache()
        self.joined = False  # its last chunk computed: the row is in the batch
        batch._seed(row)

    def advance(self, whole: bool = False) -> bool:
        """Compute the next chunk of the prompt in a pass of its own (`whole`: all the rest of it, in one
        pass: when no row is decoding, nothing gains from smaller passes); after the last one the row joins
        the batch (True)."""
        batch, prompt, start = self.batch, self.row.prompt_ids, self.computed
        end = len(prompt) if whole else min(start + self.chunk, len(prompt))
        last = end == len(prompt)
        ids = torch.tensor([prompt[start:end]], device=batch.device)
        mask = torch.ones((1, end), dtype=torch.long, device=batch.device)
        positions = torch.arange(start, end, device=batch.device)[None]
        # no logits before the last chunk: an empty set of positions, not a count (0 would keep them all)
        keep = 1 if last else torch.arange(0, device=batch.device)
        with torch.no_grad():
            out = batch._forward(ids, mask, positions, self.cache, [self.row], logits_to_keep=keep)
        self.cache, self.computed = _cache_of(out), end
        if last:
            self._join(out.logits[:, -1].float())
        return last

    @property
    def left(self) -> int:
        """Prompt tokens not computed yet."""
        return len(self.row.prompt_ids) - self.computed

    def chunk_of(self, n: int):
        """Its next `n` tokens, to ride a decode step (`Batch.advance`)."""
        from tunelab.infer.steps import Chunk

        ids = torch.tensor(self.row.prompt_ids[self.computed : self.computed + n], device=self.batch.device)
        return Chunk(ids, self.computed, self.cache)

    def computed_in_step(self, n: int, logits: torch.Tensor) -> bool:
        """`n` more tokens computed inside a decode step; `logits` (V,): its last one's next-token logits,
        taken if it was the prompt's last: then the row is ready to join the batch (True; `Batch.advance`
        joins all of a step's at once)."""
        self.computed += n
        if self.left:
            return False
        self._done(logits[None])
        return True

    def _done(self, logits: torch.Tensor) -> None:
        """The prompt computed: its row takes its first logits (1, V) and is ready to join."""
        _take_logits([self.row], logits)
        self.joined = True

    def _join(self, logits: torch.Tensor) -> None:
        self._done(logits)
        self.batch._join([self.row], self.computed_cache())

    def computed_cache(self):
        """(per-layer (keys, values), mask) of the whole prompt, as `Batch._join` takes it."""
        mask = torch.ones((1, self.computed), dtype=torch.long, device=self.batch.device)
        return [(layer.keys, layer.values) for layer in self.cache.layers], mask


def _score(row: Row, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Append to `row.scored` each target token's log-probability under (m, V) `logits`, and the k best."""
    logprobs = logits.log_softmax(-1)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    k, decode = row.params.prompt_logprobs or 0, row.tokenizer.decode
    best = logprobs.topk(k) if k else None
    assert row.scored is not None
    for i, (token, value) in enumerate(zip(targets.tolist(), chosen)):
        top = [(decode([t]), v) for t, v in zip(best.indices[i].tolist(), best.values[i].tolist())] if best else []
        row.scored.append(Scored(token, decode([token]), value, top))


SCORED_LOGITS = 1 << 24  # logits held at once when a prompt is scored (64 MB of fp32): 341 positions of SmolLM2


def _take_logits(rows: list[Row], logits: torch.Tensor) -> None:
    """Each row's next-token logits from the (B, V) of one forward pass, and their argmax in one call for
    the greedy rows (per row, it was 8% of a 32-row Gemma-3 decode step: its vocabulary has 262k tokens)."""
    greedy = [b for b, row in enumerate(rows) if row.params.temperature == 0]
    # max's indices are argmax's (the first of equal maxima, NaN first), in 4.3 ms where argmax takes 11.3
    # (32 x 262k fp32 on machine C)
    best = (logits if len(greedy) == len(rows) else logits[greedy]).max(-1).indices.tolist() if greedy else []
    for b, row in enumerate(rows):
        row.logits, row.best = logits[b], None
    for b, token in zip(greedy, best):
        rows[b].best = token


@contextlib.contextmanager
def _each_row_at(model, own: torch.Tensor):
    """The output layer fed only row b's own position `own[b]` of the positions a forward pass keeps, so
    that its logits are (B, 1, V): `logits_to_keep` keeps the same positions of every row, and rows whose
    prompts end at different places kept all of them (32 rows at 22 places: a 704 x 262k matmul, 1 s on
    Gemma-3, where 32 x 262k takes 50 ms)."""
    rows = torch.arange(len(own), device=own.device)

    def gather(module, args):
        return (args[0][rows, own][:, None], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def run_to_end(
    model,
    rows: list[Row],
    max_rows: int = 16,
    finished: Callable[[Row], None] = lambda row: None,
    prefixes: PrefixCache | None = None,
    join_at: int = 1,
    decoder=None,
) -> list[Row]:
    """Decode every row to its end on one continuous batch of at most `max_rows`: rows join in the order
    given, as soon as `join_at` others have left (the server's engine without the server); `finished`
    hears of each row as it ends. With `prefixes`, rows' shared prefixes (`Row.prefix`) are computed once;
    with `decoder` (`infer.steps.Decoder`), decode steps are its written-out steps (int8 weights, or the
    model's own). Returns `rows`, each with its `tokens`, `answer` and `finish_reason`."""
    from collections import deque

    waiting, batch = deque(rows), Batch(model, max_rows, prefixes, decoder)
    batch.adapters = False  # the model as it is: a peft model decodes with its active adapter
    while waiting or batch.rows:
        free = max_rows - len(batch.rows)
        joining = (
            [waiting.popleft() for _ in range(min(len(waiting), free))]
            if free >= min(join_at, max_rows) or not batch.rows
            else []
        )
        if joining:
            batch.add(*joining)
        for row, step in batch.step():
            if step.finish_reason is not None:
                finished(row)
    return rows


def _padding_zeroed(cache, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the cache's (keys, values) with the padding columns zero: what the padding computed is never
    attended to, and zeros, unlike what a padded position may hold, are never NaN."""
    keep = mask[:, None, :, None]
    return [
        (layer.keys * keep.to(layer.keys.dtype), layer.values * keep.to(layer.values.dtype)) for layer in cache.layers
    ]


def _roomy_cache():
    """An empty KV cache whose layers grow into spare room (see `_roomy_layer_class`)."""
    from transformers import DynamicCache

    cache = DynamicCache()  # no config: it adds a layer of `layer_class_to_replicate` per decoder layer it sees
    cache.layer_class_to_replicate = _roomy_layer_class()
    return cache


@functools.cache
def _roomy_layer_class():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A DynamicLayer that writes each step's keys and values into spare room at the end of a buffer,
        instead of concatenating (a concatenation copies the whole cache every step: 10% of a 16-row
        SmolLM2 decode step at 150 positions, measured on machine C: 66.0 -> 59.2 ms, the same logits).
        `keys` / `values` are views of the buffer; rows joining or leaving are placed in a new one (`place`);
        if `keys` is replaced from outside, the next update starts a new buffer from it; so does a forward
        outside inference mode after written-out steps (which run in it) made the buffer: an inference
        tensor is written in place only inside it."""

        room = 64  # positions of spare room a new buffer gets

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.key_room = self.value_room = self.given = None
            assert self.keys is not None  # set by lazy_initialization
            length, new = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
            # a new buffer when there is none, when the batcher replaced `keys` (told by identity: a view's
            # `_base` is not kept in inference mode), when it is full, or when it cannot be written here
            if (
                self.key_room is None
                or self.keys is not self.given
                or length + new > self.key_room.shape[-2]
                or (self.key_room.is_inference() and not torch.is_inference_mode_enabled())
            ):
                shape = (*key_states.shape[:-2], length + new + self.room, key_states.shape[-1])
                self.key_room, self.value_room = key_states.new_zeros(shape), value_states.new_zeros(shape)
                if length:
                    self.key_room[:, :, :length], self.value_room[:, :, :length] = self.keys, self.values
            self.key_room[:, :, length : length + new] = key_states
            self.value_room[:, :, length : length + new] = value_states
            self.keys, self.values = self.key_room[:, :, : length + new], self.value_room[:, :, : length + new]
            self.given = self.keys
            return self.keys, self.values

        def place(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
            """Rows' keys and values (B_i, KV, T_i, D), part after part, each right-aligned at `width` columns
            (zeros on its left), in a new buffer with spare room: one copy, where a concatenation and then
            the next update's new buffer made two, and zeroed the whole buffer (rows joining a 16-row
            SmolLM2 batch at 154 columns: 13 ms a join, most of a step, measured on machine C)."""
            keys, values = parts[0]
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
            shape = (sum(k.shape[0] for k, _ in parts), keys.shape[1], width + self.room, keys.shape[-1])
            self.key_room, self.value_room = keys.new_empty(shape), values.new_empty(shape)
            start = 0
            for keys, values in parts:
                rows, length = keys.shape[0], keys.shape[-2]
                for room, part in ((self.key_room, keys), (self.value_room, values)):
                    room[start : start + rows, :, : width - length].zero_()
                    room[start : start + rows, :, width - length : width] = part
                start += rows
            self.keys, self.values = self.key_room[:, :, :width], self.value_room[:, :, :width]
            self.given = self.keys

    return RoomyLayer


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A (B, T) mask with zeros before its columns, to `width` columns (keys and values are padded as
    `RoomyLayer.place` writes them)."""
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def _cache_kwarg(cache) -> dict:
    """The KV cache as the next forward takes it (transformers 5 renamed `past_key_values` to `cache`)."""
    return {_cache_name(): cache}


@functools.cache
def _cache_name() -> str:
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
