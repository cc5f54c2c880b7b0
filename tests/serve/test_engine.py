"""The engine alone: FIFO order, the bounded queue, cancellation, generation from token ids,
and prompt scoring against slimlm's scorer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from serve_helpers import FakeBackend

from slimlm.models.backends.base import GenerationParams
from slimlm.serve.engine import Engine, QueueFull, Task


def _task(n: int = 3, **kwargs) -> Task:
    return Task([1, 2, 3], GenerationParams(max_tokens=n, temperature=0), **kwargs)


def test_jobs_run_in_arrival_order():
    engine = Engine(FakeBackend(delay=0.001), queue_size=8)
    finished = []

    async def main():
        jobs = [engine.submit([_task(2, index=i)]) for i in range(5)]
        for i, job in enumerate(jobs):
            job.on_done.append(lambda j, i=i: finished.append(i))
        return [await job.results() for job in jobs]

    results = asyncio.run(main())
    assert finished == [0, 1, 2, 3, 4]
    assert [r[0].text for r in results] == ["xx"] * 5


def test_a_full_queue_refuses_at_once():
    backend = FakeBackend()
    backend.gate.clear()
    engine = Engine(backend, queue_size=1)

    async def main():
        running = engine.submit([_task()])
        while engine._active is None:  # the worker took it; the queue is empty again
            await asyncio.sleep(0.01)
        waiting = engine.submit([_task()])
        assert engine.queue_depth == 2
        with pytest.raises(QueueFull, match="retry"):
            engine.submit([_task()])
        backend.gate.set()
        return await running.results(), await waiting.results()

    first, second = asyncio.run(main())
    assert first[0].text == second[0].text == "xxx"


def test_cancel_stops_generation_within_a_token():
    backend = FakeBackend(delay=0.01)
    engine = Engine(backend)

    async def main():
        job = engine.submit([_task(500)])
        seen = 0
        async for kind, _ in job:
            seen += kind == "token"
            if seen == 3:
                job.cancel()
        return job

    job = asyncio.run(main())
    assert job.status == "cancelled"
    assert backend.produced <= 5 and job.completion_tokens <= 5


def test_generation_from_ids_matches_generation_from_text(tiny_engine):
    prompt = "The function returns"
    params = GenerationParams(max_tokens=8, temperature=0)
    expected = tiny_engine.backend.generate(prompt, params, raw=True).text

    async def main():
        return await tiny_engine.submit([Task(tiny_engine.text_ids(prompt), params)]).results()

    [result] = asyncio.run(main())
    assert result.text == expected
    assert result.completion_tokens == tiny_engine.backend.last_timings.generated_tokens


def test_stream_ids_gives_what_stream_gives_on_the_same_prompt(tiny_engine):
    """The engine generates from token ids through Backend.stream_ids: the same pieces, token
    count and finish reason as stream() on the text those ids came from."""
    backend = tiny_engine.backend
    prompt, params = "def add(a, b):", GenerationParams(max_tokens=10, temperature=0, stop=["\n\n"])
    from_text = list(backend.stream(prompt, params, raw=True))
    text_timings = backend.last_timings
    from_ids = list(backend.stream_ids(backend.tokenize(prompt), params))
    ids_timings = backend.last_timings
    assert from_ids == from_text and "".join(from_text)
    assert ids_timings.prompt_tokens == text_timings.prompt_tokens == len(backend.tokenize(prompt))
    assert ids_timings.generated_tokens == text_timings.generated_tokens
    assert ids_timings.finish_reason == text_timings.finish_reason
    assert "tokenize" not in vars(backend)  # nothing is patched on the instance any more


def test_echo_scores_are_slimlm_scorer_numbers(tiny_engine):
    from slimlm.models.backends.scoring import Request

    ids = tiny_engine.text_ids("Question: What is the capital of France?\nAnswer: Paris")
    expected = tiny_engine.backend.scorer().score([Request(ids, 1)])[0].logprobs

    async def main():
        task = Task(ids, GenerationParams(max_tokens=0), logprobs=2, echo_logprobs=True)
        return await tiny_engine.submit([task]).results()

    [result] = asyncio.run(main())
    lps = result.prompt_logprobs
    assert len(lps) == len(ids) and lps[0].logprob is None
    np.testing.assert_allclose([t.logprob for t in lps[1:]], expected, rtol=0, atol=1e-5)
    assert all(len(t.top) == 2 and t.top[0][1] >= t.logprob - 1e-6 for t in lps[1:])
    assert result.text == "" and result.completion_tokens == 0


def test_adapters_need_torch_and_names_come_from_the_model(tiny_engine, tmp_path):
    from types import SimpleNamespace

    from slimlm.errors import SlimlmError
    from slimlm.models.backends.llamacpp import LlamaCppBackend
    from slimlm.serve.adapters import AdapterSet
    from slimlm.serve.engine import model_name

    # The refusal needs no loaded model: a bare instance is enough to ask.
    with pytest.raises(SlimlmError, match="torch backend .llamacpp opens LoRA files per model"):
        AdapterSet(LlamaCppBackend.__new__(LlamaCppBackend), {"a": str(tmp_path)})
    with pytest.raises(SlimlmError, match="torch backend"):
        AdapterSet(FakeBackend(), {"a": str(tmp_path)})
    with pytest.raises(SlimlmError, match="adapter_config.json"):
        AdapterSet(tiny_engine.backend, {"a": str(tmp_path)})
    assert AdapterSet(FakeBackend(), {}).names == []
    gguf = tmp_path / "tiny-q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_name(SimpleNamespace(builtin=None, path=gguf)) == "tiny-q4_0"
    assert model_name(SimpleNamespace(builtin=None, path=tmp_path)) == tmp_path.name
    assert model_name(SimpleNamespace(builtin="smollm2-135m-instruct", path=gguf)) == "smollm2-135m-instruct"
