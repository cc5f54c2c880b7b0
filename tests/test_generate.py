"""slimlm.generate: the library call behind `slimlm generate` streams and records its own run."""

from __future__ import annotations

from slimlm.generate import Generation
from slimlm.models.backends import GenerationParams, open_backend
from slimlm.runs import get_run, list_runs


def test_generation_streams_the_backends_text_and_records_the_run(tiny_models):
    folder = tiny_models("llama")
    params = GenerationParams(max_tokens=6)
    gen = Generation(str(folder), "Hello there", params, backend="torch", raw=True)
    text = "".join(gen)
    direct = open_backend(str(folder), "torch").generate("Hello there", params, raw=True)
    assert text == direct.text
    run = get_run(gen.run_id)
    assert run.command == "generate" and run.params["max_tokens"] == 6 and run.params["raw"] is True
    assert run.metrics["generated_tokens"] == gen.timings.generated_tokens == direct.timings.generated_tokens


def test_generation_without_record_leaves_no_run(tiny_models):
    before = len(list_runs(limit=1000))
    gen = Generation(str(tiny_models("llama")), "Hi", GenerationParams(max_tokens=2), backend="torch", raw=True,
                     record=False)
    "".join(gen)
    assert gen.run_id is None and gen.timings.prompt_tokens > 0
    assert len(list_runs(limit=1000)) == before
