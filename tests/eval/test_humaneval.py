"""HumanEval: program building, scoring and the task run end to end on real backends."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from slimlm.errors import SlimlmError
from slimlm.eval.humaneval import (
    build_chat_program,
    build_program,
    extract_code,
    load_problems,
    pass_at_k,
    run_humaneval,
)
from slimlm.eval.sandbox import run_many
from slimlm.models.backends import open_backend
from slimlm.models.backends.base import Backend, GenerationParams


def _formula(n: int, c: int, k: int) -> float:
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(("n", "c", "k"), [(10, 3, 1), (5, 0, 1), (5, 5, 1), (5, 5, 3), (10, 2, 5), (20, 1, 10)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k([n], [c], k) == pytest.approx(_formula(n, c, k), abs=1e-12)


def test_pass_at_k_known_values_and_mean_over_problems():
    assert pass_at_k([10], [3], 1) == pytest.approx(0.3)
    assert pass_at_k([5], [0], 1) == 0.0
    assert pass_at_k([5], [5], 1) == 1.0
    assert pass_at_k([10, 10], [3, 0], 1) == pytest.approx(0.15)


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


def test_the_bundled_problems_are_all_there(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"


def test_canonical_solutions_pass(problems):
    results = run_many([build_program(p, p["canonical_solution"]) for p in problems[:5]])
    assert [r.status for r in results] == ["passed"] * 5


def test_a_wrong_completion_fails(problems):
    [result] = run_many([build_program(problems[0], "    return not True\n")])
    assert result.status == "failed" and "AssertionError" in result.detail


def test_a_completion_that_never_ends_is_stopped_and_scored_failed(problems):
    [result] = run_many([build_program(problems[0], "    while True:\n        pass\n")], timeout_s=1.5)
    assert result.status == "timeout" and not result.passed


def test_a_chat_reply_with_the_whole_function_keeps_the_prompts_helpers(problems):
    problem = next(p for p in problems if p["task_id"] == "HumanEval/10")  # make_palindrome uses is_palindrome
    start = problem["prompt"].index("def make_palindrome")
    reply = ("Sure! Here it is:\n```python\n" + problem["prompt"][start:] + problem["canonical_solution"]
             + "```\nThis finds the longest palindromic suffix.")
    assert run_many([build_chat_program(problem, reply)])[0].passed
    wrong = reply.replace("return string + string[:beginning_of_suffix][::-1]", "return string")
    assert wrong != reply and not run_many([build_chat_program(problem, wrong)])[0].passed


def test_extract_code_prefers_the_block_with_the_entry_point_and_takes_unclosed_blocks():
    reply = "```\npip install x\n```\nthen\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(reply, "f") == "def f(x):\n    return x\n"
    assert extract_code("```python\ndef f(x):\n    return", "f") == "def f(x):\n    return"
    assert extract_code("def f(x): return x", "f") == "def f(x): return x"


class _ScriptedBackend(Backend):
    """A stand-in model that answers each prompt with the canonical solution when the sample's
    seed is even and with a wrong one when it is odd, so the right scores are known exactly."""

    name = "scripted"

    def __init__(self, problems: list[dict]) -> None:
        super().__init__()
        self.solutions = {p["prompt"]: p["canonical_solution"] for p in problems}
        self.params_seen: list[GenerationParams] = []
        self._text = ""

    @property
    def chat_template(self) -> str | None:
        return None

    def render_chat(self, messages) -> str:
        raise AssertionError("raw mode must not use the chat template")

    def tokenize(self, text: str) -> list[int]:
        self._text = text
        return [0]

    def _stream_tokens(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[str]:
        self.params_seen.append(params)
        answer = self.solutions[self._text] if params.seed % 2 == 0 else "    return None\n"
        yield from (answer + "\n\ndef unrelated():\n    pass\n").splitlines(keepends=True)


def test_scores_and_sampling_settings_on_a_scripted_model(problems):
    backend = _ScriptedBackend(problems)
    result = run_humaneval(backend, limit=3, samples=2, ks=(1, 2, 10))
    assert result.metrics == {"pass@1": 0.5, "pass@2": 1.0, "problems": 3}
    assert [d["correct"] for d in result.details] == [1, 1, 1]
    assert [p.seed for p in backend.params_seen] == [0, 1] * 3
    assert {p.temperature for p in backend.params_seen} == {0.8}
    assert "def unrelated" not in result.details[0]["completion"]  # cut at the Codex stop sequences

    greedy = run_humaneval(_ScriptedBackend(problems), limit=2)
    assert greedy.metrics == {"pass@1": 1.0, "problems": 2}
    assert greedy.params["temperature"] == 0.0


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    backend = open_backend(str(tiny_models("llama")), "torch")
    yield backend
    backend.close()


def test_a_random_model_scores_zero(tiny_llama):
    result = run_humaneval(tiny_llama, limit=2, max_tokens=24)
    assert result.kind == "humaneval" and result.task == "humaneval" and result.primary == "pass@1"
    assert result.higher_is_better and result.examples == 2
    assert result.metrics == {"pass@1": 0.0, "problems": 2}
    assert [d["task_id"] for d in result.details] == ["HumanEval/0", "HumanEval/1"]
    assert all(d["n"] == 1 and d["correct"] == 0 and len(d["statuses"]) == 1 for d in result.details)
    assert result.backend == "torch"


def test_several_samples_give_pass_at_1_but_no_pass_at_10(tiny_llama):
    result = run_humaneval(tiny_llama, limit=1, samples=2, max_tokens=8)
    assert set(result.metrics) == {"pass@1", "problems"}
    assert result.details[0]["n"] == 2 and len(result.details[0]["statuses"]) == 2


def test_chat_mode_runs_with_a_chat_template(tiny_llama):
    result = run_humaneval(tiny_llama, limit=1, chat=True, max_tokens=8)
    assert result.metrics["pass@1"] == 0.0 and result.params["chat"] is True


def test_chat_mode_without_a_chat_template_is_refused(tiny_llama):
    saved = tiny_llama.tokenizer.chat_template
    tiny_llama.tokenizer.chat_template = None
    try:
        with pytest.raises(SlimlmError, match="no chat template"):
            run_humaneval(tiny_llama, limit=1, chat=True)
    finally:
        tiny_llama.tokenizer.chat_template = saved


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shots": 1}, "zero-shot"),
    ({"limit": 0}, "--limit"),
    ({"samples": 0}, "--samples"),
    ({"ks": (0,)}, "pass@k"),
])
def test_bad_arguments_are_refused(tiny_llama, kwargs, message):
    with pytest.raises(SlimlmError, match=message):
        run_humaneval(tiny_llama, **kwargs)
