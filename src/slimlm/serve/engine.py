"""One loaded model behind the server: a FIFO queue, one worker, and token-level results.

With `parallel` > 1 on a backend that can batch (llama.cpp), the worker is batching.Batcher:
up to `parallel` sequences decode together, each joining and leaving the running batch on its
own (continuous batching), fed from the same bounded FIFO queue. Otherwise, as below.

A backend holds one KV cache and is not thread-safe, so each model gets exactly one worker that
takes requests in arrival order (fair: nobody overtakes) and runs each in a thread, so the event
loop keeps accepting requests, answering 429s and streaming tokens while the model computes. The
queue is bounded: when it is full a request fails at once with QueueFull (HTTP 429) rather than
waiting behind an unbounded backlog. A job carries a cancel flag that the worker checks after
every token, so a client that goes away stops costing compute within one token.

Log-probabilities come from the backend's own scorer (Backend.scorer), the same code
`slimlm eval` uses, so a harness scoring through the server gets the numbers `slimlm eval` gets.
Everything the engine knows of its model (context, vocabulary, token bytes, generation from ids,
adapters) it asks the backend interface for, whichever backend it is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Callable

from slimlm.errors import SlimlmError
from slimlm.models.backends.base import Backend, GenerationParams
from slimlm.serve.adapters import AdapterSet
from slimlm.serve.scoring import Scoring, TokenLogprob

DEFAULT_BATCH_TOKENS = 512  # tokens read per step at most; see bench/serve_load.py for how it was chosen
DEFAULT_PARALLEL = 16  # slots when the backend batches and none were asked for; see bench/serve_load.py


class QueueFull(SlimlmError):
    """Every queue slot is taken: the client should retry after a moment (HTTP 429)."""


@dataclass
class Task:
    """One prompt to run: generate up to params.max_tokens tokens (0: none) from `ids`."""

    ids: list[int]
    params: GenerationParams
    logprobs: int | None = None  # alternatives per generated token; None: no log-probabilities
    echo_logprobs: bool = False  # also score the prompt's own tokens
    index: int = 0


@dataclass
class Result:
    index: int
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None
    logprobs: list[TokenLogprob] | None = None


class Job:
    """The tasks of one request. Iterate it (async) for ("token", (index, text)) and
    ("result", Result) events; a worker error is raised there."""

    def __init__(self, tasks: list[Task], adapter: str | None, loop: asyncio.AbstractEventLoop) -> None:
        self.tasks, self.adapter, self._loop = tasks, adapter, loop
        self._remaining = len(tasks)
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.status = "queued"  # then running, ok, cancelled or error
        self.on_done: list[Callable[[Job], None]] = []

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, payload=None) -> None:  # called from the worker thread
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is gone (server shut down): nobody is listening
            self.cancelled.set()

    def add_result(self, result: Result) -> None:  # called from the worker thread
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.emit("result", result)

    def run_on_done(self) -> None:
        """Stamp the end and run the on_done hooks (ledger, metrics); a failing one is logged."""
        self.finished_at = time.perf_counter()
        for callback in self.on_done:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - a broken hook must not stop the others or the worker
                import logging

                logging.getLogger("slimlm.serve").exception("on_done callback failed")

    # -- for the batcher, which finishes tasks one by one from its thread -----------------------
    def task_done(self, result: Result) -> None:
        self.add_result(result)
        self._remaining -= 1
        if self._remaining == 0:
            self._close("cancelled" if self.cancelled.is_set() else "ok")

    def fail(self, exc: BaseException) -> None:
        self.emit("error", exc)
        self._remaining = -1
        self._close("error")

    def _close(self, status: str) -> None:
        def close() -> None:  # on the event loop, where the ledger and metrics hooks run
            self.status = status
            self.events.put_nowait(("done", None))
            self.run_on_done()
        try:
            self._loop.call_soon_threadsafe(close)
        except RuntimeError:
            self.cancelled.set()

    async def __aiter__(self):
        while True:
            kind, payload = await self.events.get()
            if kind == "done":
                return
            if kind == "error":
                raise payload
            yield kind, payload

    async def results(self) -> list[Result]:
        return [payload async for kind, payload in self if kind == "result"]


def model_name(ref) -> str:
    """The name clients ask for: the built-in name, a GGUF file's stem, or a folder's name."""
    return ref.builtin or (ref.path.stem if ref.path.is_file() else ref.path.name)


class Engine:
    """A backend, its queue and its worker. Use `Engine.open(model)` or wrap a loaded backend."""

    external = False  # external.ExternalEngine: an OpenAI-compatible URL serving as the small model

    def __init__(self, backend: Backend, name: str | None = None, *, queue_size: int = 16,
                 n_ctx: int | None = None, adapters: dict[str, str] | None = None, parallel: int | None = 1,
                 batch_tokens: int | None = None, prefix_cache: bool = True,
                 cache_ram_mib: int | None = None) -> None:
        self.backend = backend
        self.name = name or (model_name(backend.ref) if backend.ref is not None else backend.label)
        self.queue_size = queue_size
        native = backend.context_length
        self.context = min(native, n_ctx) if n_ctx else native
        self.vocab_size = backend.vocab_size
        self.adapters = AdapterSet(backend, adapters or {})
        self._lock = threading.Lock()  # the backend runs one request at a time, whatever the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._active: Job | None = None
        self.scoring = Scoring(backend, self.context)
        if parallel is None:  # the default: batch where the backend can, as many as measured best
            parallel = DEFAULT_PARALLEL if backend.supports("continuous") and not adapters else 1
        self.parallel = parallel
        self.batcher = self._batcher(parallel, batch_tokens) if parallel > 1 else None
        self.scoring.reuse_prefix = prefix_cache
        if self.batcher is not None:
            self.batcher.decoder.reuse_prefixes = prefix_cache
            if cache_ram_mib is not None:
                self.batcher.decoder.store.resize(cache_ram_mib << 20)

    def _batcher(self, parallel: int, batch_tokens: int | None):
        from slimlm.serve.batching import Batcher

        if not self.backend.supports("continuous"):
            raise SlimlmError(f"--parallel {parallel} needs a backend that batches sequences (llamacpp, or torch on "
                              f"a model without sliding-window layers); the {self.backend.label} backend runs this "
                              "model one sequence at a time: use --parallel 1")
        decoder = self.backend.decoder(parallel, batch_tokens or DEFAULT_BATCH_TOKENS, self.context)
        return Batcher(decoder, self._run_inline, self._finish_batched, self.name)

    @classmethod
    def open(cls, model, backend: str = "auto", *, name: str | None = None, queue_size: int = 16,
             n_ctx: int | None = None, adapters: dict[str, str] | None = None, parallel: int | None = 1,
             batch_tokens: int | None = None, prefix_cache: bool = True,
             cache_ram_mib: int | None = None) -> "Engine":
        """`model`: a ModelRef, or what the user typed (resolved here, once). n_ctx: llama.cpp
        allocates that context at start; torch takes it as a cap on the model's own."""
        from slimlm.models.backends import open_backend

        kwargs = {"n_ctx": n_ctx} if n_ctx else {}
        return cls(open_backend(model, backend, **kwargs), name, queue_size=queue_size, n_ctx=n_ctx,
                   adapters=adapters, parallel=parallel, batch_tokens=batch_tokens, prefix_cache=prefix_cache,
                   cache_ram_mib=cache_ram_mib)

    # -- names and prompts (called on the event loop; tokenizers are safe to share for reading) --
    @property
    def model_names(self) -> list[str]:
        return [self.name] + [f"{self.name}:{a}" for a in self.adapters.names]

    @property
    def supports_logprobs(self) -> bool:
        return self.scoring.available

    @property
    def queue_depth(self) -> int:
        if self.batcher is not None:
            return self.batcher.depth
        waiting = self._queue.qsize() if self._queue is not None else 0
        return waiting + (1 if self._active is not None else 0)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not self.backend.chat_template:
            raise SlimlmError(f"{self.name} has no chat template: use /v1/completions with plain text")
        try:
            text = self.backend.render_chat(messages)
        except SlimlmError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template's own check (e.g. roles must alternate)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SlimlmError(f"the model's chat template rejected these messages ({first}): "
                              "change the roles or their order") from None
        return self._tokenize(text)

    def text_ids(self, text: str) -> list[int]:
        return self._tokenize(text)

    def _tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.backend.token_bytes(t) for t in ids).decode("utf-8", errors="replace")

    # -- the queue ---------------------------------------------------------------------------
    def submit(self, tasks: list[Task], adapter: str | None = None) -> Job:
        """Queue a job (FIFO) or raise QueueFull at once."""
        loop = asyncio.get_running_loop()
        if self.batcher is not None:
            return self._submit_batched(tasks, adapter, loop)
        if self._loop is not loop or self._worker is None or self._worker.done():
            # A new event loop (a second test client, a restarted server) gets a fresh queue.
            self._loop, self._queue = loop, asyncio.Queue(maxsize=self.queue_size)
            self._worker = loop.create_task(self._work())
        job = Job(tasks, adapter, loop)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.name} has {self.queue_size} requests waiting: retry in a moment") from None
        return job

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            self._active = job
            try:
                if job.cancelled.is_set():  # the client left while the job waited
                    job.status = "cancelled"
                    job.emit("done")
                else:
                    await asyncio.to_thread(self._run, job)
            finally:
                self._active = None
                job.run_on_done()

    # -- continuous batching (batching.py's thread calls these) ---------------------------------
    def _submit_batched(self, tasks: list[Task], adapter: str | None, loop) -> Job:
        from slimlm.serve.batching import Sequence

        if self.batcher.depth + len(tasks) > self.parallel + self.queue_size:  # the slots, then the queue
            raise QueueFull(f"{self.name} has {self.queue_size} requests waiting: retry in a moment")
        job = Job(tasks, adapter, loop)
        if not tasks:
            job._close("ok")
            return job
        # Scoring a prompt, or an adapter, runs on the one-at-a-time path between two steps.
        inline = [bool(task.echo_logprobs or adapter or task.params.max_tokens < 1) for task in tasks]
        for task, alone in zip(tasks, inline):
            if not alone:
                task.params.validate()
        self.batcher.submit([Sequence(job, task, inline=alone) for task, alone in zip(tasks, inline)])
        return job

    def _run_inline(self, job: Job, task: Task) -> Result:
        self.adapters.use(job.adapter)
        try:
            return self._run_task(job, task)
        finally:
            self.adapters.use(None)

    def _finish_batched(self, seq, text: str, reason: str) -> Result:
        task = seq.task
        res = Result(task.index, text=text, finish_reason=reason, prompt_tokens=len(task.ids),
                     completion_tokens=len(seq.tokens))
        if task.logprobs is not None and text and reason != "cancelled":
            res.logprobs = self.scoring.continuation(task.ids, text, task.logprobs)
        return res

    def _run(self, job: Job) -> None:
        job.status = "running"
        try:
            with self._lock:
                self.adapters.use(job.adapter)
                for task in job.tasks:
                    if job.cancelled.is_set():
                        break
                    job.add_result(self._run_task(job, task))
            job.status = "cancelled" if job.cancelled.is_set() else "ok"
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which maps it to an HTTP error
            job.status = "error"
            job.emit("error", exc)
        finally:
            job.emit("done")

    def _run_task(self, job: Job, task: Task) -> Result:
        res = Result(task.index, prompt_tokens=len(task.ids))
        params = task.params
        if task.echo_logprobs:
            # max_tokens 1 at temperature 0 (how lm-evaluation-harness scores) reads the next token
            # off the same forward pass: a model that would end the text still answers one token.
            greedy_one = params.max_tokens == 1 and params.temperature == 0
            res.prompt_logprobs, following = self.scoring.prompt(task.ids, task.logprobs or 0, greedy_one)
            if following is not None:
                job.first_token_at = job.first_token_at or time.perf_counter()
                res.text, res.logprobs, res.completion_tokens = following.token, [following], 1
                job.emit("token", (task.index, res.text))
                return res
        if params.max_tokens >= 1:
            pieces = []
            for piece in self._generate(task.ids, params, job.cancelled):
                job.first_token_at = job.first_token_at or time.perf_counter()
                pieces.append(piece)
                job.emit("token", (task.index, piece))
            timings = self.backend.last_timings
            res.text, res.completion_tokens = "".join(pieces), timings.generated_tokens
            res.finish_reason = "cancelled" if job.cancelled.is_set() else timings.finish_reason
            if task.logprobs is not None and res.text and not job.cancelled.is_set():
                res.logprobs = self.scoring.continuation(task.ids, res.text, task.logprobs)
        return res

    def _generate(self, ids: list[int], params: GenerationParams, cancelled: threading.Event):
        """The backend's stream from the exact token ids (lm-eval sends ids; text prompts were
        tokenized once, on the event loop), stopped within a token of a cancel."""
        stream = self.backend.stream_ids(ids, params.validate())
        try:
            for piece in stream:
                if piece:
                    yield piece
                if cancelled.is_set():
                    break
        finally:
            stream.close()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self._worker is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._worker.cancel)
        self.scoring.close()
        self.backend.close()


__all__ = ["Engine", "Job", "QueueFull", "Result", "Task", "TokenLogprob", "model_name"]
