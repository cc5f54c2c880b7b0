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

Every lookup compares the prompt with all entries at once: their tokens are rows of one padded
array (written by hand: a few hundred entries of a small model fit the default budget, and one
vectorized comparison costs tens of microseconds where a loop over entries cost milliseconds).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PromptStore", "DEFAULT_STORE_MIB"]

DEFAULT_STORE_MIB = 1024  # SmolLM2's state is ~23 KB a token: some 400 prompts of 115 tokens
_PAD = -1  # no token id: a padded position never matches


class PromptStore:
    """Saved prompt states within `budget` bytes (0: keep none)."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._rows = np.full((0, 0), _PAD, dtype=np.int32)  # one entry's tokens per row, padded
        self._lengths = np.zeros(0, dtype=np.int32)  # 0: a free row
        self._used = np.zeros(0, dtype=np.int32)  # when each row was stored or last returned
        self._blobs: list = []
        self._clock = 0
        self.size = 0
        self.restored = 0  # entries loaded back into a slot (for /metrics)

    def __len__(self) -> int:
        return int((self._lengths > 0).sum())

    def _shared(self, tokens: list[int]) -> np.ndarray:
        """Each row's common prefix with `tokens` (0 for free rows)."""
        n = min(len(tokens), self._rows.shape[1])
        if n == 0 or not len(self._lengths):
            return np.zeros(len(self._lengths), dtype=np.int32)
        same = self._rows[:, :n] == np.asarray(tokens[:n], dtype=np.int32)
        first_diff = np.where(same.all(axis=1), n, same.argmin(axis=1))
        return np.minimum(first_diff, self._lengths).astype(np.int64)

    def contains(self, tokens: list[int]) -> bool:
        """Whether an entry already holds these tokens (as itself or as its prefix)."""
        return bool(tokens) and bool((self._shared(tokens) == len(tokens)).any())

    def put(self, tokens: list[int], blob) -> None:
        """Keep `blob`, the state of a cache holding `tokens`, evicting the oldest beyond the budget."""
        if not tokens or len(blob) > self.budget:
            return
        shared = self._shared(tokens)
        if (shared == len(tokens)).any():
            return  # already held
        for row in np.flatnonzero((self._lengths > 0) & (shared == self._lengths)):
            self._free(int(row))  # a prefix of the new one: it serves nothing the new one cannot
        row = self._row_for(len(tokens))
        self._rows[row, :] = _PAD
        self._rows[row, :len(tokens)] = tokens
        self._lengths[row] = len(tokens)
        self._clock += 1
        self._used[row] = self._clock
        self._blobs[row] = blob
        self.size += len(blob)
        self.resize(self.budget)

    def _row_for(self, length: int) -> int:
        """A free row at least `length` wide (the array grows by doubling)."""
        if length > self._rows.shape[1]:
            width = max(length, 2 * self._rows.shape[1])
            grown = np.full((self._rows.shape[0], width), _PAD, dtype=np.int32)
            grown[:, :self._rows.shape[1]] = self._rows
            self._rows = grown
        free = np.flatnonzero(self._lengths == 0)
        if free.size:
            return int(free[0])
        n = max(8, 2 * len(self._lengths))
        extra = n - len(self._lengths)
        self._rows = np.vstack([self._rows, np.full((extra, self._rows.shape[1]), _PAD, dtype=np.int32)])
        self._lengths = np.concatenate([self._lengths, np.zeros(extra, dtype=np.int32)])
        self._used = np.concatenate([self._used, np.zeros(extra, dtype=np.int32)])
        self._blobs += [None] * extra
        return int(len(self._lengths) - extra)

    def _free(self, row: int) -> None:
        self.size -= len(self._blobs[row])
        self._blobs[row], self._lengths[row] = None, 0

    def resize(self, budget: int) -> None:
        """Set the budget, evicting least recently used entries until they fit."""
        self.budget = int(budget)
        while self.size > self.budget:
            live = np.flatnonzero(self._lengths > 0)
            self._free(int(live[np.argmin(self._used[live])]))

    def best(self, prompt: list[int]) -> tuple[list[int], object, int] | None:
        """(tokens, blob, shared prefix) of the entry sharing the longest prefix with `prompt`
        (the most recently used on a tie), marked as just used; None if none shares a token."""
        shared = self._shared(prompt)
        if not shared.size or shared.max() == 0:
            return None
        ties = np.flatnonzero(shared == shared.max())
        row = int(ties[np.argmax(self._used[ties])])
        self._clock += 1
        self._used[row] = self._clock
        return self._rows[row, :self._lengths[row]].tolist(), self._blobs[row], int(shared[row])
