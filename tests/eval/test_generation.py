"""Generation tasks end to end: greedy answers on a tiny model, scored against references."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from slimlm.eval.generation import run_generation
from slimlm.eval.prompts import load_examples
from slimlm.eval.scorers import normalize, token_f1
from slimlm.eval.tasks import TaskSpec
from slimlm.models.backends import GenerationParams, open_backend

PROMPTS = ["The keyword def", "Exceptions are raised when", "A for loop"]
WRONG = "xyzzy plugh"


def write_task(tmp_path, records, **kwargs) -> TaskSpec:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return TaskSpec(name="gen", kind="generation", data=path, **kwargs)


def test_generation_scores_greedy_answers(tiny_models, tmp_path):
    backend = open_backend(str(tiny_models("llama")), "torch")
    params = GenerationParams(max_tokens=8, temperature=0, stop=["\n\n"])
    outputs = [backend.generate(prompt, params, raw=True).text for prompt in PROMPTS]
    assert normalize(outputs[2]) != normalize(WRONG)
    references = [outputs[0].strip(), outputs[1].strip(), WRONG]
    spec = write_task(tmp_path, [{"prompt": p, "reference": r} for p, r in zip(PROMPTS, references)],
                      scorers=["exact_match", "token_f1"], max_tokens=8, chat=False)
    result = run_generation(backend, spec, load_examples(spec), chat=False)

    assert result.kind == "generation" and result.primary == "exact_match" and result.examples == 3
    assert result.score == pytest.approx(2 / 3)
    for i, row in enumerate(result.details):
        assert row["index"] == i and row["output"] == outputs[i]
        assert row["answer"] == outputs[i].strip() and row["references"] == [references[i]]
        assert row["exact_match"] == (1.0 if i < 2 else 0.0)
        assert row["token_f1"] == pytest.approx(token_f1(outputs[i].strip(), references[i]))
    expected_f1 = sum(token_f1(o.strip(), r) for o, r in zip(outputs, references)) / 3
    assert result.metrics["token_f1"] == pytest.approx(expected_f1)
    assert result.metrics["generated_tokens"] > 0


class ScriptedBackend:
    """Answers each prompt with a fixed text, and remembers what it was asked."""

    name = label = "scripted"  # label: what Backend.label gives results and records
    chat_template = None

    def __init__(self, answers: dict[str, str] | None = None):
        self.answers, self.prompts = answers or {}, []

    def generate(self, prompt, params, raw=False):
        self.prompts.append(prompt)
        return SimpleNamespace(text=self.answers.get(prompt, "x"), timings=SimpleNamespace(generated_tokens=3))


def test_extract_picks_the_answer_before_scoring(tmp_path):
    backend = ScriptedBackend({"2+3?": " I think the answer is 5, not 15.", "7+6?": "It is 31.", "1+1?": "two"})
    records = [{"prompt": "2+3?", "reference": "5"}, {"prompt": "7+6?", "references": ["12", "13"]},
               {"prompt": "1+1?", "reference": "2"}]
    spec = write_task(tmp_path, records, extract=r"(\d+)", scorers=["exact_match", "contains"])
    result = run_generation(backend, spec, load_examples(spec))
    assert [row["answer"] for row in result.details] == ["5", "31", ""]
    assert [row["exact_match"] for row in result.details] == [1.0, 0.0, 0.0]
    assert result.score == pytest.approx(1 / 3)
    assert backend.prompts == ["2+3?", "7+6?", "1+1?"]
    assert result.params["extract"] == r"(\d+)"


def test_shots_use_the_first_reference(tmp_path):
    backend = ScriptedBackend()
    records = [{"prompt": f"q{i}", "references": [f"a{i}", "other"]} for i in range(3)]
    spec = write_task(tmp_path, records, template="Q: {prompt}\nA:")
    run_generation(backend, spec, load_examples(spec), shots=1, seed=4)
    for i, prompt in enumerate(backend.prompts):
        shot, question = prompt.split("\n\n")
        assert question == f"Q: q{i}\nA:"
        j = int(shot.split("\n")[0].removeprefix("Q: q"))
        assert j != i and shot == f"Q: q{j}\nA: a{j}"
