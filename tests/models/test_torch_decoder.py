"""Continuous batching on the torch backend (models/backends/torch_decoder.py): decoding slots
stepped together over a left-padded batched cache give each the greedy tokens transformers'
own `generate` gives it alone; sequences join and leave; a reused prefix gives the logits of a
fresh read; a model with sliding-window layers is refused, not batched wrongly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.errors import BackendUnavailable
from slimlm.models.backends import open_backend
from slimlm.models.backends.decoder import common_prefix
from tests.models.test_decoder import (
    PROMPTS,
    _run,
    check_chat_prompts_batched_equal_alone,
    check_joins_and_leaves,
    check_prompt_chunks_share_steps,
)


def _alone(backend, ids, n):
    """Greedy ids of one prompt from transformers' own generate (an independent decode loop),
    cut at the first end token as the decoder's loop cuts."""
    with torch.no_grad():
        out = backend.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                     attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                     pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in backend.stop_ids), len(out))
    return out[:cut]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    backend = open_backend(str(tiny_models("llama")), "torch", dtype="float32")
    yield backend
    backend.close()


def _ids(backend, texts):
    return [backend.tokenize(t) for t in texts]


def test_batched_greedy_tokens_equal_generate_alone(tiny):
    assert tiny.supports("continuous")
    ids = _ids(tiny, PROMPTS)
    assert len({len(x) for x in ids}) > 1  # rows of different lengths: the padding is exercised
    alone = [_alone(tiny, x, 12) for x in ids]
    decoder = tiny.decoder(4, 64, 128)
    widest, step = [], decoder.step

    def counted():
        out = step()
        widest.append(decoder.last.decoding)
        return out

    decoder.step = counted
    try:
        assert _run(decoder, tiny, ids, 12) == alone
        assert max(widest) == 4  # four sequences did decode in one forward pass
    finally:
        decoder.close()


def test_a_sequence_joins_a_running_batch_and_others_leave(tiny):
    check_joins_and_leaves(tiny, _alone)


def test_prompt_chunks_share_steps_with_decoding(tiny):
    check_prompt_chunks_share_steps(tiny, _alone)


def test_prefix_reuse_gives_the_logits_of_a_fresh_read(tiny):
    system = tiny.tokenize("You answer in one short sentence. " * 3)
    first, second = system + tiny.tokenize(" What is two plus two?"), system + tiny.tokenize(" Name a colour.")
    decoder, fresh = tiny.decoder(2, 128, 128), tiny.decoder(1, 128, 128)
    try:
        slot = decoder.admit(first)
        decoder.step()
        decoder.feed(slot, 5)
        decoder.step()  # the slot decodes once, so its cache goes through the batched layout and back
        decoder.release(slot)
        slot = decoder.admit(second)
        assert decoder.reused_tokens == common_prefix(first, second) >= len(system) - 1
        reused = decoder.step()[slot]
        with torch.no_grad():
            direct = tiny.model(torch.tensor([second])).logits[0, -1].numpy()
        np.testing.assert_allclose(reused, direct, atol=1e-4)
        fresh_slot = fresh.admit(second)
        np.testing.assert_allclose(fresh.step()[fresh_slot], direct, atol=1e-4)
    finally:
        decoder.close()
        fresh.close()


def test_a_sliding_window_model_decodes_one_at_a_time(tiny_models):
    backend = open_backend(str(tiny_models("gemma3_text")), "torch", dtype="float32")
    try:
        assert not backend.supports("continuous")
        assert type(backend).supports("continuous")  # the class can; this model cannot
        with pytest.raises(BackendUnavailable, match="sliding-window"):
            backend.decoder(2, 16, 64)
    finally:
        backend.close()


@pytest.mark.real_model
def test_batched_greedy_on_smollm2_equals_generate_alone():
    """The real model in fp32, whose near-ties would expose a padding or position error."""
    from slimlm.models.backends.base import Backend

    backend = open_backend("smollm2-135m-instruct", "torch", dtype="float32")
    try:
        assert isinstance(backend, Backend) and backend.supports("continuous")
        check_chat_prompts_batched_equal_alone(backend, _alone, 24)
    finally:
        backend.close()
