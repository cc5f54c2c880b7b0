"""The offline teacher cache: its log-probs are the teacher's log_softmax at the cached ids (the top
k, in order), it takes well under 1 KB per token, it resumes after an interruption without redoing
finished shards, and it refuses other data or another tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.train.teacher_cache import TeacherCache, build_teacher_cache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
K = 32


@pytest.fixture(scope="module")
def teacher(tiny_models):
    from slimlm.models.loading import load_torch

    model, tok = load_torch(tiny_models("llama"))
    from slimlm.data import python_docs

    ids = tok("\n\n".join(python_docs()[:4]), add_special_tokens=False)["input_ids"]
    lengths = [7, 40, 1, 23, 31]
    starts = np.cumsum([0] + lengths)
    seqs = [ids[a:b] for a, b in zip(starts[:-1], starts[1:])]
    return model, tok, seqs


def _calls(model):
    count = [0]
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: count.__setitem__(0, count[0] + 1),
                                             with_kwargs=True)
    return count, handle


def test_cache_holds_the_teachers_top_k_logprobs(teacher, tmp_path):
    model, tok, seqs = teacher
    index = build_teacher_cache(model, seqs, tmp_path / "cache", k=K, tokenizer=tok, batch_size=2,
                                shard_sequences=2, progress=False)
    cache = TeacherCache.open(tmp_path / "cache")
    assert len(cache) == 5 and cache.k == K and cache.vocab_size == len(tok)
    assert cache.num_tokens == sum(map(len, seqs)) == index["num_tokens"]
    files = sorted((tmp_path / "cache").glob("shard-*.safetensors"))
    assert len(files) == 3
    measured = sum(f.stat().st_size for f in files) / cache.num_tokens
    assert measured == pytest.approx(cache.bytes_per_token)
    assert index["payload_bytes_per_token"] == 192 and measured < 210  # a small header per shard: far below 1 KB
    for i, seq in enumerate(seqs):
        ids, lp = cache.get(i)
        assert ids.dtype == np.int32 and lp.dtype == np.float16 and ids.shape == lp.shape == (len(seq), K)
        with torch.no_grad():  # each sequence alone, no padding: the reference
            full = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        at = full.gather(-1, torch.from_numpy(ids).long())
        np.testing.assert_allclose(lp.astype(np.float64), at.numpy(), rtol=2e-3, atol=2e-3)
        kth = full.topk(K, dim=-1).values[:, -1]
        assert (at[:, -1] >= kth - 1e-6).all()  # the cached ids are the top k
        assert (np.diff(lp.astype(np.float32), axis=1) <= 0).all()  # in descending order
    top = cache.topk(1)
    assert top.ids.dtype == torch.int64 and top.logprobs.dtype == torch.float32
    cache.check_tokenizer(tok)
    other = type(tok).from_pretrained(tok.name_or_path)
    other.add_tokens(["<other>"])
    with pytest.raises(SlimlmError, match="another tokenizer"):
        cache.check_tokenizer(other)


def test_build_resumes_after_an_interruption(teacher, tmp_path):
    model, tok, seqs = teacher
    out = tmp_path / "cache"
    count, handle = _calls(model)

    def fail_on_second(m, args, kwargs):
        if count[0] >= 2:
            raise RuntimeError("killed")

    crash = model.register_forward_pre_hook(fail_on_second, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            build_teacher_cache(model, seqs, out, k=K, tokenizer=tok, batch_size=2, shard_sequences=2,
                                progress=False)
    finally:
        crash.remove()
    assert [f.name for f in sorted(out.glob("shard-*"))] == ["shard-00000.safetensors"]
    with pytest.raises(SlimlmError, match="unfinished"):
        TeacherCache.open(out)
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    count[0] = 0
    try:
        index = build_teacher_cache(model, seqs, out, k=K, tokenizer=tok, batch_size=2, shard_sequences=2,
                                    progress=False)
    finally:
        handle.remove()
    assert count[0] == 2  # shards 1 and 2 only: one batch of two sequences each
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert index["complete"] and json.loads((out / "index.json").read_text())["complete"]
    ids, _ = TeacherCache.open(out).get(4)
    assert ids.shape == (31, K)
    with pytest.raises(SlimlmError, match="already holds a finished cache"):
        build_teacher_cache(model, seqs, out, k=K, tokenizer=tok, shard_sequences=2, progress=False)
    with pytest.raises(SlimlmError, match="something else"):
        build_teacher_cache(model, seqs[:3], out, k=K, tokenizer=tok, shard_sequences=2, progress=False)
    build_teacher_cache(model, seqs[:3], out, k=8, tokenizer=tok, force=True, progress=False)
    assert TeacherCache.open(out).k == 8 and len(TeacherCache.open(out)) == 3


def test_cache_from_a_model_folder_and_bad_input(tiny_models, tmp_path):
    folder = tiny_models("qwen2")
    index = build_teacher_cache(folder, [[5, 6, 7, 8], {"input_ids": [9, 10]}], tmp_path / "c", k=4, progress=False)
    assert index["teacher"] == str(folder) and index["num_tokens"] == 6
    with pytest.raises(SlimlmError, match="outside the teacher's vocabulary"):
        build_teacher_cache(folder, [[5, 100000]], tmp_path / "d", k=4, progress=False)
    with pytest.raises(SlimlmError, match="not a teacher cache"):
        TeacherCache.open(tmp_path / "nothing")
