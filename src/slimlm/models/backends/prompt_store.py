"""Prompts' KV caches kept in host memory after their slot is needed for another sequence.

Why: a server's slots hold the prompts they last read, so with 16 slots at most 16 prompts can
be reused. Under load every slot is busy and the one that frees is usually not the one holding
the next request's prefix (another user's system prompt, an earlier turn of the same chat), so
the prefix is read again. llama-server keeps such states in RAM (`--cache-ram`, PR 16391) and
restores the best one into the slot; this is slimlm's store for the same job. A slot's state is
saved just before its cache would be overwritten or cut, and a new sequence starts from whichever
holds the longest prefix of its prompt: a free slot or an entry here.

An entry is (tokens, state blob). The blob is opaque here (the backend's `_save` made it, its
`_load` reads it back); only its length counts against the budget. Entries are evicted least
recently used first. An entry whose tokens begin another's is dropped (the longer one serves
every prompt the shorter could), and a prompt already contained in an entry is not stored again.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["PromptStore", "DEFAULT_STORE_MIB"]

DEFAULT_STORE_MIB = 1024  # SmolLM2's state is ~23 KB a token: some 400 prompts of 115 tokens


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays (numpy: stores hold hundreds of entries)."""
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PromptStore:
    """Saved prompt states within `budget` bytes (0: keep none)."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._entries: OrderedDict[int, tuple[np.ndarray, object]] = OrderedDict()  # id -> (tokens, blob)
        self._ids = 0
        self.size = 0
        self.restored = 0  # entries loaded back into a slot (for /metrics)

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, tokens: list[int]) -> bool:
        """Whether an entry already holds these tokens (as itself or as its prefix)."""
        t = np.asarray(tokens, dtype=np.int64)
        return any(e.size >= t.size and _lcp(e, t) == t.size for e, _ in self._entries.values())

    def put(self, tokens: list[int], blob) -> None:
        """Keep `blob`, the state of a cache holding `tokens`, evicting the oldest beyond the budget."""
        if not tokens or len(blob) > self.budget or self.contains(tokens):
            return
        t = np.asarray(tokens, dtype=np.int64)
        for key, (e, old) in list(self._entries.items()):
            if _lcp(e, t) == e.size:  # a prefix of the new one: it serves nothing the new one cannot
                del self._entries[key]
                self.size -= len(old)
        self._ids += 1
        self._entries[self._ids] = (t, blob)
        self.size += len(blob)
        self.shrink(self.budget)

    def shrink(self, budget: int) -> None:
        """Set the budget, evicting least recently used entries until they fit."""
        self.budget = int(budget)
        while self._entries and self.size > self.budget:
            _, (_, blob) = self._entries.popitem(last=False)
            self.size -= len(blob)

    def best(self, prompt: list[int]) -> tuple[list[int], object, int] | None:
        """(tokens, blob, shared prefix) of the entry sharing the longest prefix with `prompt`
        (the most recent on a tie), marked as just used; None if none shares a token."""
        p = np.asarray(prompt, dtype=np.int64)
        found, longest = None, 0
        for key, (e, _) in reversed(self._entries.items()):
            n = _lcp(e, p)
            if n > longest:
                found, longest = key, n
        if found is None:
            return None
        self._entries.move_to_end(found)
        tokens, blob = self._entries[found]
        return tokens.tolist(), blob, longest
