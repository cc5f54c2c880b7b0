"""Continuous batching: several sequences decoded in the same forward passes, each joining and
leaving on its own.

Why: one request at a time leaves a CPU idle between matrix-vector products; decoding sixteen
sequences together turns them into matrix-matrix products that cost little more than one
(bench/serve.py measures it). This module is the backend-independent half: the slots, which
tokens go into the next forward pass, prompt-prefix reuse, and sampling. A backend supplies
`_passes` (run the tokens, yielding the logits asked for after each of its forward passes) and
`_truncate` (drop a slot's cached positions from p on); `LlamaCppBackend.decoder()` does it with one llama.cpp context holding one
KV cache shared by all slots, as llama-server does.

The schedule, per step (at most `batch_tokens` tokens, run in one or more forward passes):
1. every slot that is decoding contributes its one newest token (taken first, so a long prompt
   arriving never crowds out the streams already running);
2. the remaining room goes to slots still reading their prompt, a chunk of at most `chunk`
   tokens each in arrival order (chunked prefill: a 2,000-token prompt takes several steps, and
   the others keep decoding);
3. logits come back for each slot whose pending tokens all went in, pass by pass (`step_passes`):
   a backend may read the joining prompts first, a few per pass, so their first tokens are sampled
   and streamed before the step's decode pass has run (llamacpp_decoder.py says why).

Prefix reuse: a released slot keeps its tokens in the cache. A new sequence takes the free slot
whose cached tokens share the longest prefix with its prompt, cuts the cache there and reads
only the rest (a shared system prompt, few-shot examples, lm-eval's shared contexts). When no
free slot shares at least half of the prompt, it takes the least recently used free slot
instead, so the prompts other slots hold stay for the requests that will want them (llama-server
chooses its slots the same way, --slot-prompt-similarity 0.5). At least the prompt's last token
is always read again, since its logits are what the first sample needs.

Packed slots (a backend sets `compact`): llama.cpp with a KV stream per sequence runs a batch's
sequences in one pass only while their ids are consecutive (llama-batch.cpp `split_equal`,
"accept only increasing sequence ids"); busy slots 0, 2, 3, 5 cost three passes of the weights
instead of one (measured on SmolLM2: 42-45 ms per step against 27-29 ms for slots 0-3). So a
new sequence always takes the lowest free slot, and the prefix it reuses is brought there:
such a backend saves a slot's cache to host memory and loads it into another (`_save`, `_load`),
which keeps every value and gives the logits of reading in place (the tests hold them equal).

Those saved states are also a second cache tier (prompt_store.py): before a slot's cache is
overwritten or cut, its state goes to a PromptStore in RAM (`--cache-ram`), and a new sequence
starts from the longest prefix among the free slots and the store. Under load, when the slot
that frees is rarely the one holding the next request's prefix, this is what keeps it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.models.backends.prompt_store import DEFAULT_STORE_MIB, PromptStore

__all__ = ["SequenceDecoder", "Slot", "Sampler", "common_prefix"]

SIMILAR = 0.5  # a free slot sharing less than this share of the prompt is not worth evicting another for


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Sampler:
    """Next-token choice for one sequence: greedy at temperature 0, else temperature then top-p
    (nucleus) sampling with its own seeded generator, so a request's draw does not depend on what
    else shares the batch."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> None:
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p)
            keep = int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1
            kept = order[:keep]
            return int(kept[self.rng.choice(keep, p=p[kept] / p[kept].sum())])
        return int(self.rng.choice(p.size, p=p))


@dataclass
class Slot:
    """One sequence's place in the shared cache: `cached` tokens are in the KV cache at positions
    0..len-1; `pending` are to be read next (the prompt's rest, then each sampled token)."""

    index: int
    cached: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    busy: bool = False
    order: int = 0  # arrival order, for fair prefill; the last admission, for least-recently-used


@dataclass
class StepStats:
    """What the last forward pass held (for /metrics)."""

    tokens: int = 0
    decoding: int = 0
    prefilling: int = 0


class SequenceDecoder(ABC):
    """`slots` sequences sharing one model; see the module docstring for the schedule."""

    def __init__(self, slots: int, batch_tokens: int, context: int) -> None:
        if slots < 1:
            raise SlimlmError(f"--parallel must be at least 1 (got {slots})")
        if batch_tokens < slots:
            raise SlimlmError(f"--batch-tokens ({batch_tokens}) must be at least --parallel ({slots}): each running "
                              "sequence needs one token per step")
        self.slots = [Slot(i) for i in range(slots)]
        self.batch_tokens, self.context = batch_tokens, context
        self.chunk = batch_tokens  # a backend may read prompts in smaller pieces
        self.reuse_prefixes = True  # False: every prompt is read whole (to measure what reuse buys)
        self.last = StepStats()
        self.reused_tokens = self.prompt_tokens = 0  # prefix-cache hit rate = reused / prompt
        self.store = PromptStore(DEFAULT_STORE_MIB << 20)  # used by backends with _save/_load
        self._arrivals = 0

    compact = False  # keep busy slots packed from 0 (see "Packed slots" above); such a backend has _save, _load

    # -- what a backend provides -------------------------------------------------------------
    @abstractmethod
    def _passes(self, entries: list[tuple[int, list[int], int, bool]]) -> Iterator[dict[int, np.ndarray]]:
        """Run entries (slot, tokens, first position, want logits of the last token) in forward
        passes, yielding {slot: logits} for those that want them after each pass."""

    @abstractmethod
    def _truncate(self, slot: int, keep: int) -> int:
        """Drop the slot's cached positions from `keep` on; return how many positions it kept
        (0 where a cache can only be cleared whole)."""

    @abstractmethod
    def is_end(self, token: int) -> bool:
        """Whether the token ends the text (end of sequence, end of turn)."""

    @abstractmethod
    def text_bytes(self, token: int) -> bytes:
        """The bytes a generated token adds to the answer's text, as the backend's one-at-a-time
        stream writes them (special tokens as it shows them)."""

    def _save(self, slot: int):
        """The slot's cache as a blob (anything with a len() in bytes) that _load reads back."""
        raise NotImplementedError

    def _load(self, slot: int, blob) -> None:
        """Replace the slot's cache with a saved one."""
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    # -- the schedule -----------------------------------------------------------------------
    @property
    def free(self) -> int:
        return sum(not s.busy for s in self.slots)

    @property
    def running(self) -> int:
        return sum(s.busy for s in self.slots)

    def admit(self, prompt: list[int]) -> int:
        """Give `prompt` a free slot (the one whose cache shares the longest prefix with it) and
        return the slot's index. Raises if none is free or the prompt cannot fit."""
        if not prompt:
            raise SlimlmError("the prompt is empty: give at least one token")
        if len(prompt) >= self.context:
            raise SlimlmError(f"the prompt ({len(prompt)} tokens) fills a slot's context ({self.context}): shorten it "
                              "or serve with fewer --parallel slots")
        free = [s for s in self.slots if not s.busy]
        if not free:
            raise SlimlmError("no free slot")
        shared = {s.index: common_prefix(s.cached, prompt) for s in free}
        if self.compact:
            slot = self._packed(prompt, free, shared)
            shared[slot.index] = common_prefix(slot.cached, prompt)
        else:
            slot = max(free, key=lambda s: (shared[s.index], -s.index))
            if shared[slot.index] < SIMILAR * len(prompt):
                slot = min(free, key=lambda s: (s.order, s.index))  # least recently used
        keep = min(shared[slot.index], len(prompt) - 1) if self.reuse_prefixes else 0
        if keep < len(slot.cached):
            keep = self._truncate(slot.index, keep)
            del slot.cached[keep:]
        self._arrivals += 1
        slot.busy, slot.order, slot.pending = True, self._arrivals, list(prompt[keep:])
        self.reused_tokens += keep
        self.prompt_tokens += len(prompt)
        return slot.index

    def _packed(self, prompt: list[int], free: list[Slot], shared: dict[int, int]) -> Slot:
        """The lowest free slot, holding the longest prefix of `prompt` that a free slot or the
        store has (see "Packed slots"); what it held goes to the store first."""
        low = min(free, key=lambda s: s.index)
        if not self.reuse_prefixes:
            return low

        def usable(shared_tokens: int) -> int:  # at least the prompt's last token is read again
            return min(shared_tokens, len(prompt) - 1)

        donor = max(free, key=lambda s: (shared[s.index], s is low))
        saved = self.store.best(prompt) if self.store.budget else None
        if saved is not None and usable(saved[2]) > usable(shared[donor.index]):
            tokens, blob = saved[0], saved[1]
            self.store.restored += 1
        elif usable(shared[donor.index]) > usable(shared[low.index]):
            tokens, blob = list(donor.cached), self._save(donor.index)
        else:
            if usable(shared[low.index]) < len(low.cached):
                self._stash(low)  # about to be cut
            return low
        self._stash(low)  # about to be overwritten
        self._load(low.index, blob)
        low.cached = tokens
        return low

    def _stash(self, slot: Slot) -> None:
        """Keep the slot's cache in the store before it changes (if the store has room for it)."""
        if slot.cached and self.store.budget and not self.store.contains(slot.cached):
            self.store.put(slot.cached, self._save(slot.index))

    def feed(self, slot: int, token: int) -> None:
        """Queue a sampled token to be read at the next step."""
        self.slots[slot].pending = [token]

    def room(self, slot: int) -> int:
        """Tokens the slot can still take before its context is full."""
        s = self.slots[slot]
        return self.context - len(s.cached) - len(s.pending)

    def release(self, slot: int) -> None:
        """The sequence is done; its cached tokens stay for prefix reuse."""
        s = self.slots[slot]
        s.busy, s.pending = False, []

    def step(self) -> dict[int, np.ndarray]:
        """One step; returns {slot: next-token logits} for the slots ready to sample."""
        out = {}
        for ready in self.step_passes():
            out.update(ready)
        return out

    def step_passes(self) -> Iterator[dict[int, np.ndarray]]:
        """One step, yielding {slot: next-token logits} after each forward pass. A slot's
        bookkeeping is done before the first pass, so a caller may feed or release a slot whose
        logits it got while later passes are still to run."""
        decoding = [s for s in self.slots if s.busy and len(s.pending) == 1 and s.cached]
        reading = sorted((s for s in self.slots if s.busy and s.pending and s not in decoding), key=lambda s: s.order)
        budget = self.batch_tokens - len(decoding)
        entries = [(s.index, list(s.pending), len(s.cached), True) for s in decoding]
        taken = {s.index: 1 for s in decoding}
        for s in reading:
            if budget <= 0:
                break
            n = min(budget, len(s.pending), self.chunk)
            entries.append((s.index, s.pending[:n], len(s.cached), n == len(s.pending)))
            taken[s.index] = n
            budget -= n
        self.last = StepStats(sum(taken.values()), len(decoding), len(taken) - len(decoding))
        if not entries:
            return
        for index, n in taken.items():
            s = self.slots[index]
            s.cached.extend(s.pending[:n])
            del s.pending[:n]
        try:
            yield from self._passes(entries)
        except BaseException:  # a pass that failed or never ran: these caches are no longer what `cached` says
            for index in taken:
                self.slots[index].cached = []
                self._truncate(index, 0)
            raise
