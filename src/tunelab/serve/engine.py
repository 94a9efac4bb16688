"""The queue requests wait in and the worker that runs them.

A request becomes a `Job`: what to run (its `prepare` builds the token ids and sampling parameters of
each choice once its model is loaded) and a stream of events back to the HTTP handler: `("step", choice,
Step)`, then `("done",)`, or one `("error", ServeError)`. A full queue refuses new jobs (the handler
answers 503); a handler whose client went away sets `job.cancelled` and decoding stops at the next token.

This first engine decodes one job at a time, in arrival order, on one worker thread (which also keeps
every model call on one thread). Batching requests that arrive while others decode is the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from tunelab.serve.store import Loaded, ModelStore, Served


class ServeError(Exception):
    """An error the client caused or must hear about, as OpenAI reports it: HTTP status, message, type,
    the parameter at fault and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass
class Job:
    served: Served
    prepare: Callable[[Loaded, object], list]  # (loaded model, tokenizer) -> [(prompt ids, Params)] or a result
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    embed: bool = False  # prepare's result is the answer itself (embeddings), nothing to decode

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, store: ModelStore, max_queue: int = 64):
        self.store = store
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.history: deque[tuple[str, int, bool]] = deque(maxlen=64)  # (model id, tokens decoded, cancelled)
        self.worker = threading.Thread(target=self._work, name="tunelab-engine", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ServeError(503, "the server is overloaded: too many requests are waiting; retry later",
                             code="server_overloaded", kind="server_error") from None

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled:
                continue
            try:
                self._run(job)
            except ServeError as e:
                job.emit("error", e)
            except Exception as e:  # a bug of ours: the client hears a 500, the log gets the cause
                print(f"tunelab serve: internal error: {type(e).__name__}: {e}", flush=True)
                job.emit("error", ServeError(500, "internal error", kind="server_error"))

    def _run(self, job: Job) -> None:
        from tunelab.infer.decode import decode

        loaded = self.store.load(job.served)
        tokenizer = loaded.tokenizers[job.served.id]
        if job.embed:
            job.emit("result", job.prepare(loaded, tokenizer))
            job.emit("done")
            return
        choices = job.prepare(loaded, tokenizer)
        decoded = 0
        with self._adapter(loaded, job.served):
            for index, (prompt_ids, params) in enumerate(choices):
                job.emit("prompt", index, len(prompt_ids))
                for step in decode(loaded.model, tokenizer, prompt_ids, params, loaded.stop_ids, lambda: job.cancelled):
                    decoded += step.token is not None
                    job.emit("step", index, step)
                if job.cancelled:
                    break
        self.history.append((job.served.id, decoded, job.cancelled))
        job.emit("done")

    @staticmethod
    def _adapter(loaded: Loaded, served: Served):
        """The served model's weights: its adapter switched on, or, for the base, every adapter off."""
        if not loaded.adapters:
            return nullcontext()
        if served.adapter:
            loaded.model.set_adapter(served.id)
            return nullcontext()
        return loaded.model.disable_adapter()
