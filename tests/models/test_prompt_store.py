"""The host-memory prompt store (models/backends/prompt_store.py): budget, eviction order,
containment, and which entry a prompt gets back. Blobs are plain bytes here; their length is
what the budget counts."""

from __future__ import annotations

from slimlm.models.backends.prompt_store import PromptStore


def test_the_longest_shared_prefix_wins_and_ties_go_to_the_most_recent():
    store = PromptStore(1000)
    store.put([1, 2, 3, 4], b"a" * 10)
    store.put([1, 2, 9], b"b" * 10)
    store.put([1, 2, 3, 8], b"c" * 10)
    tokens, blob, shared = store.best([1, 2, 3, 4, 5])
    assert (tokens, blob, shared) == ([1, 2, 3, 4], b"a" * 10, 4)
    assert store.best([1, 2, 3, 7])[1] == b"a" * 10  # 3 shared with a and with c: a was used last
    assert store.best([1, 2, 3, 8, 0])[1] == b"c" * 10
    assert store.best([1, 2, 3, 7])[1] == b"c" * 10  # now c was
    assert store.best([5, 6]) is None


def test_budget_evicts_least_recently_used_first():
    store = PromptStore(30)
    store.put([1], b"x" * 10)
    store.put([2], b"y" * 10)
    store.put([3], b"z" * 10)
    store.best([1, 0])  # using [1] makes [2] the oldest
    store.put([4], b"w" * 10)
    assert [store.contains([t]) for t in (1, 2, 3, 4)] == [True, False, True, True]
    assert store.size == 30
    store.resize(15)
    assert len(store) == 1 and store.contains([4])
    store.resize(0)
    assert len(store) == store.size == 0
    store.put([5], b"v")  # a budget of 0 keeps nothing
    assert len(store) == 0


def test_contained_prompts_are_stored_once():
    store = PromptStore(100)
    store.put([1, 2, 3], b"s" * 10)
    store.put([1, 2, 3, 4, 5], b"l" * 20)  # the shorter entry is a prefix of it: dropped
    assert len(store) == 1 and store.size == 20
    store.put([1, 2], b"p" * 5)  # already held as a prefix of an entry: not stored again
    assert len(store) == 1 and store.contains([1, 2, 3, 4])
    store.put([7] * 3, b"q" * 200)  # larger than the whole budget: skipped, nothing evicted
    assert len(store) == 1


def test_lookups_agree_with_a_plain_loop_over_entries():
    """Random prompts over a small alphabet (long shared prefixes, entries of growing lengths):
    best() returns an entry with the longest common prefix a plain loop finds, and contains()
    agrees with the loop too."""
    import random

    def lcp(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    rng = random.Random(0)
    store, kept = PromptStore(10**9), []
    for i in range(120):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 4 + i // 4))]
        store.put(tokens, b"x")
        if not any(len(k) >= len(tokens) and k[:len(tokens)] == tokens for k in kept):
            kept = [k for k in kept if tokens[:len(k)] != k] + [tokens]
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 40))]
        want = max(lcp(k, prompt) for k in kept)
        found = store.best(prompt)
        assert (found[2] if found else 0) == want and (not found or lcp(found[0], prompt) == want)
        assert store.contains(prompt) == any(lcp(k, prompt) == len(prompt) for k in kept)
    assert len(store) == len(kept)
