"""The HTTP routes, OpenAI's: each reads a request, hands one job to the engine, and returns one OpenAI
object (or a stream of them as server-sent events). Errors are OpenAI's error objects with the status
the official client maps to its typed exceptions; nothing here ever returns a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse

from tunelab.infer.decode import Params
from tunelab.serve import protocol
from tunelab.serve.engine import Engine, Job, ServeError
from tunelab.serve.http import error as _error
from tunelab.serve.http import openai_errors as _openai_errors
from tunelab.serve.http import parse, too_large
from tunelab.serve.redact import Redactor
from tunelab.serve.security import Access
from tunelab.serve.store import ModelStore, Served


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # a request body larger than this is refused (413)
    max_tokens: int = 4096  # the most new tokens a request may ask for
    max_n: int = 8  # the most choices a request may ask for
    max_queue: int = 64  # requests waiting beyond this are refused (503)
    max_batch: int = 16  # sequences decoding together on one model
    max_prefill: int = 256  # prompt positions (rows x the longest) computed in one pass between decode steps


def create_app(store: ModelStore, api_key: str | None = None, limits: Limits | None = None, jobs=None,
               access: Access | None = None) -> FastAPI:
    """The server's app; with `jobs` (a `jobs.api.Jobs`), also OpenAI's files and fine-tuning jobs API,
    whose fine-tuned models it serves. `access` says who may talk to it (`serve.security`); `api_key`
    alone is the same as `Access(api_key=...)` on a loopback address."""
    limits = limits or Limits()
    access = access or Access(api_key=api_key)
    engine = Engine(store, limits.max_queue, limits.max_batch, limits.max_prefill)
    redactor = Redactor(lambda: _public_names(store, jobs))
    if jobs is not None:
        store.extra = jobs.models

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if jobs is not None:
            jobs.runner.start()
        yield
        if jobs is not None:
            jobs.runner.close()
        engine.close()

    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.store, app.state.access = engine, store, access

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Who may ask (`serve.security`), body size, no server path in an answer (`serve.redact`), and
        one log line per request (method, path, model, tokens, latency)."""
        started = time.perf_counter()
        request.state.model, request.state.tokens, request.state.streaming = "-", 0, False
        refused = access.refusal(request)
        if refused is not None:
            response = _error(refused)
        elif _content_length(request) > _body_limit(request, limits, jobs):
            response = _error(_too_large(limits) if jobs is None or request.url.path != "/v1/files" else
                              ServeError(413, f"the upload is over the server's limit of {jobs.max_upload_bytes >> 20:,} MB "
                                         "(--max-upload-mb)", param="file", code="file_too_large"))
        else:
            response = await call_next(request)
            if _may_name_paths(request, response):
                response = await _redacted(response, redactor)
        response.headers["X-Content-Type-Options"] = "nosniff"  # JSON is never run as a script by a foreign page

        def log() -> None:
            print(f"{request.method} {request.url.path} {response.status_code} model={request.state.model} "
                  f"tokens={request.state.tokens} {1000 * (time.perf_counter() - started):.0f} ms", file=sys.stderr,
                  flush=True)

        if request.state.streaming:  # its line is written when the stream ends, with the tokens it sent
            body = response.body_iterator

            async def logged():
                try:
                    async for chunk in body:
                        yield chunk
                finally:
                    log()

            response.body_iterator = logged()
        else:
            log()
        return response

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug of ours: one line in the log, no traceback out
        print(f"tunelab serve: internal error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return _error(ServeError(500, "internal error", kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        served = await asyncio.to_thread(store.served)
        return {"object": "list", "data": [protocol.model_object(s.id, s.created) for s in served.values()]}

    if jobs is not None:
        from tunelab.jobs.api import add_routes

        add_routes(app, jobs)
    from tunelab.dashboard.api import add_routes as add_dashboard

    add_dashboard(app, store.runs, jobs, store)
    if access.allowed_origins:  # the browser's preflight for those origins (added last: it runs first)
        app.add_middleware(CORSMiddleware, allow_origins=list(access.allowed_origins), allow_headers=["*"],
                           allow_methods=["GET", "POST", "DELETE"], max_age=600)

    @app.get("/v1/models/{model_id:path}")
    @_openai_errors
    async def get_model(model_id: str):
        served = await _model(store, model_id, None)
        return protocol.model_object(served.id, served.created)

    async def read(request: Request, schema, generates: bool):
        """The request's body as `schema` says, and the served model it names."""
        body = await _parse(request, schema, limits)
        served = await _model(store, body.model, generates)
        request.state.model = served.id
        return body, served

    @app.post("/v1/chat/completions")
    @_openai_errors
    async def chat_completions(request: Request):
        body, served = await read(request, protocol.ChatCompletionRequest, True)
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.max_tokens
        _check_counts(body.n, max_tokens, limits)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prepare = _choices([messages], _chat_ids, body.n, max_tokens,
                           _params(body, max_tokens, body.top_logprobs or 0 if body.logprobs else None))
        return await _answer(request, engine, Job(served, prepare, asyncio.get_running_loop()), body, "chat")

    @app.post("/v1/completions")
    @_openai_errors
    async def completions(request: Request):
        body, served = await read(request, protocol.CompletionRequest, True)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ServeError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        _check_counts(body.n * len(prompts), body.max_tokens, limits)
        prepare = _choices(prompts, lambda tokenizer, text: tokenizer(text).input_ids, body.n, body.max_tokens,
                           _params(body, body.max_tokens, body.logprobs))
        return await _answer(request, engine, Job(served, prepare, asyncio.get_running_loop()), body, "text")

    @app.post("/v1/embeddings")
    @_openai_errors
    async def embeddings(request: Request):
        body, served = await read(request, protocol.EmbeddingRequest, False)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(texts):
            raise ServeError(400, "input: give a non-empty string or a list of non-empty strings", param="input")
        job = Job(served, lambda loaded, tokenizer: _embed(loaded.model, tokenizer, texts),
                  asyncio.get_running_loop(), embed=True)
        engine.submit(job)
        event = await job.events.get()
        if event[0] == "error":
            raise event[1]
        vectors, tokens = event[1]
        request.state.tokens = tokens
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64(v) if body.encoding_format == "base64" else v} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": served.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


# --- requests -------------------------------------------------------------------------------------------


def _content_length(request: Request) -> int:
    try:
        return int(request.headers.get("content-length") or 0)
    except ValueError:
        return 0  # the HTTP server refuses a malformed length before we see it


def _may_name_paths(request: Request, response) -> bool:
    """Answers that could carry a path of this machine: errors, the dashboard's data and the jobs API's
    objects (never a model's text, which is the model's to write)."""
    if request.state.streaming or not response.headers.get("content-type", "").startswith("application/json"):
        return False
    path = request.url.path
    return response.status_code >= 400 or path.startswith(("/api/", "/v1/fine_tuning/", "/v1/files"))


async def _redacted(response, redactor: Redactor) -> Response:
    body = b"".join([chunk async for chunk in response.body_iterator])
    body = await asyncio.to_thread(redactor.json_bytes, body)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers)


def _public_names(store: ModelStore, jobs) -> dict[Path, str]:
    """What a client is shown for the folders of this server (see serve.redact)."""
    from tunelab.models.registry import tunelab_home

    names = {Path.home(): "~", tunelab_home(): "$TUNELAB_HOME"}
    if store.runs is not None:
        names[store.runs.resolve()] = "<runs>"
    for served in store.fixed.values():
        names[served.folder] = served.id
    if jobs is not None:
        names.update(jobs.public_names())
    return names


def _body_limit(request: Request, limits: Limits, jobs) -> int:
    """Uploads have their own bound (`--max-upload-mb`, counted as they stream in); every other body `limits`'."""
    if jobs is not None and request.method == "POST" and request.url.path == "/v1/files":
        return jobs.max_upload_bytes
    return limits.max_body_bytes


def _too_large(limits: Limits) -> ServeError:
    return too_large(limits.max_body_bytes)


async def _parse(request: Request, schema, limits: Limits):
    return await parse(request, schema, limits.max_body_bytes)


async def _model(store: ModelStore, model_id: str, generates: bool | None) -> Served:
    served = await asyncio.to_thread(store.get, model_id)
    if served is None and model_id in store.unavailable:
        raise ServeError(404, f"the model '{model_id}' cannot be served here: {store.unavailable[model_id]}",
                         param="model", code="model_not_found")
    if served is None:
        raise ServeError(404, f"the model '{model_id}' does not exist here (GET /v1/models lists what is served)",
                         param="model", code="model_not_found")
    if generates is True and not served.generates:
        raise ServeError(400, f"the model '{model_id}' is an encoder: it gives embeddings (POST /v1/embeddings), "
                         "not text", param="model")
    if generates is False and served.generates:
        raise ServeError(400, f"the model '{model_id}' writes text; embeddings come from an encoder model", param="model")
    return served


def _check_counts(choices: int, max_tokens: int, limits: Limits) -> None:
    if choices > limits.max_n:
        raise ServeError(400, f"n: at most {limits.max_n} choices a request here (asked for {choices})", param="n")
    if max_tokens > limits.max_tokens:
        raise ServeError(400, f"max_tokens: at most {limits.max_tokens} here (asked for {max_tokens})", param="max_tokens")


def _check_context(model, prompt_tokens: int, max_tokens: int) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + max_tokens > context:
        raise ServeError(400, f"this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
                         f"tokens and max_tokens asks for {max_tokens} more", param="messages",
                         code="context_length_exceeded")


def _params(body, max_tokens: int, top_logprobs: int | None) -> Params:
    if len(body.stops()) > 4:
        raise ServeError(400, "stop: at most 4 stop sequences", param="stop")
    return Params(max_tokens, body.temperature, body.top_p, body.seed, body.stops(), top_logprobs)


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation through the model's chat template with the generation prompt, as `tunelab generate`."""
    from tunelab.infer.prompts import encode_prompt

    return encode_prompt(tokenizer, messages)[0].tolist()


def _choices(prompts: list, encode, n: int, max_tokens: int, params: Params):
    """The job's `prepare`: each prompt's ids (checked against the context length), n choices each."""

    def prepare(loaded, tokenizer) -> list:
        out = []
        for prompt in prompts:
            ids = encode(tokenizer, prompt)
            _check_context(loaded.model, len(ids), max_tokens)
            out += [(ids, _seeded(params, i)) for i in range(n)]
        return out

    return prepare


def _seeded(params: Params, choice: int) -> Params:
    """Choice i samples with seed + i: distinct choices, each repeatable."""
    from dataclasses import replace

    return replace(params, seed=None if params.seed is None else params.seed + choice)


# --- answers --------------------------------------------------------------------------------------------


async def _answer(request: Request, engine: Engine, job: Job, body, kind: str):
    """Submit the job; the first event decides the status (an error before any text is the response's
    status); then the whole answer, or a stream of chunks that stops the job if the client leaves."""
    engine.submit(job)
    try:
        first = await job.events.get()
        if first[0] == "error":
            raise first[1]
        answer = Answer(kind, job.served.id, body.n, request)
        if not body.stream:
            event = first
            while event[0] not in ("done", "error"):
                answer.add(event)
                event = await job.events.get()
            if event[0] == "error":
                raise event[1]
            return answer.whole()
    except asyncio.CancelledError:  # the server dropped the request (its client went away): stop decoding it
        job.cancelled = True
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    request.state.streaming = True

    async def stream():
        try:
            event = first
            while event[0] not in ("done", "error"):
                for chunk in answer.add(event):
                    yield f"data: {json.dumps(chunk)}\n\n"
                event = await job.events.get()
            if event[0] == "error":
                yield f"data: {json.dumps(protocol.error_body(event[1].message, event[1].kind))}\n\n"
            elif include_usage:
                yield f"data: {json.dumps(answer.chunk([], usage=answer.usage()))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client went away (or the answer is complete): nothing more to decode

    return StreamingResponse(stream(), media_type="text/event-stream")


class Answer:
    """The choices of one request as its events arrive, as a whole OpenAI object or as chunks."""

    def __init__(self, kind: str, model_id: str, n: int, request: Request):
        self.kind, self.model, self.n, self.request = kind, model_id, n, request
        self.id = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = protocol.now()
        self.texts: dict[int, list[str]] = {}
        self.logprobs: dict[int, list] = {}
        self.finish: dict[int, str] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    def add(self, event) -> list[dict]:
        """Take one engine event; the stream chunks it makes."""
        if event[0] == "prompt":
            _, index, count = event
            self.prompt_tokens[index] = count
            self.texts[index], self.logprobs[index] = [], []
            if self.kind == "chat":
                return [self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}])]
            return []
        _, index, step = event
        if step.token is not None:
            self.completion_tokens += 1
        self.request.state.tokens = self.completion_tokens
        self.texts[index].append(step.text)
        entry = _logprob(step) if step.logprob is not None else None
        if entry is not None:
            self.logprobs[index].append(entry)
        if step.finish_reason:
            self.finish[index] = step.finish_reason
        if not step.text and not step.finish_reason:
            return []
        if self.kind == "chat":
            delta = {"content": step.text} if step.text else {}
            logprobs = {"content": [entry]} if entry is not None else None
            return [self.chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": step.finish_reason}])]
        return [self.chunk([{"index": index, "text": step.text, "logprobs": None, "finish_reason": step.finish_reason}])]

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
            text = "".join(self.texts[index])
            if self.kind == "chat":
                logprobs = {"content": self.logprobs[index]} if self.logprobs[index] else None
                choices.append({"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": logprobs, "finish_reason": self.finish.get(index, "length")})
            else:
                choices.append({"index": index, "text": text, "logprobs": self._text_logprobs(index),
                                "finish_reason": self.finish.get(index, "length")})
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(), "system_fingerprint": None}

    def _text_logprobs(self, index: int) -> dict | None:
        entries = self.logprobs[index]
        if not entries:
            return None
        offsets, at = [], 0
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}


def _logprob(step) -> dict:
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**item(step.token_text, step.logprob), "top_logprobs": [item(t, lp) for t, lp in step.top]}


def _embed(model, tokenizer, texts: list[str]) -> tuple[list[list[float]], int]:
    """Mean-pooled, L2-normalised last hidden states (what sentence-transformers computes for
    all-MiniLM-L6-v2), and the tokens read."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).tolist(), int(batch["attention_mask"].sum())


def _base64(vector: list[float]) -> str:
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()
