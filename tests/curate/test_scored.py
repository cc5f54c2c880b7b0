"""The score-and-cut steps: FineWeb-Edu's grader trained from a teacher behind an
OpenAI-compatible URL (a real HTTP server here, grading by a known rule), and CCNet's perplexity
checked against transformers' own loss."""

from __future__ import annotations

import json
import math

import pytest
from fastapi import FastAPI, Request

from slimlm.curate import RunOptions, curate
from slimlm.errors import SlimlmError
from tests.curate.test_run import _kept, _paragraphs
from tests.serve.serve_helpers import serving

SPAM = ["Home | Products | Cart | Login | Contact us | Sitemap | Terms | Privacy | Jobs | Press",
        "cheap pills cheap watches best price buy now click here free shipping limited offer",
        "Subscribe to our newsletter! Follow us on social media. Copyright all rights reserved.",
        "Click here to win a prize. Act now. Offer ends soon. Unsubscribe. Terms apply."]


def _spam(n: int) -> list[str]:
    return [f"{SPAM[i % len(SPAM)]} page {i} item {i * 7}" for i in range(n)]


class GradingTeacher:
    """Grades 4 a passage of Python's reference docs (it contains "the"), 0 anything else; after
    `fail_after` answers it fails with HTTP 503 until `fail_after` is raised."""

    def __init__(self, fail_after: int | None = None):
        self.asked, self.fail_after = 0, fail_after

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            from fastapi.responses import JSONResponse

            if self.fail_after is not None and self.asked >= self.fail_after:
                return JSONResponse({"error": "overloaded"}, status_code=503)
            self.asked += 1
            prompt = (await request.json())["messages"][0]["content"]
            passage = prompt.split('"""')[1]
            grade = 4 if " the " in passage else 0
            return {"choices": [{"message": {"role": "assistant", "content": f"Because.\nEducational score: {grade}"}}]}

        return app


def _write(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_quality_learns_the_teachers_grades_and_keeps_the_good(tmp_path):
    good, bad = _paragraphs(40), _spam(40)
    _write(tmp_path / "in", good + bad)
    teacher = GradingTeacher()
    with serving(teacher.app()) as url:
        recipe = {"tokenizer": "words", "steps": [{"quality": {
            "teacher": f"{url}/v1", "sample": 60, "features": "hashing", "threshold": 2.5}}]}
        result = curate(recipe, [tmp_path / "in"], tmp_path / "out", RunOptions(tasks=2), say=lambda _: None)
    assert teacher.asked == 60
    kept = _kept(tmp_path / "out")
    assert {r["text"] for r in kept} == set(good)
    assert all(r["metadata"]["edu_score"] >= 2.5 for r in kept)
    assert result.funnel[0]["removed"] == {"edu_score_below_cut": 40}


def test_a_teacher_that_goes_away_stops_the_run_and_a_rerun_asks_only_for_the_rest(tmp_path):
    _write(tmp_path / "in", _paragraphs(30) + _spam(30))
    teacher = GradingTeacher(fail_after=25)
    with serving(teacher.app()) as url:
        recipe = {"tokenizer": "words", "steps": [{"quality": {
            "teacher": f"{url}/v1", "sample": 50, "features": "hashing", "keep": 0.5,
            "teacher_retries": 1, "teacher_backoff_s": 0.01}}]}
        stopped = r"\(teacher grades a sample\) failed: the teacher .* did not answer after 2 tries \(last: HTTP 503\)"
        with pytest.raises(SlimlmError, match=stopped + ".*rerun the same command"):
            curate(recipe, [tmp_path / "in"], tmp_path / "out", RunOptions(tasks=1), say=lambda _: None)
        grades = tmp_path / ".out.work" / "steps" / "01-quality" / "grades.jsonl"
        assert len(grades.read_text().splitlines()) == 25  # what was graded is kept
        teacher.fail_after = None
        curate(recipe, [tmp_path / "in"], tmp_path / "out", RunOptions(tasks=1), say=lambda _: None)
    assert teacher.asked == 50  # 25 before, 25 after: nothing asked twice
    assert len(_kept(tmp_path / "out")) == 30  # keep: 0.5 of 60


def test_quality_needs_a_teacher_or_annotations_and_a_cut():
    from slimlm.curate import load_recipe

    with pytest.raises(SlimlmError, match="give a teacher"):
        load_recipe({"steps": ["quality"]})
    with pytest.raises(SlimlmError, match="either keep .* or a threshold"):
        load_recipe({"steps": [{"quality": {"teacher": "x", "keep": 0.1, "threshold": 3}}]})


def test_perplexity_matches_transformers_loss_and_keeps_the_lowest(tmp_path, tiny_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_models("llama")
    texts = _paragraphs(6)
    _write(tmp_path / "in", texts)
    settings = {"model": str(model_dir), "backend": "torch", "dtype": "float32", "max_tokens": 64, "keep": 0.5}
    recipe = {"tokenizer": "words", "steps": [{"perplexity": settings}]}
    result = curate(recipe, [tmp_path / "in"], tmp_path / "out", RunOptions(tasks=2), say=lambda _: None)
    kept = _kept(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = {}
    for text in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:64]])
        with torch.no_grad():
            expected[text] = math.exp(model(ids, labels=ids).loss.item())
    for r in kept:
        assert r["metadata"]["perplexity"] == pytest.approx(expected[r["text"]], rel=1e-3)
    lowest = sorted(texts, key=expected.get)[:3]
    assert {r["text"] for r in kept} == set(lowest)
    assert result.funnel[0]["removed"] == {"perplexity_above_cut": 3}
