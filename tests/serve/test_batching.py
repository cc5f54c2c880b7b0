"""The engine with continuous batching (serve/batching.py) on llama.cpp: requests decoded
together get what each gets alone, a cancel inside a batch stops only that request, the queue
stays bounded, and prompt scoring still runs (between steps).

"Alone" is llama-cpp-python's own greedy loop from a cleared cache, its tokens' bytes decoded
whole: on the tiny random model's byte soup the one-at-a-time stream (create_completion) drops
characters split across tokens, so its text is not the yardstick there; on the real model the
texts are compared directly."""

from __future__ import annotations

import asyncio

import llama_cpp  # noqa: F401  (required: fails, never skips, when missing)
import pytest

from slimlm.models.backends.base import GenerationParams
from slimlm.serve.engine import Engine, QueueFull, Task
from tests.conftest import greedy_alone

pytestmark = [pytest.mark.llamacpp]
PROMPTS = ["def add(a, b):\n    return", "The quick brown fox", "Once upon a time there was a small model that",
           "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def engines(tiny_gguf):
    batched = Engine.open(str(tiny_gguf), "llamacpp", n_ctx=256, parallel=3, batch_tokens=64)
    alone = Engine.open(str(tiny_gguf), "llamacpp", n_ctx=256, parallel=1)
    yield batched, alone
    batched.close()
    alone.close()


def _alone(engine, ids, n):
    """(text, tokens) of greedy decoding on llama-cpp-python's own loop, bytes decoded whole."""
    out = greedy_alone(engine.backend.llm, ids, n)
    return b"".join(engine.backend.llm.detokenize([t]) for t in out).decode("utf-8", "ignore"), len(out)


def _tasks(engine, n=12, stop=()):
    return [Task(engine.text_ids(p), GenerationParams(max_tokens=n, temperature=0, stop=list(stop)))
            for p in PROMPTS]


async def _all(engine, tasks):
    jobs = [engine.submit([t]) for t in tasks]
    return [(await job.results())[0] for job in jobs], jobs


def test_batched_requests_get_what_each_gets_alone(engines):
    batched, alone = engines
    assert batched.batcher is not None and alone.batcher is None
    steps = []
    batched.batcher.on_step.append(lambda stats, s: steps.append(stats))
    got, jobs = asyncio.run(_all(batched, _tasks(batched)))
    want = [_alone(alone, t.ids, 12) for t in _tasks(alone)]
    assert [(r.text, r.completion_tokens) for r in got] == want
    assert all(j.status == "ok" and j.prompt_tokens == len(t.ids) for j, t in zip(jobs, _tasks(batched)))
    assert max(s.decoding for s in steps) == 3  # three slots for four requests: they really shared steps
    assert batched.queue_depth == 0


def test_stop_strings_cut_batched_text_as_alone(engines):
    batched, alone = engines
    whole = [_alone(alone, t.ids, 16)[0] for t in _tasks(alone)]
    stop = next(text[3:5] for text in whole if len(text) > 6)  # a stop string that occurs in one of them
    got = asyncio.run(_all(batched, _tasks(batched, 16, [stop])))[0]
    assert [r.text for r in got] == [text.split(stop)[0] for text in whole]
    assert [r.finish_reason == "stop" for r in got] == [stop in text for text in whole]


def test_cancel_inside_a_batch_stops_only_that_request(engines):
    batched, alone = engines

    async def main():
        tasks = _tasks(batched, 40)
        jobs = [batched.submit([t]) for t in tasks[:3]]
        seen = 0
        async for kind, _ in jobs[1]:
            seen += kind == "token"
            if seen == 2:
                jobs[1].cancel()
        return [(await j.results()) for j in (jobs[0], jobs[2])], jobs

    (first, third), jobs = asyncio.run(main())
    want = [_alone(alone, t.ids, 40)[0] for t in _tasks(alone, 40)]
    assert jobs[1].status == "cancelled" and jobs[1].completion_tokens <= 10  # of 40; pieces lag tokens a little
    assert first[0].text == want[0] and third[0].text == want[2]


def test_the_queue_beyond_the_slots_is_bounded(tiny_gguf):
    engine = Engine.open(str(tiny_gguf), "llamacpp", n_ctx=256, parallel=2, queue_size=1)

    async def main():
        long = [Task(engine.text_ids(p), GenerationParams(max_tokens=200, temperature=0)) for p in PROMPTS]
        running = [engine.submit([long[0]]), engine.submit([long[1]])]
        while len(engine.batcher.running) < 2:
            await asyncio.sleep(0.005)
        waiting = engine.submit([long[2]])
        assert engine.queue_depth == 3
        with pytest.raises(QueueFull, match="retry"):
            engine.submit([long[3]])
        for job in (*running, waiting):
            job.cancel()
        return [await j.results() for j in (*running, waiting)]

    try:
        results = asyncio.run(main())
        assert all(len(r) == 1 for r in results)
    finally:
        engine.close()


@pytest.mark.parametrize("quiet", [0.0, 1.0])
def test_an_idle_engine_gathers_a_burst_into_one_first_step(tiny_gguf, quiet):
    """Requests arriving 200 ms apart at an idle engine: with a gather window longer than the gaps
    they are all read in the first step; without one the first step holds only the first. Either
    way each gets its greedy text."""
    engine = Engine.open(str(tiny_gguf), "llamacpp", n_ctx=256, parallel=3, batch_tokens=64)
    engine.batcher.gather_quiet_s, engine.batcher.gather_max_s = quiet, 5.0
    steps = []
    engine.batcher.on_step.append(lambda stats, seconds: steps.append(stats.prefilling))

    async def main():
        jobs = []
        for task in _tasks(engine, n=4)[:3]:
            jobs.append(engine.submit([task]))
            await asyncio.sleep(0.2)
        return [(await job.results())[0].text for job in jobs]

    try:
        texts = asyncio.run(main())
        assert steps[0] == (3 if quiet else 1)
        assert texts == [_alone(engine, engine.text_ids(p), 4)[0] for p in PROMPTS[:3]]
    finally:
        engine.close()


def test_prompt_scoring_runs_between_steps(engines):
    batched, alone = engines
    ids = batched.text_ids("Question: What is the capital of France?\nAnswer: Paris")

    async def main(engine):
        gen = [engine.submit([t]) for t in _tasks(engine, 8)[:2]]
        score = engine.submit([Task(ids, GenerationParams(max_tokens=0), logprobs=1, echo_logprobs=True)])
        [scored] = await score.results()
        return scored, [(await j.results())[0].text for j in gen]

    (got, got_texts), (want, want_texts) = asyncio.run(main(batched)), asyncio.run(main(alone))
    assert [t.logprob for t in got.prompt_logprobs] == [t.logprob for t in want.prompt_logprobs]
    assert got_texts == want_texts


def test_parallel_needs_a_backend_that_batches(tiny_models):
    from slimlm.errors import SlimlmError

    sliding = str(tiny_models("gemma3_text"))  # torch decodes sliding-window models one at a time
    with pytest.raises(SlimlmError, match="--parallel 4 needs a backend that batches"):
        Engine.open(sliding, "torch", parallel=4)
    engine = Engine.open(sliding, "torch", parallel=None)
    try:
        assert engine.parallel == 1 and engine.batcher is None  # the default where batching is not there
    finally:
        engine.close()


def test_torch_engine_batches_and_each_request_gets_its_greedy_text(tiny_models):
    """The torch backend through the same scheduler: four requests on three slots, each answer the
    greedy continuation transformers' own generate gives that prompt alone."""
    import torch

    engine = Engine.open(str(tiny_models("llama")), "torch", parallel=None, batch_tokens=64)
    try:
        assert engine.parallel > 1 and engine.batcher is not None  # batching is the default where it works
        engine.close()
        engine = Engine.open(str(tiny_models("llama")), "torch", parallel=3, batch_tokens=64)
        steps = []
        engine.batcher.on_step.append(lambda stats, s: steps.append(stats))
        got, jobs = asyncio.run(_all(engine, _tasks(engine)))
        backend, want = engine.backend, []
        for task in _tasks(engine):
            with torch.no_grad():
                ids = backend.model.generate(torch.tensor([task.ids]), max_new_tokens=12, do_sample=False,
                                             attention_mask=torch.ones((1, len(task.ids)), dtype=torch.long),
                                             pad_token_id=0)[0, len(task.ids):].tolist()
            ids = ids[:next((i for i, t in enumerate(ids) if t in backend.stop_ids), len(ids))]
            text = b"".join(backend.token_bytes(t) for t in ids).decode("utf-8", "ignore")
            want.append((text, len(ids)))
        assert [(r.text, r.completion_tokens) for r in got] == want
        assert max(s.decoding for s in steps) == 3
    finally:
        engine.close()


def test_the_api_streams_from_the_batch_and_metrics_show_it(tiny_gguf):
    import re
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from slimlm.serve import ServeConfig, create_app

    engine = Engine.open(str(tiny_gguf), "llamacpp", n_ctx=256, parallel=4)
    records: list[dict] = []
    shared = "You are a terse assistant. Answer briefly. " * 3

    def ask(c, i):
        body = {"model": engine.name, "prompt": shared + PROMPTS[i % 4], "max_tokens": 8, "temperature": 0,
                "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            return "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                           if line.startswith("data: {"))

    import json

    try:
        with TestClient(create_app(engine, ServeConfig(on_record=records.append))) as c:
            with ThreadPoolExecutor(6) as pool:
                texts = list(pool.map(lambda i: ask(c, i), range(6)))
            want = [_alone(engine, engine.text_ids(shared + PROMPTS[i % 4]), 8)[0] for i in range(6)]
            assert texts == want
            metrics = c.get("/metrics").text
            assert c.get("/health").json()["models"][engine.name]["parallel"] == 4
        count = float(re.search(r'slimlm_batch_size_count\{model="[^"]+"\} (\S+)', metrics).group(1))
        assert count >= 8  # at least one step per generated token
        assert float(re.search(r'slimlm_queue_wait_seconds_count\{model="[^"]+"\} (\S+)', metrics).group(1)) == 6
        hit = float(re.search(r'slimlm_prefix_cache_hit_ratio\{model="[^"]+"\} (\S+)', metrics).group(1))
        # four slots for six prompts sharing a system text: the last two reuse at least it from a released slot
        prompts = [engine.text_ids(shared + PROMPTS[i % 4]) for i in range(6)]
        assert hit >= 2 * (len(engine.text_ids(shared)) - 1) / sum(len(p) for p in prompts) > 0.2
        assert "slimlm_step_tokens_bucket" in metrics and "slimlm_prompt_store_bytes" in metrics
        assert sorted(r["tokens_out"] for r in records) == sorted(_alone(engine, engine.text_ids(shared + PROMPTS[i % 4]), 8)[1]
                                                                   for i in range(6))
    finally:
        engine.close()


def test_scoring_with_and_without_prefix_reuse_gives_the_same_numbers(tiny_gguf):
    """lm-eval's multiple-choice requests: one context, several continuations, one after another."""
    context = "Question: which of these is a prime number?\nAnswer:"
    choices = [" four", " seven", " nine"]

    async def score(engine):
        out = []
        for choice in choices:
            ids = engine.text_ids(context + choice)
            job = engine.submit([Task(ids, GenerationParams(max_tokens=0), logprobs=0, echo_logprobs=True)])
            [res] = await job.results()
            out.append([t.logprob for t in res.prompt_logprobs])
        return out

    engines = [Engine.open(str(tiny_gguf), "llamacpp", n_ctx=256, parallel=2, prefix_cache=reuse)
               for reuse in (True, False)]
    try:
        reused, whole = (asyncio.run(score(e)) for e in engines)
        assert reused == whole and len(reused) == 3
        assert engines[0].scoring.scorer().reuse_prefix and not engines[1].scoring.scorer().reuse_prefix
    finally:
        for e in engines:
            e.close()
