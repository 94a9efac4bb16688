"""The queue requests wait in and the worker that decodes them, with continuous batching.

A request becomes a `Job`: what to run (its `rows` build the token ids and sampling parameters of each
choice once its model is loaded) and a stream of events back to the serving layer: a `Prompt` per choice,
a `Token` per decode step, then `Done`, or one `Failed`. The worker
(one thread, which also keeps every model call on one thread) runs one `infer.decode.Batch` per loaded
base model: between two decode steps it takes the jobs that arrived (as many rows as a batch holds), so a
request joins the running batch at the next step and leaves it when it finishes; the adapters of one base
decode in the same batch. A full queue refuses new jobs (503); a handler whose client went away sets
`job.cancelled`, and its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.errors import RequestError
from tunelab.infer.decode import Batch, Prefill, PrefixCache, Row, Step
from tunelab.infer.sampling import Sampling
from tunelab.serve.store import Loaded, ModelStore, Served

# --- what a job hears back, in order: Prompt per choice, then Token per step, then Done; or one Failed ----


@dataclass(frozen=True)
class Prompt:
    index: int  # the choice
    tokens: int  # its prompt's length
    text: str = ""  # the prompt as the client sent it (a completion's echo)


@dataclass(frozen=True)
class Token:
    index: int  # the choice
    step: Step  # the token chosen (None when a row finishes without one), its text, log-probs, finish reason


@dataclass(frozen=True)
class Result:
    value: object  # a job's answer computed at once (embeddings: the vectors and the tokens read)


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Failed:
    error: RequestError


Event = Prompt | Token | Result | Done | Failed


@dataclass(frozen=True)
class Choice:
    """One choice to decode: its prompt's token ids, its sampling parameters, the prompt as sent."""

    ids: list[int]
    params: Sampling
    text: str = ""
    reusable: tuple[int, ...] = ()  # lengths of its beginnings later prompts may begin with (a chat's)


@dataclass
class Job:
    """A request for the engine: either `rows` to decode (each choice's prompt ids and sampling parameters,
    built once its model is loaded) or an answer to `compute` at once (embeddings)."""

    served: Served
    loop: asyncio.AbstractEventLoop
    rows: Callable[[Loaded, object], list[Choice]] | None = None  # (loaded, tokenizer) -> its choices
    compute: Callable[[Loaded, object], object] | None = None  # (loaded, tokenizer) -> the answer
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    waiting: list = field(default_factory=list)  # its rows not yet in a batch
    running: int = 0  # its rows not yet finished
    decoded: int = 0

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(
        self,
        store: ModelStore,
        max_queue: int = 64,
        max_batch: int = 16,
        prefill_tokens: int = 256,
        prefill_in_steps: bool = False,
        prefix_cache: int = 0,
    ):
        self.store, self.max_batch, self.prefill_tokens = store, max_batch, prefill_tokens
        self.prefix_cache = prefix_cache  # bytes of prompts' beginnings each base keeps (`infer.decode.PrefixCache`)
        self.prefill_in_steps = prefill_in_steps  # prompts ride the decode steps where the batch `fuses`
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.batches: dict[int, tuple[Loaded, Batch]] = {}  # a loaded base -> the rows decoding on it
        self.started: list[Job] = []  # jobs with rows waiting for room in their batch
        self.prefilling: list[Prefill] = []  # prompts longer than `prefill_tokens`, a chunk between two steps
        self.history: deque[tuple[str, int, bool]] = deque(maxlen=64)  # (model id, tokens decoded, cancelled)
        self.peak_rows = 0  # the most rows that decoded together
        self.worker = threading.Thread(target=self._work, name="tunelab-engine", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(
                503,
                "the server is overloaded: too many requests are waiting; retry later",
                code="server_overloaded",
                kind="server_error",
            ) from None

    def close(self) -> None:
        self.jobs.put(None)

    # --- the worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            idle = not self.batches and not self.started and not self.prefilling
            try:
                job = self.jobs.get() if idle else self.jobs.get_nowait()
                while job is not None:
                    self._guarded([job], self._start, job)
                    job = self.jobs.get_nowait()
                return  # None: the server is shutting down
            except queue.Empty:
                pass
            self._seat_waiting_rows()
            self._prefill_a_chunk()
            for key, (loaded, batch) in list(self.batches.items()):
                self._guarded(None, self._step, loaded, batch)
                if not batch.rows and not any(p.batch is batch for p in self.prefilling):
                    del self.batches[key]

    def _start(self, job: Job) -> None:
        """Load the job's model, prepare its rows (an embedding job is answered at once)."""
        if job.cancelled:
            return
        loaded = self.store.load(job.served)
        tokenizer = loaded.tokenizers[job.served.id]
        if job.compute is not None:
            job.emit(Result(job.compute(loaded, tokenizer)))
            job.emit(Done())
            return
        adapter = job.served.id if job.served.adapter else None
        assert job.rows is not None  # a job has rows to decode or an answer to compute
        for index, choice in enumerate(job.rows(loaded, tokenizer)):
            job.emit(Prompt(index, len(choice.ids), choice.text))
            row = Row(
                (job, index), choice.ids, choice.params, tokenizer, loaded.stop_ids, adapter, reusable=choice.reusable
            )
            job.waiting.append((loaded, row))
        job.running = len(job.waiting)
        self.started.append(job)

    def _seat_waiting_rows(self) -> None:
        """Rows join their base's batch while it has room, in arrival order; those joining one batch at
        once are prefilled together, in one forward pass of at most `prefill_tokens` positions (rows x the
        longest prompt), so that the rows already decoding take their next step between two such passes,
        and the first of many arrivals sees its first token sooner. A prompt longer than that is computed a
        chunk of `prefill_tokens` at a time while other rows decode (`_prefill_a_chunk`; the rest of it in one
        pass once none does), holding its place in the batch meanwhile. With `prefill_in_steps`, where the
        batch's decode steps take prompts beside its rows (`Batch.fuses`: written-out steps with the model's
        own weights), every prompt rides those steps instead, `prefill_tokens` prompt tokens a step (`_step`):
        more tokens/s, each first token later (a pass gives it before the rows' step, riding after it)."""
        joining: dict[int, tuple[Batch, list[Row]]] = {}
        closed: set[int] = set()  # the batches that take no more rows this time
        for job in list(self.started):
            while job.waiting:
                if job.cancelled:
                    left = len(job.waiting)
                    job.waiting.clear()
                    self._rows_left(job, left)
                    break
                loaded, row = job.waiting[0]
                batch = self._batch(loaded)
                rows = joining.setdefault(id(loaded), (batch, []))[1]
                width = max(len(r.prompt_ids) for r in [*rows, row])
                filling = sum(p.batch is batch for p in self.prefilling)
                if (
                    id(loaded) in closed
                    or len(batch.rows) + len(rows) + filling >= batch.max_rows
                    or (rows and width * (len(rows) + 1) > self.prefill_tokens)
                ):
                    closed.add(id(loaded))
                    break
                if row.params.prompt_logprobs is None and (
                    len(row.prompt_ids) > self.prefill_tokens or self._rides(batch, row)
                ):
                    self.prefilling.append(Prefill(batch, job.waiting.pop(0)[1], self.prefill_tokens))
                    continue
                batch.reuse(row)
                rows.append(job.waiting.pop(0)[1])
            if not job.waiting:
                self.started.remove(job)
        for batch, rows in joining.values():
            if rows:
                self._guarded([row.tag[0] for row in rows], batch.add, *rows)
                batch.remember(rows)

    def _prefill_a_chunk(self) -> None:
        """The next chunk of the oldest long prompt of each batch; a row whose job was cancelled is dropped,
        one whose prompt is done has joined its batch."""
        advanced: set[int] = set()
        for prefill in list(self.prefilling):
            job = prefill.row.tag[0]
            if job.cancelled:
                self.prefilling.remove(prefill)
                self._rows_left(job, 1)
                continue
            if id(prefill.batch) in advanced or self._rides(prefill.batch, prefill.row):
                continue
            advanced.add(id(prefill.batch))
            self._guarded([job], self._advance_prefill, prefill)

    def _rides(self, batch: Batch, row: Row) -> bool:
        """Whether the row's prompt is computed inside its batch's next decode step (`Batch.fuses`)."""
        return self.prefill_in_steps and batch.fuses() and not row.adapter

    def _advance_prefill(self, prefill: Prefill) -> None:
        try:
            joined = prefill.advance(whole=not prefill.batch.rows)  # chunks only while rows decode beside it
        except Exception:
            self.prefilling.remove(prefill)
            raise
        if joined:
            self.prefilling.remove(prefill)

    def _batch(self, loaded: Loaded) -> Batch:
        """The batch of a loaded base, following its model: a base becomes a peft model when its first
        adapter loads (its rows then say `__base__`), with the same weights under it, so the cache stays."""
        if id(loaded) not in self.batches:
            if loaded.prefixes is None and self.prefix_cache:  # kept with the model: batches come and go
                loaded.prefixes = PrefixCache(self.prefix_cache)
            self.batches[id(loaded)] = (loaded, Batch(loaded.model, self.max_batch, loaded.prefixes, loaded.decoder))
        batch = self.batches[id(loaded)][1]
        batch.model, batch.adapters = loaded.model, hasattr(loaded.model, "peft_config")
        return batch

    def _step(self, loaded: Loaded, batch: Batch) -> None:
        rows = list(self._batch(loaded).rows)
        self.peak_rows = max(self.peak_rows, len(rows))
        for row, step in batch.choose(lambda row: row.tag[0].cancelled):  # sent before the forward pass
            job, index = row.tag
            job.decoded += step.token is not None
            job.emit(Token(index, step))
        for row in rows:
            if row.done:
                self._rows_left(row.tag[0], 1)
        riding, budget = [], self.prefill_tokens  # prompt tokens computed inside this step, oldest first
        for prefill in self.prefilling:
            if prefill.batch is batch and budget > 0 and self._rides(batch, prefill.row):
                riding.append((prefill, min(prefill.left, budget)))
                budget -= riding[-1][1]
        batch.advance(riding)
        for prefill, _ in riding:
            if prefill.joined:
                self.prefilling.remove(prefill)

    def _rows_left(self, job: Job, count: int) -> None:
        """`count` of the job's rows finished or were dropped; the job is done once none runs or waits."""
        job.running -= count
        if job.running == 0 and not job.waiting:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        self.history.append((job.served.id, job.decoded, job.cancelled))
        job.emit(Done())

    def _guarded(self, jobs: list[Job] | None, action, *args) -> None:
        """Run one action; an error reaches the clients of `jobs` (a 400 for a RequestError, a 500 for a bug
        of ours, whose cause goes to the log) and never stops the worker. `None`: a decode step, whose
        failure every decoding job hears."""
        try:
            action(*args)
        except Exception as e:
            error = e if isinstance(e, RequestError) else RequestError(500, "internal error", kind="server_error")
            if not isinstance(e, RequestError):
                print(f"tunelab serve: internal error: {type(e).__name__}: {e}", flush=True)
            if jobs is None:
                rows = [row for _, batch in self.batches.values() for row in batch.rows]
                rows += [prefill.row for prefill in self.prefilling]
                jobs = list({id(row.tag[0]): row.tag[0] for row in rows}.values())
                self.batches.clear()
                self.prefilling.clear()
            for job in {id(j): j for j in jobs}.values():
                job.cancelled = True
                job.emit(Failed(error))
