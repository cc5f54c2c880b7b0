"""Continuous batching in llama.cpp (models/backends/decoder.py, llamacpp_decoder.py): several
sequences in shared forward passes give each the tokens it gets alone, sequences join and leave
a running batch, and a reused prompt prefix gives the logits a fresh read gives."""

from __future__ import annotations

import llama_cpp  # noqa: F401  (a required dependency: its absence fails these tests, never skips them)
import numpy as np
import pytest

from slimlm.errors import SlimlmError
from slimlm.models.backends import open_backend
from slimlm.models.backends.decoder import Sampler, common_prefix
from tests.conftest import greedy_alone

pytestmark = [pytest.mark.llamacpp]
PROMPTS = ["def add(a, b):\n    return", "The quick brown fox", "Once upon a time there was a small model that",
           "1, 2, 3, 4,"]


def _single(backend, ids, n):
    """Greedy token ids of one prompt on the one-at-a-time path, from a cleared cache."""
    return greedy_alone(backend.llm, ids, n)


def _run(decoder, backend, prompts, n, join_at=None, late=None):
    """Drive the decoder greedily; `late` joins at step `join_at`. Returns token ids per prompt."""
    order = list(prompts) + ([late] if late is not None else [])
    slots = {decoder.admit(p): i for i, p in enumerate(prompts)}
    tokens = {i: [] for i in range(len(order))}
    step = 0
    while slots or (late is not None and step <= join_at):
        if late is not None and step == join_at:
            slots[decoder.admit(late)] = len(order) - 1
        for slot, logits in decoder.step().items():
            i = slots[slot]
            tok = Sampler()(logits)
            if decoder.is_end(tok):
                decoder.release(slot)
                del slots[slot]
                continue
            tokens[i].append(tok)
            if len(tokens[i]) >= n:
                decoder.release(slot)
                del slots[slot]
            else:
                decoder.feed(slot, tok)
        step += 1
    return [tokens[i] for i in range(len(order))]


def _alone_logits(decoder, prompt):
    """The logits a prompt gets read alone in `decoder`."""
    slot = decoder.admit(prompt)
    return decoder.step()[slot]


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    backend = open_backend(str(tiny_gguf), "llamacpp", n_ctx=256)
    yield backend
    backend.close()


def test_batched_greedy_tokens_equal_one_at_a_time(tiny):
    ids = [tiny.tokenize(p) for p in PROMPTS]
    alone = [_single(tiny, x, 12) for x in ids]
    decoder = tiny.decoder(4, 64, 128)
    try:
        assert _run(decoder, tiny, ids, 12) == alone
        assert decoder.last.tokens >= 1
    finally:
        decoder.close()


def check_joins_and_leaves(backend, alone) -> None:
    """Sequences join a running batch and leave it, each getting `alone(backend, ids, n)`'s tokens
    (shared with test_torch_decoder.py: only the yardstick differs per backend)."""
    ids = [backend.tokenize(p) for p in PROMPTS]
    want = [alone(backend, x, 10) for x in ids]
    decoder = backend.decoder(3, 64, 128)  # three slots: the fourth prompt waits for one to leave
    try:
        got = _run(decoder, backend, ids[:2], 10, join_at=4, late=ids[2])
        assert got == want[:3]
        got = _run(decoder, backend, ids[1:3], 10, join_at=2, late=ids[3])
        assert got == want[1:]
    finally:
        decoder.close()


def check_prompt_chunks_share_steps(backend, alone) -> None:
    """A prompt longer than the step's room is read over several steps while another decodes."""
    short, long = backend.tokenize(PROMPTS[1]), backend.tokenize(PROMPTS[2] * 6)
    want = [alone(backend, x, 6) for x in (short, long)]
    decoder = backend.decoder(2, 8, 200)
    try:
        decoder.chunk = 8
        assert _run(decoder, backend, [short], 6, join_at=1, late=long) == want
    finally:
        decoder.close()


def check_chat_prompts_batched_equal_alone(backend, alone, n) -> None:
    """The four prompts as chat turns, batched in 4 slots, each getting `alone(backend, ids, n)`'s
    greedy tokens (the real-model check, shared with test_torch_decoder.py)."""
    ids = [backend.tokenize(backend.prompt_text(p)) for p in PROMPTS]
    want = [alone(backend, x, n) for x in ids]
    decoder = backend.decoder(4, 512, 512)
    try:
        assert _run(decoder, backend, ids, n) == want
    finally:
        decoder.close()


def test_a_sequence_joins_a_running_batch_and_others_leave(tiny):
    check_joins_and_leaves(tiny, _single)


def test_prompt_chunks_share_steps_with_decoding(tiny):
    check_prompt_chunks_share_steps(tiny, _single)


def test_joining_prompts_share_a_pass_and_read_as_alone(tiny):
    """A burst of joining prompts of different lengths is read in one llama_decode (llama.cpp cuts
    it into equal-length pieces), each prompt with the logits a fresh decoder gives it alone (f32
    weights: to the last float bits, as batched decode tokens are) and the same greedy token."""
    base = tiny.tokenize(PROMPTS[2])
    prompts = [base, base[::-1], base[:-1], base[:-3]]  # lengths n, n, n-1, n-3
    decoder = tiny.decoder(4, 128, 128)
    try:
        slots = [decoder.admit(p) for p in prompts]
        together = decoder.step()
        assert decoder.passes == 1 and decoder.last.prefilling == 4
    finally:
        decoder.close()
    for slot, ids in zip(slots, prompts):
        alone = tiny.decoder(1, 128, 128)
        try:
            by_itself = _alone_logits(alone, ids)
            np.testing.assert_allclose(together[slot], by_itself, rtol=0, atol=1e-5)
            assert Sampler()(together[slot]) == Sampler()(by_itself)
        finally:
            alone.close()


def test_joining_prompts_come_out_a_few_per_pass_before_the_decode_pass(tiny):
    """Six prompts join two running sequences: the prompts are read PROMPTS_PER_PASS (4) to a pass,
    each pass's logits handed out before the next pass runs, the decode tokens last; the logits
    are those of one step() and each prompt's those of reading it alone."""
    ids = [tiny.tokenize(p) for p in PROMPTS]
    prompts = [ids[i % 4][: len(ids[i % 4]) - i // 4] for i in range(6)]
    decoder, again = tiny.decoder(8, 256, 128), tiny.decoder(8, 256, 128)
    try:
        assert decoder.PROMPTS_PER_PASS == 4
        for d in (decoder, again):
            running = [d.admit(ids[0]), d.admit(ids[1])]
            for slot, logits in d.step().items():
                d.feed(slot, Sampler()(logits))
            joining = [d.admit(p) for p in prompts]
        parts = list(decoder.step_passes())
        assert [sorted(p) for p in parts] == [sorted(joining[:4]), sorted(joining[4:]), sorted(running)]
        whole = again.step()
        for part in parts:
            for slot, logits in part.items():
                np.testing.assert_array_equal(logits, whole[slot])
        for slot, p in zip(joining, prompts):
            alone = tiny.decoder(1, 256, 128)
            try:
                np.testing.assert_allclose(whole[slot], _alone_logits(alone, p), rtol=0, atol=1e-5)
            finally:
                alone.close()
    finally:
        decoder.close()
        again.close()


def test_a_step_left_unfinished_forgets_what_it_did_not_read(tiny):
    """A step whose passes stop early (an error in the caller) must not leave slots claiming
    tokens llama.cpp never read: the same prompt again is read whole, with the fresh logits."""
    ids = [tiny.tokenize(p) for p in PROMPTS]
    decoder, fresh = tiny.decoder(6, 256, 128), tiny.decoder(1, 256, 128)
    try:
        slots = [decoder.admit(p) for p in ids + ids[:2]]  # six prompts: two passes
        passes = decoder.step_passes()
        next(passes)
        passes.close()  # the second pass never runs
        for slot in slots:
            decoder.release(slot)
        before = decoder.reused_tokens
        slot = decoder.admit(ids[3])
        assert decoder.reused_tokens == before  # nothing claimed: read whole
        np.testing.assert_allclose(decoder.step()[slot], _alone_logits(fresh, ids[3]), rtol=0, atol=1e-5)
    finally:
        decoder.close()
        fresh.close()


def test_prefix_reuse_gives_the_logits_of_a_fresh_read(tiny):
    system = tiny.tokenize("You answer in one short sentence. " * 3)
    first, second = system + tiny.tokenize(" What is two plus two?"), system + tiny.tokenize(" Name a colour.")
    decoder, fresh = tiny.decoder(2, 128, 128), tiny.decoder(1, 128, 128)
    try:
        slot = decoder.admit(first)
        decoder.step()
        decoder.release(slot)
        slot = decoder.admit(second)
        assert slot == 0 and decoder.reused_tokens == common_prefix(first, second) >= len(system) - 1
        reused = decoder.step()[slot]
        fresh_slot = fresh.admit(second)
        np.testing.assert_array_equal(reused, fresh.step()[fresh_slot])
        # the same prompt again reuses all but its last token, which must be read for its logits
        decoder.release(slot)
        before = decoder.reused_tokens
        slot = decoder.admit(second)
        assert decoder.reused_tokens - before == len(second) - 1
        decoder.release(slot)
        decoder.reuse_prefixes = False  # --no-prefix-cache: read whole, the same logits
        decoder.admit(second)
        assert decoder.reused_tokens - before == len(second) - 1
        np.testing.assert_array_equal(decoder.step()[slot], reused)
    finally:
        decoder.close()
        fresh.close()


def test_bad_slot_settings_are_refused(tiny):
    with pytest.raises(SlimlmError, match="--batch-tokens"):
        tiny.decoder(4, 2, 64)
    decoder = tiny.decoder(1, 16, 32)
    try:
        with pytest.raises(SlimlmError, match="fills a slot's context"):
            decoder.admit(list(range(1, 40)))
        decoder.admit([1, 2, 3])
        with pytest.raises(SlimlmError, match="no free slot"):
            decoder.admit([1, 2])
    finally:
        decoder.close()


def test_sampler_is_seeded_per_sequence():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    draws = [Sampler(1.0, 1.0, seed=7)(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed draws the same token, whatever else runs
    many = Sampler(1.0, 1.0, seed=1)
    counts = np.bincount([many(logits) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    nucleus = Sampler(1.0, 0.5, seed=1)  # top-p 0.5 keeps the two likeliest (0.4 + 0.3 >= 0.5)
    assert {nucleus(logits) for _ in range(200)} == {2, 3}
    assert Sampler()(logits) == 3


@pytest.mark.real_model
def test_batched_greedy_on_smollm2_equals_one_at_a_time(smollm2_gguf):
    """The real model, whose near-ties expose any difference in the shapes llama.cpp computes."""
    backend = open_backend(str(smollm2_gguf), "llamacpp", n_ctx=1024)
    try:
        check_chat_prompts_batched_equal_alone(backend, _single, 40)
    finally:
        backend.close()


def test_prompts_taking_turns_are_restored_from_the_store(tiny):
    """Prompts taking turns in one slot (two users, two system prompts): on llama.cpp a new
    sequence takes the lowest free slot (packed slots), so the prompt it displaces is saved to the
    host-memory store and restored when its user comes back; the restored prompt gives the logits
    of reusing it in place, bit for bit. With the store off, it is read again."""
    a = tiny.tokenize("Alpha: the first assistant's long instructions, " * 3)
    b = tiny.tokenize("Beta, a different set of rules for another job. " * 3)
    decoder, fresh = tiny.decoder(3, 128, 128), tiny.decoder(1, 128, 128)
    try:
        assert decoder.compact
        first = decoder.admit(a)
        decoder.step()
        decoder.release(first)
        second = decoder.admit(b)  # shares too little with a: a's prompt goes to the store
        assert first == second == 0 and len(decoder.store) == 1
        decoder.step()
        decoder.release(second)
        before = decoder.reused_tokens
        again = decoder.admit(a)
        assert again == 0 and decoder.reused_tokens - before == len(a) - 1  # restored, reused whole
        assert decoder.store.restored == 1 and decoder.store.contains(b)  # and b's prompt kept in turn
        in_place = fresh.admit(a)  # the same reuse without a store: a one-slot decoder reading a twice
        fresh.step()
        fresh.release(in_place)
        in_place = fresh.admit(a)
        np.testing.assert_array_equal(decoder.step()[again], fresh.step()[in_place])
        decoder.release(again)
        decoder.store.resize(0)  # --cache-ram 0: only the slots cache prompts
        before = decoder.reused_tokens
        decoder.admit(b)
        assert decoder.reused_tokens - before == common_prefix(a, b) and len(decoder.store) == 0
    finally:
        decoder.close()
        fresh.close()


def test_busy_slots_stay_packed_from_zero(tiny):
    """llama.cpp runs a step's sequences in one pass only while their ids are consecutive, so a new
    sequence fills the lowest free slot, even when a higher one holds its prefix."""
    ids = [tiny.tokenize(p) for p in PROMPTS]
    decoder = tiny.decoder(6, 256, 128)
    try:
        slots = [decoder.admit(x) for x in ids]
        assert slots == [0, 1, 2, 3]
        decoder.step()  # every prompt read whole
        decoder.release(1)
        decoder.release(3)
        assert decoder.admit(ids[3]) == 1  # the gap, with prompt 3's cache loaded from slot 3
        assert decoder.slots[1].cached == ids[3][:-1] and decoder.slots[1].pending == ids[3][-1:]
        assert decoder.admit(ids[1]) == 3  # prompt 1 went to the store, and comes back into slot 3
        assert decoder.slots[3].cached == ids[1][:-1] and decoder.store.restored == 1
    finally:
        decoder.close()
