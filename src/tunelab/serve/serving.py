"""The serving layer between the routes and the engine, as vLLM's `OpenAIServingChat` is: a request object
in, the served model looked up and checked, one engine job, and one OpenAI object (or a stream of chunks)
out. The routes (serve/routes/) only read the body and call one method here.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from tunelab.errors import RequestError
from tunelab.ids import new_id, now
from tunelab.infer.constrain import Constraint, ConstraintError
from tunelab.infer.sampling import Sampling
from tunelab.serve import protocol
from tunelab.serve.engine import Choice, Done, Engine, Failed, Job, Prompt, Token
from tunelab.serve.responses import EventStream, ResponsesRequest, response_object
from tunelab.serve.store import ModelStore, Served
from tunelab.serve.tools import ToolUse, rendered


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # a request body larger than this is refused (413)
    max_tokens: int = 4096  # the most new tokens a request may ask for
    max_n: int = 8  # the most choices a request may ask for
    max_queue: int = 64  # requests waiting beyond this are refused (503)
    max_batch: int = 16  # sequences decoding together on one model
    max_prefill: int = 256  # prompt positions (rows x the longest) a pass between decode steps (longer: chunks)
    prefill_in_steps: bool = False  # prompts computed inside the decode steps where those are written out
    prefix_cache: int | None = None  # bytes of conversations' beginnings kept (None: 256 MB, none in fp32)


PREFIX_CACHE = 256 << 20  # bytes of keys and values of conversations' beginnings a server keeps by default


class Serving:
    """What the OpenAI inference routes do, over one model store and its engine."""

    def __init__(self, store: ModelStore, limits: Limits):
        self.store, self.limits = store, limits
        prefix_cache = limits.prefix_cache
        if prefix_cache is None:  # fp32 answers are exactly `tunelab generate`'s: whole prompts, always
            prefix_cache = 0 if store.precision == "fp32" and store.quantize != "int8" else PREFIX_CACHE
        self.engine = Engine(
            store, limits.max_queue, limits.max_batch, limits.max_prefill, limits.prefill_in_steps, prefix_cache
        )

    async def model(self, model_id: str, generates: bool | None = None) -> Served:
        """The served model `model_id` names (404 if none; 400 if it cannot do what is asked of it)."""
        store = self.store
        served = await asyncio.to_thread(store.get, model_id)
        if served is None and model_id in store.unavailable:
            raise RequestError(
                404,
                f"the model '{model_id}' cannot be served here: {store.unavailable[model_id]}",
                param="model",
                code="model_not_found",
            )
        if served is None:
            raise RequestError(
                404,
                f"the model '{model_id}' does not exist here (GET /v1/models lists what is served)",
                param="model",
                code="model_not_found",
            )
        if generates is True and not served.generates:
            raise RequestError(
                400,
                f"the model '{model_id}' is an encoder: it gives embeddings (POST /v1/embeddings), not text",
                param="model",
            )
        if generates is False and served.generates:
            raise RequestError(
                400, f"the model '{model_id}' writes text; embeddings come from an encoder model", param="model"
            )
        return served

    async def chat(self, request: Request, body: protocol.ChatCompletionRequest):
        job, tool_use = await self._chat_job(request, body)
        answer = Answer("chat", job.served.id, body.n, request, tool_use=tool_use)
        return await _answer(request, self.engine, job, answer, body.stream, OpenAIStream(body))

    async def responses(self, request: Request, body: ResponsesRequest):
        """OpenAI's Responses API: the chat completion it means, answered as a Response (or its events)."""
        chat = body.to_chat()
        job, tool_use = await self._chat_job(request, chat)
        answer = Answer("chat", job.served.id, 1, request, tool_use=tool_use)
        return await _answer(request, self.engine, job, answer, body.stream, ResponsesStream(body, job.served.id))

    async def _chat_job(self, request: Request, body: protocol.ChatCompletionRequest) -> tuple[Job, ToolUse | None]:
        _refuse(body)
        served = await self._named(request, body.model, True)
        max_tokens = body.max_completion_tokens or body.max_tokens or self.limits.max_tokens
        _check_counts(body.n, max_tokens, self.limits)
        messages = [rendered(m.rendered()) for m in body.messages]
        tool_use = ToolUse.of(body.tools, body.tool_choice, body.parallel_tool_calls) if body.tools else None
        constraint = body.constraint()
        forced = tool_use.constraint() if tool_use is not None else None  # a required or named tool call
        if forced is not None:
            if constraint is not None:
                raise RequestError(400, "tool_choice: a forced tool call takes no response_format", param="tool_choice")
            constraint = forced
        rows = Choices(
            served.id,
            [messages],
            _chat_ids,
            body.n,
            max_tokens,
            body.to_sampling(max_tokens, body.top_logprobs or 0 if body.logprobs else None),
            constraint,
            tool_use,
        )
        return Job(served, asyncio.get_running_loop(), rows=rows), tool_use

    async def completions(self, request: Request, body: protocol.CompletionRequest):
        _refuse(body)
        served = await self._named(request, body.model, True)
        prompts = body.prompts()
        if not prompts:
            raise RequestError(400, "prompt: give a text, token ids, or a non-empty list of either", param="prompt")
        _check_counts(body.n * len(prompts), body.max_tokens, self.limits)
        scored = body.logprobs if body.echo else None  # echo with logprobs: the prompt's tokens scored too
        rows = Choices(
            served.id,
            prompts,
            _completion_ids,
            body.n,
            body.max_tokens,
            body.to_sampling(body.max_tokens, body.logprobs, scored),
            body.constraint(),
        )
        job = Job(served, asyncio.get_running_loop(), rows=rows)
        answer = Answer("text", served.id, body.n, request, echo=body.echo)
        return await _answer(request, self.engine, job, answer, body.stream, OpenAIStream(body))

    async def embeddings(self, request: Request, body: protocol.EmbeddingRequest) -> dict:
        from tunelab.infer.embed import embed

        served = await self._named(request, body.model, False)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(texts):
            raise RequestError(400, "input: give a non-empty string or a list of non-empty strings", param="input")
        job = Job(
            served, asyncio.get_running_loop(), compute=lambda loaded, tokenizer: embed(loaded.model, tokenizer, texts)
        )
        self.engine.submit(job)
        event = await job.events.get()
        if isinstance(event, Failed):
            raise event.error
        vectors, tokens = event.value
        request.state.tokens = tokens
        data = [
            {"object": "embedding", "index": i, "embedding": _base64(v) if body.encoding_format == "base64" else v}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": served.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _named(self, request: Request, model_id: str, generates: bool) -> Served:
        served = await self.model(model_id, generates)
        request.state.model = served.id  # for the request's log line
        return served


def _refuse(body: protocol.SamplingRequest) -> None:
    """A 400 naming the first thing the request asks that the server does not do."""
    for param, why in body.refused():
        raise RequestError(400, f"{param}: {why}", param=param)


def _check_counts(choices: int, max_tokens: int, limits: Limits) -> None:
    if choices > limits.max_n:
        raise RequestError(400, f"n: at most {limits.max_n} choices a request here (asked for {choices})", param="n")
    if max_tokens > limits.max_tokens:
        raise RequestError(
            400, f"max_tokens: at most {limits.max_tokens} here (asked for {max_tokens})", param="max_tokens"
        )


def _check_context(model, prompt_tokens: int, max_tokens: int) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + max_tokens > context:
        raise RequestError(
            400,
            f"this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
            f"tokens and max_tokens asks for {max_tokens} more",
            param="messages",
            code="context_length_exceeded",
        )


REUSABLE_MIN = 16  # the fewest tokens of a conversation's beginning worth keeping for later prompts
_BOUNDARY = "tunelab: where the last message begins"  # a stand-in for it, to find where it begins


def _chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], str, tuple]:
    """The conversation (and the tools) through the model's chat template with the generation prompt, as
    `tunelab generate`; and the lengths of its beginnings that later requests may begin with: all of it
    (the conversation's next turn repeats it) and what comes before its last message's text (a system
    prompt, the earlier turns: what other conversations with the same system prompt begin with), where that
    is at least `REUSABLE_MIN` tokens."""
    from tunelab.infer.prompts import encode_prompt

    ids = encode_prompt(tokenizer, messages, tools=tools)[0].tolist()
    last = messages[-1] if messages else {}
    if not isinstance(last.get("content"), str) or not last["content"]:
        return ids, "", (len(ids),)
    other = encode_prompt(tokenizer, [*messages[:-1], {**last, "content": _BOUNDARY}], tools=tools)[0].tolist()
    shared = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))
    return ids, "", ((shared,) if shared >= REUSABLE_MIN else ()) + (len(ids),)


def _completion_ids(tokenizer, prompt: str | list[int], tools=None) -> tuple[list[int], str, tuple]:
    """A completion prompt's token ids (a text tokenized as vLLM does, special tokens added), its text, and
    no beginning of it kept for later prompts."""
    if isinstance(prompt, list):
        return prompt, tokenizer.decode(prompt), ()
    return tokenizer(prompt).input_ids, prompt, ()


@dataclass
class Choices:
    """A job's rows, made once its model is loaded (on the engine's thread): each prompt's ids (checked
    against the vocabulary and the context length), `n` choices each; a constrained answer's grammar is
    compiled here, once for all its rows (each row then follows it with its own matcher)."""

    model_id: str
    prompts: list
    encode: Callable  # (tokenizer, prompt, tools) -> (ids, the prompt as text, its reusable beginnings' lengths)
    n: int
    max_tokens: int
    params: Sampling
    constraint: Constraint | None = None
    tool_use: ToolUse | None = None  # chat with tools: checked against the template, shown to the model

    def __call__(self, loaded, tokenizer) -> list[Choice]:
        params, out = self.params, []
        if self.tool_use is not None:
            self.tool_use.check(tokenizer.chat_template)
        vocabulary = loaded.model.get_input_embeddings().num_embeddings
        _check_ids(params.logit_bias, vocabulary, "logit_bias")
        if self.constraint is not None:
            try:
                params = replace(params, grammar=loaded.grammars(self.model_id).compile(self.constraint))
            except ConstraintError as e:
                param = self.constraint.param
                raise RequestError(400, f"{param}: {e}", param=param) from None
        for prompt in self.prompts:
            ids, text, reusable = self.encode(tokenizer, prompt, self.tool_use.tools if self.tool_use else None)
            if not ids:
                raise RequestError(400, "prompt: empty (a prompt needs at least one token)", param="prompt")
            _check_ids(ids, vocabulary, "prompt")
            _check_context(loaded.model, len(ids), self.max_tokens)
            out += [Choice(ids, _seeded(params, i), text, reusable) for i in range(self.n)]
        return out


def _check_ids(ids, vocabulary: int, param: str) -> None:
    outside = next((i for i in ids if not 0 <= i < vocabulary), None)
    if outside is not None:
        raise RequestError(
            400, f"{param}: token id {outside} is outside this model's vocabulary (0 to {vocabulary - 1})", param=param
        )


def _seeded(params: Sampling, choice: int) -> Sampling:
    """Choice i samples with seed + i: distinct choices, each repeatable."""
    return replace(params, seed=None if params.seed is None else params.seed + choice)


# --- answers --------------------------------------------------------------------------------------------


async def _answer(request: Request, engine: Engine, job: Job, answer: Answer, streams: bool, wire):
    """Submit the job; the first event decides the status (an error before any text is the response's
    status); then the whole answer, or a stream (in `wire`'s form) that stops the job if the client leaves."""
    engine.submit(job)
    try:
        first = await job.events.get()
        if isinstance(first, Failed):
            raise first.error
        if not streams:
            event = first
            while not isinstance(event, (Done, Failed)):
                answer.add(event)
                event = await job.events.get()
            if isinstance(event, Failed):
                raise event.error
            return wire.whole(answer)
    except asyncio.CancelledError:  # the server dropped the request (its client went away): stop decoding it
        job.cancelled = True
        raise
    request.state.streaming = True

    async def stream():
        try:
            for line in wire.start():
                yield line
            event = first
            while not isinstance(event, (Done, Failed)):
                for chunk in answer.add(event):
                    for line in wire.lines(chunk):
                        yield line
                event = await job.events.get()
            for line in wire.failed(event.error) if isinstance(event, Failed) else wire.end(answer):
                yield line
        finally:
            job.cancelled = True  # the client went away (or the answer is complete): nothing more to decode

    return StreamingResponse(stream(), media_type="text/event-stream")


class OpenAIStream:
    """Chat and completions answers as OpenAI sends them: the object, or `data:` chunks ending in [DONE]."""

    def __init__(self, body):
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def whole(self, answer: Answer) -> dict:
        return answer.whole()

    def start(self) -> list[str]:
        return []

    def lines(self, chunk: dict) -> list[str]:
        return [f"data: {json.dumps(chunk)}\n\n"]

    def failed(self, error: RequestError) -> list[str]:
        return [f"data: {json.dumps(protocol.error_body(error.message, error.kind))}\n\n", "data: [DONE]\n\n"]

    def end(self, answer: Answer) -> list[str]:
        out = [line for chunk in answer.closing() for line in self.lines(chunk)]
        if self.include_usage:
            out += self.lines(answer.chunk([], usage=answer.usage()))
        return [*out, "data: [DONE]\n\n"]


class ResponsesStream:
    """A chat answer as the Responses API gives it: a Response object, or its typed events."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.body, self.events = body, EventStream(body, model)

    def whole(self, answer: Answer) -> dict:
        return response_object(answer.whole(), self.body, self.events.id)

    def start(self) -> list[str]:
        return self.events.start()

    def lines(self, chunk: dict) -> list[str]:
        return self.events.chunk(chunk)

    def failed(self, error: RequestError) -> list[str]:
        return [self.events.event("error", code=error.code, message=error.message, param=error.param)]

    def end(self, answer: Answer) -> list[str]:
        return [line for chunk in answer.closing() for line in self.events.chunk(chunk)] + self.events.end(
            answer.usage()
        )


class Answer:
    """The choices of one request as its events arrive, as a whole OpenAI object or as chunks. A completion
    with `echo` begins with its prompt (and, with logprobs, the prompt's tokens scored; the first one's
    log-probability null, as OpenAI gives it)."""

    def __init__(
        self, kind: str, model_id: str, n: int, request: Request, echo: bool = False, tool_use: ToolUse | None = None
    ):
        self.kind, self.model, self.n, self.request, self.echo = kind, model_id, n, request, echo
        self.tool_use = tool_use  # with tools, text that may be calls is held until the answer is whole
        self.sent: dict[int, int] = {}  # with tools: the characters of each answer streamed as content
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = now()
        self.texts: dict[int, list[str]] = {}
        self.logprobs: dict[int, list] = {}
        self.offsets: dict[int, int] = {}  # a completion's characters so far (its logprobs' text_offset)
        self.prompts: dict[int, str] = {}  # the prompts to echo, until their first step
        self.finish: dict[int, str] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    def add(self, event: Prompt | Token) -> list[dict]:
        """Take one engine event; the stream chunks it makes."""
        if isinstance(event, Prompt):
            return self._begin(event)
        index, step = event.index, event.step
        if step.token is not None:
            self.completion_tokens += 1
        self.request.state.tokens = self.completion_tokens
        if step.finish_reason:
            self.finish[index] = step.finish_reason
        if self.kind == "chat":
            return self._chat_step(index, step)
        text, entries = step.text, [_logprob(step)] if step.logprob is not None else []
        if index in self.prompts:  # echo: the prompt first
            text = self.prompts.pop(index) + text
            entries = [_scored(s) for s in step.prompt or []] + entries
        self.texts[index].append(text)
        self.logprobs[index] += entries
        logprobs = self._text_logprobs(entries, self.offsets[index]) if entries else None
        self.offsets[index] += sum(len(e["token"]) for e in entries)
        if not text and not step.finish_reason and not entries:
            return []
        return [self.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": step.finish_reason}])]

    def _begin(self, event: Prompt) -> list[dict]:
        index = event.index
        self.prompt_tokens[index] = event.tokens
        self.texts[index], self.logprobs[index], self.offsets[index] = [], [], 0
        if self.echo:
            self.prompts[index] = event.text
        if self.kind != "chat":
            return []
        delta = {"role": "assistant", "content": ""}
        return [self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])]

    def _chat_step(self, index: int, step) -> list[dict]:
        self.texts[index].append(step.text)
        entry = _logprob(step) if step.logprob is not None and not step.end else None  # OpenAI's chat: no end token
        if entry is not None:
            self.logprobs[index].append(entry)
        text = step.text
        if self.tool_use is not None:  # what may be calls waits: only what surely is text streams
            whole = "".join(self.texts[index])
            text = whole[self.sent.get(index, 0) : self.tool_use.releasable(whole)]
            self.sent[index] = self.sent.get(index, 0) + len(text)
            if not text:
                return []
            return [self.chunk([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])]
        if not text and not step.finish_reason:
            return []
        delta = {"content": text} if text else {}
        logprobs = {"content": [entry]} if entry is not None else None
        return [
            self.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": step.finish_reason}])
        ]

    def _message(self, index: int) -> tuple[dict, str]:
        """A whole chat answer as OpenAI's message (content, or tool calls), and its finish reason."""
        text, reason = "".join(self.texts[index]), self.finish.get(index, "length")
        if self.tool_use is None:
            return {"role": "assistant", "content": text, "refusal": None}, reason
        content, calls = self.tool_use.calls(text)
        message: dict = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
        return message, self.tool_use.finish_reason(calls, reason)

    def closing(self) -> list[dict]:
        """With tools, each answer's end: the text not streamed yet, or its calls; then its finish reason."""
        if self.tool_use is None:
            return []
        out = []
        for index in sorted(self.texts):
            message, reason = self._message(index)
            rest = "".join(self.texts[index])[self.sent.get(index, 0) :]
            message["content"] = None if message.get("tool_calls") else rest
            if message["content"]:
                out.append(
                    self.chunk(
                        [
                            {
                                "index": index,
                                "delta": {"content": message["content"]},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                )
            for i, call in enumerate(message.get("tool_calls", [])):
                delta = {"tool_calls": [{"index": i, **call}]}
                out.append(self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]))
            out.append(self.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]))
        return out

    def usage(self) -> dict:
        """Each prompt counted once (not once per choice), and every token generated."""
        prompts = sum(count for index, count in self.prompt_tokens.items() if index % self.n == 0)
        return protocol.usage(prompts, self.completion_tokens)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self) -> dict:
        choices = []
        for index in sorted(self.texts):
            text = self.prompts.get(index, "") + "".join(self.texts[index])  # a prompt never stepped: echoed here
            if self.kind == "chat":
                logprobs = {"content": self.logprobs[index]} if self.logprobs[index] else None
                message, reason = self._message(index)
                choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
            else:
                entries = self.logprobs[index]
                choices.append(
                    {
                        "index": index,
                        "text": text,
                        "logprobs": self._text_logprobs(entries, 0) if entries else None,
                        "finish_reason": self.finish.get(index, "length"),
                    }
                )
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
            "system_fingerprint": None,
        }

    @staticmethod
    def _text_logprobs(entries: list[dict], start: int) -> dict:
        """The completions API's log-probabilities of `entries`, the first at character `start`."""
        offsets, at = [], start
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                for e in entries
            ],
            "text_offset": offsets,
        }


def _item(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprob(step) -> dict:
    return {**_item(step.token_text, step.logprob), "top_logprobs": [_item(t, lp) for t, lp in step.top]}


def _scored(scored) -> dict:
    """A prompt token scored (`infer.decode.Scored`) as a log-probability entry."""
    top = None if scored.top is None else [_item(t, lp) for t, lp in scored.top]
    return {**_item(scored.text, scored.logprob), "top_logprobs": top}


def _base64(vector: list[float]) -> str:
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()
