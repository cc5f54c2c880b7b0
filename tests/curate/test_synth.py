"""`slimlm synth` with a teacher behind an OpenAI-compatible URL (a real HTTP server that writes
by a known rule): the prompt grid, self-dedup, decontamination, resume after an outage, and the
output read by finetune's own reader."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from slimlm.curate.synth import SynthOptions, builtin_topics, plan_jobs, synth
from slimlm.errors import SlimlmError
from tests.conftest import run_cli
from tests.serve.serve_helpers import serving


class Writer:
    """Answers a textbook prompt with a passage naming its topic (the same passage for two
    topics, to be deduplicated; a HumanEval prompt for one, to be decontaminated) and a qa prompt
    with two Q/A pairs; after `fail_after` answers, HTTP 503."""

    def __init__(self, fail_after: int | None = None, humaneval: str = ""):
        self.asked, self.fail_after, self.humaneval = 0, fail_after, humaneval

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            if self.fail_after is not None and self.asked >= self.fail_after:
                return JSONResponse({"error": "down"}, status_code=503)
            self.asked += 1
            prompt = (await request.json())["messages"][0]["content"]
            if "Passage:" in prompt:
                answer = "Q: What is it about?\nA: Rivers.\nQ: Who wrote it?\nA: Nobody knows."
            else:
                topic = prompt.split("Topic: ")[1].splitlines()[0]
                if "DUP" in topic:
                    topic = "a shared subject"
                answer = self.humaneval if "LEAK" in topic else _passage(topic)
            return {"choices": [{"message": {"role": "assistant", "content": answer}}]}

        return app


WORDS = ("water stone river valley rain cloud mountain forest season field harvest bridge mill road town "
         "market story lesson example idea rule number shape light sound heat energy motion force").split()


def _passage(topic: str) -> str:
    """40 words drawn by a generator seeded with the topic: different topics, different passages."""
    import random

    rng = random.Random(topic)
    return f"This lesson is about {topic}. " + " ".join(rng.choice(WORDS) for _ in range(40)) + "."


def _topics(tmp_path, names):
    path = tmp_path / "topics.txt"
    path.write_text("\n".join(names) + "\n")
    return str(path)


def test_textbook_mode_writes_deduplicated_decontaminated_chat_data(tmp_path):
    from slimlm.curate.steps.decontaminate import task_texts
    from slimlm.data import read_records

    leak = next(t for t in task_texts("humaneval") if len(t.split()) > 40)
    writer = Writer(humaneval=leak)
    topics = _topics(tmp_path, ["rivers", "volcanoes", "DUP one", "DUP two", "LEAK"])
    options = SynthOptions(n=5, topics=topics, audiences=["students"], formats=["tutorial"], tokenizer="words")
    with serving(writer.app()) as url:
        summary = synth(f"{url}/v1", tmp_path / "out", options, say=lambda _: None)
    assert writer.asked == 5 and summary["records"] == 5 and summary["kept"] == 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert sorted(r["metadata"]["topic"] for r in rows if "DUP" not in r["metadata"]["topic"]) == ["rivers",
                                                                                                  "volcanoes"]
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    assert len(read_records(tmp_path / "out" / "train.jsonl")) == 3  # finetune's reader takes it as it is
    removed = {r: n for s in summary["funnel"] for r, n in s["removed"].items()}
    assert removed == {"near_dedup": 1, "decontaminate_humaneval": 1}  # prompts differ by a word: near, not exact


def test_qa_mode_asks_about_the_users_documents(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Rivers flow to the sea.\n\nThey carry water and sand.")
    (tmp_path / "docs" / "b.md").write_text("Mountains are high.")
    writer = Writer()
    options = SynthOptions(mode="qa", n=10, docs=[str(tmp_path / "docs")], k=2, tokenizer="words")
    with serving(writer.app()) as url:
        summary = synth(f"{url}/v1", tmp_path / "out", options, say=lambda _: None)
    assert writer.asked == 2 and summary["records"] == 4
    assert summary["kept"] == 2  # the same two pairs for both passages: exact duplicates
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert rows[0]["messages"][0] == {"role": "user", "content": "What is it about?"}
    assert rows[0]["metadata"]["document"].endswith(("a.txt:1", "b.md:1"))  # which passage it came from


def test_an_outage_stops_the_run_and_the_rerun_asks_only_for_the_rest(tmp_path):
    topics = _topics(tmp_path, [f"topic {i}" for i in range(8)])
    options = SynthOptions(n=8, topics=topics, audiences=["students"], formats=["tutorial"], tokenizer="words",
                           retries=1, backoff_s=0.01)
    writer = Writer(fail_after=3)
    with serving(writer.app()) as url:
        with pytest.raises(SlimlmError, match=r"did not answer after 2 tries.*3 of 8 answers are kept.*rerun"):
            synth(f"{url}/v1", tmp_path / "out", options, say=lambda _: None)
        assert not (tmp_path / "out").exists()
        writer.fail_after = None
        summary = synth(f"{url}/v1", tmp_path / "out", options, say=lambda _: None)
    assert writer.asked == 8 and summary["kept"] == 8


def test_the_prompt_grid_is_fixed_by_the_settings():
    topics = builtin_topics()
    assert len(topics) > 50 and all(t.startswith("Python: ") for t in topics)
    a, b = plan_jobs(SynthOptions(n=20)), plan_jobs(SynthOptions(n=20))
    assert [j["id"] for j in a] == [j["id"] for j in b] and len({j["id"] for j in a}) == 20
    assert [j["id"] for j in plan_jobs(SynthOptions(n=20, seed=1))] != [j["id"] for j in a]


def test_synth_cli_with_a_local_teacher(tmp_path, capfd, tiny_models):
    """A model slimlm loads writes too (a tiny random one here: the words are noise, the plumbing is real)."""
    topics = _topics(tmp_path, ["rivers", "volcanoes"])
    code, out, err = run_cli(capfd, "synth", "--teacher", tiny_models("llama"), "--n", "2", "--topics", topics,
                             "--audience", "students", "--style", "tutorial", "--max-tokens", "24",
                             "--tokenizer", "words", "--out", tmp_path / "out")
    assert code == 0, err
    assert "2 prompts -> 2 records" in out and (tmp_path / "out" / "train.jsonl").exists()
    code, _, err = run_cli(capfd, "synth", "--teacher", "x", "--mode", "qa", "--out", tmp_path / "qa")
    assert code == 1 and "qa mode needs --docs" in err
