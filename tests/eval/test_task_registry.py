"""A task kind is one class plus one registry line: a kind registered here, from the test module,
runs through the real `slimlm eval` command on a tiny model, its data is read before the model
is loaded, and it leaves the registry as it found it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimlm.errors import SlimlmError
from slimlm.eval.kinds import TASK_KIND_REGISTRY, TASK_KINDS, EvalOptions, TaskKind, register_task_kind
from slimlm.eval.result import EvalResult
from slimlm.eval.tasks import parse_task
from tests.conftest import run_cli

BUILT_IN = ["perplexity", "multiple_choice", "classification", "generation", "humaneval"]
README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


class TokenCount(TaskKind):
    """token_count:FILE: how many tokens the model's tokenizer makes of each line of FILE."""

    help = "token_count:FILE  tokens per line of FILE, by the model's tokenizer (a test kind)"

    def load(self, path: str, options: EvalOptions, report) -> list[str]:
        if not Path(path).is_file():
            raise SlimlmError(f"{path}: no such file")
        return Path(path).read_text(encoding="utf-8").splitlines()

    def run(self, path: str, lines: list[str], backend, options: EvalOptions) -> EvalResult:
        counts = [len(backend.tokenize(line)) for line in lines]
        return EvalResult(task=path, kind=self.name, model="", backend="", metrics={"tokens": sum(counts)},
                          primary="tokens", higher_is_better=False, examples=len(lines),
                          details=[{"index": i, "tokens": n} for i, n in enumerate(counts)])


@pytest.fixture
def token_count():
    """The test kind, registered for one test and removed after it."""
    register_task_kind("token_count")(TokenCount)
    yield TASK_KIND_REGISTRY["token_count"]
    TASK_KIND_REGISTRY.pop("token_count")


def test_the_built_in_kinds_are_registered_in_order():
    assert list(TASK_KINDS) == BUILT_IN
    assert {name for name, kind in TASK_KIND_REGISTRY.items() if kind.needs_loglik} == {
        "perplexity", "multiple_choice", "classification"}


def test_readme_shows_every_built_in_kind():
    for name in BUILT_IN:
        usage = TASK_KINDS[name].split()[0]  # e.g. "perplexity:SOURCE"
        assert f"| `{usage}` |" in README, f"README.md's task table has no row for `{usage}`"


def test_a_registered_kind_runs_through_the_cli(capfd, token_count, tiny_models, tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_models("llama")
    text = tmp_path / "lines.txt"
    lines = ["The quick brown fox.", "def f(x): return x * 2", "ünïcödé and emoji 🙂"]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run_cli(capfd, "eval", folder, "--task", f"token_count:{text}", "--no-systems", "--json")
    assert code == 0, err
    data = json.loads(out)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = sum(len(tokenizer(line)["input_ids"]) for line in lines)
    assert (data["kind"], data["examples"], data["metrics"]["tokens"]) == ("token_count", 3, expected)
    assert data["primary"] == "tokens" and isinstance(data["params"]["run_id"], int)


def test_a_registered_kind_reads_its_data_before_the_model(capfd, token_count, tmp_path):
    missing = tmp_path / "absent.txt"
    code, out, err = run_cli(capfd, "eval", tmp_path / "no-such-model", "--task", f"token_count:{missing}")
    assert code != 0 and out == ""
    assert "no such file" in err and str(missing) in err  # not the missing model


def test_registration_and_removal(token_count):
    assert list(TASK_KINDS)[-1] == "token_count" and TASK_KINDS["token_count"] == TokenCount.help
    assert parse_task("token_count:x.txt") == ("token_count", "x.txt")
    with pytest.raises(SlimlmError, match="unknown task"):
        parse_task("token_count")  # it takes an argument
    with pytest.raises(ValueError, match="already registered"):
        register_task_kind("perplexity")(TokenCount)  # a built-in is not replaced by accident

    class NoHelp(TaskKind):
        pass

    with pytest.raises(ValueError, match="help"):
        register_task_kind("no_help")(NoHelp)
    assert "no_help" not in TASK_KINDS


def test_the_test_kind_is_gone_after_its_test():
    assert "token_count" not in TASK_KINDS
    with pytest.raises(SlimlmError, match="unknown task"):
        parse_task("token_count:x.txt")


def test_eval_help_lists_every_registered_kind(capfd, token_count):
    code, out, _ = run_cli(capfd, "eval", "--help")
    text = " ".join(out.replace("│", " ").split())  # help is wrapped to the terminal width, in a box
    assert code == 0
    assert "What to measure" in text
    assert list(TASK_KINDS) == [*BUILT_IN, "token_count"]  # the help is read when the CLI runs
    for name in TASK_KINDS:
        assert name in text, name
