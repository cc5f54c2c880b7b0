"""The scheduler of continuous batching: requests in, tokens out, one thread driving the decoder.

The engine (engine.py) hands each task of a request to `Batcher.submit`. One thread owns the
backend's SequenceDecoder (models/backends/decoder.py) and loops: give free slots to waiting
tasks (arrival order, so nobody is overtaken), run one step, sample each ready slot with that
task's own sampler (pass by pass: a joining prompt's first token goes out as soon as the pass that
read it is done), turn the token into text (UTF-8 pieces held until whole, stop strings held
until they cannot match), stream it to the request, and end the task at its end token, a stop
string, max_tokens, a full slot, or a cancel. A finished task leaves its slot at once, and the
next waiting one joins the running batch at the next step.

An idle engine (nothing decoding) does not start on the first request of a burst: it waits until
arrivals pause for `gather_quiet_s` (2 ms, at most `gather_max_s`, 25 ms), so requests that come
together read their prompts in the same step and then decode in step, rather than the first few
starting alone and the rest a step behind them (traced with bench/serve_load.py's 16 clients: each
wave of 16 returning requests was read in one step). Running sequences never wait for this: it
applies only when none are running, and costs a lone request about 2 ms.

Tasks the decoder cannot run batched (a prompt to score, a request for an adapter) run here too,
between two steps, on the backend's one-at-a-time path: one thread does all the computing, so
nothing competes for the cores or the model.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from slimlm.models.backends.base import StopText
from slimlm.models.backends.decoder import Sampler, SequenceDecoder

log = logging.getLogger("slimlm.serve")

GATHER_QUIET_S = 0.002  # an idle engine starts once arrivals pause this long (module docstring)
GATHER_MAX_S = 0.025  # ... or this long after the first arrival


def _deliver(items) -> None:
    for job, event in items:
        job.events.put_nowait(event)


@dataclass
class Sequence:
    """One task of one job, as the scheduler tracks it."""

    job: object
    task: object
    inline: bool = False  # run on the one-at-a-time path, between steps
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """A thread driving `decoder`; `run_inline(job, task) -> Result` runs what cannot batch;
    `finish(seq, text, reason) -> Result` builds a task's result (and its log-probabilities)."""

    def __init__(self, decoder: SequenceDecoder, run_inline: Callable, finish: Callable, name: str = "model") -> None:
        self.decoder = decoder
        self.run_inline, self.finish = run_inline, finish
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.on_step: list[Callable] = []  # (StepStats, seconds) after each step
        self.on_admit: list[Callable] = []  # (seconds waited) when a task starts
        self._outbox: list = []  # (job, event) of this step, handed to the event loop at once
        self._wake = threading.Condition()
        self._stop = False
        self.gather_quiet_s, self.gather_max_s = GATHER_QUIET_S, GATHER_MAX_S
        self._thread = threading.Thread(target=self._loop, name=f"slimlm-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self.waiting) + len(self.running)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._wake:
            self.waiting.extend(seqs)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self.decoder.close()

    # -- the loop (its own thread) ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stop:
                    return
                if not self.running:
                    self._gather()
            try:
                self._admit()
                if self.running:
                    self._step()
            except BaseException as exc:  # noqa: BLE001 - every running request gets the error, the loop goes on
                log.exception("batched decoding failed")
                for seq in list(self.running.values()):
                    self._drop(seq)
                    seq.job.fail(exc)

    def _gather(self) -> None:
        """Wait (holding the condition) until arrivals pause, the slots are all asked for, or
        gather_max_s has passed since the first arrival."""
        deadline = time.perf_counter() + self.gather_max_s
        seen = len(self.waiting)
        while seen < self.decoder.free and self.gather_quiet_s > 0:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.wait(min(self.gather_quiet_s, left))
            if len(self.waiting) == seen or self._stop:
                return  # quiet: no arrival within gather_quiet_s
            seen = len(self.waiting)

    def _admit(self) -> None:
        while self.decoder.free:
            with self._wake:
                if not self.waiting:
                    return
                seq = self.waiting.popleft()
            if seq.job.cancelled.is_set():
                seq.job.task_done(self.finish(seq, "", "cancelled"))
                continue
            for hook in self.on_admit:
                hook(time.perf_counter() - seq.queued_at)
            seq.job.status = "running"
            if seq.inline:
                seq.job.task_done(self.run_inline(seq.job, seq.task))
                continue
            seq.slot = self.decoder.admit(seq.task.ids)
            seq.sampler = Sampler(seq.task.params.temperature, seq.task.params.top_p, seq.task.params.seed)
            seq.text = StopText(seq.task.params.stop)
            seq.utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # as the one-at-a-time path
            self.running[seq.slot] = seq

    def _step(self) -> None:
        start = time.perf_counter()
        for logits in self.decoder.step_passes():  # each pass's tokens go out before the next pass runs
            for slot, row in logits.items():
                seq = self.running.get(slot)
                if seq is None:
                    continue
                if seq.job.cancelled.is_set():
                    self._end(seq, "cancelled")
                else:
                    self._advance(seq, row)
            self._flush()
        elapsed = time.perf_counter() - start
        for hook in self.on_step:
            hook(self.decoder.last, elapsed)
        for seq in list(self.running.values()):  # cancelled while reading a prompt: no logits this step
            if seq.job.cancelled.is_set():
                self._end(seq, "cancelled")
        self._flush()

    def _flush(self) -> None:
        """Hand the step's tokens to their event loops, one wake-up per loop per step rather than
        one per token: the loop shares the cores with llama.cpp's threads."""
        by_loop: dict = {}
        for job, event in self._outbox:
            by_loop.setdefault(job._loop, []).append((job, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is gone (server shut down): nobody is listening
                for job, _ in items:
                    job.cancelled.set()

    def _advance(self, seq: Sequence, logits) -> None:
        token = seq.sampler(logits)
        if self.decoder.is_end(token):
            self._end(seq, "stop")
            return
        seq.tokens.append(token)
        piece = seq.text.push(seq.utf8.decode(self.decoder.text_bytes(token)))
        job = seq.job
        job.first_token_at = job.first_token_at or time.perf_counter()
        if piece:
            seq.pieces.append(piece)
            self._outbox.append((job, ("token", (seq.task.index, piece))))
        if seq.text.stopped:
            self._end(seq, "stop")
        elif len(seq.tokens) >= seq.task.params.max_tokens or self.decoder.room(seq.slot) < 1:
            self._end(seq, "length")
        else:
            self.decoder.feed(seq.slot, token)

    def _end(self, seq: Sequence, reason: str) -> None:
        if not seq.text.stopped:
            rest = seq.text.push(seq.utf8.decode(b"", final=True)) + seq.text.flush()
            if rest and reason != "cancelled":
                seq.pieces.append(rest)
                self._outbox.append((seq.job, ("token", (seq.task.index, rest))))
        self._flush()  # the tokens go before the result
        self._drop(seq)
        seq.job.task_done(self.finish(seq, "".join(seq.pieces), reason))

    def _drop(self, seq: Sequence) -> None:
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.decoder.release(seq.slot)
