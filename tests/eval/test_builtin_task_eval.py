"""A built-in task set as `slimlm eval` meets it: `multiple_choice:pydoc` resolves to the file
that ships in the package, `--help` lists it, `multiple_choice:FILE.jsonl` still reads a file,
and the real CLI scores the task on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimlm.data import BUILTIN_TASKS, read_jsonl
from slimlm.errors import SlimlmError
from slimlm.eval.tasks import builtin_task_help, parse_task
from tests.conftest import run_cli

SHIPPED = BUILTIN_TASKS["pydoc"].path


def test_builtin_name_resolves_to_the_shipped_file():
    kind, spec = parse_task("multiple_choice:pydoc")
    assert kind == "multiple_choice"
    assert spec.name == "pydoc" and spec.data == SHIPPED
    assert spec.template == "Question: {question}\nAnswer:"  # the kind's default prompt


def test_a_file_path_still_reads_the_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "Q?", "choices": ["a", "b"], "answer": 0}\n', encoding="utf-8")
    kind, spec = parse_task(f"multiple_choice:{path}")
    assert kind == "multiple_choice" and spec.data == path and spec.name == "mine"


def test_builtin_name_of_another_kind_is_not_resolved():
    _, spec = parse_task("classification:pydoc")
    assert spec.data.name == "pydoc" and spec.data != SHIPPED  # a path, which does not exist


def test_unknown_task_error_names_the_builtin_tasks():
    with pytest.raises(SlimlmError, match=r"built-in task \(multiple_choice:pydoc\)"):
        parse_task("nonsense:thing")


def test_help_lists_the_builtin_tasks(capfd, monkeypatch):
    from slimlm.cli.eval import _task_help

    assert "multiple_choice:pydoc" in builtin_task_help() and "multiple_choice:pydoc" in _task_help()
    monkeypatch.setenv("COLUMNS", "400")  # one line per option, so the name is not wrapped
    code, out, err = run_cli(capfd, "eval", "--help")
    assert code == 0, err
    assert "Built-in task sets: multiple_choice:pydoc" in out


def test_eval_cli_scores_20_builtin_questions(capfd, tiny_models, tmp_path):
    details = tmp_path / "details.jsonl"
    code, out, err = run_cli(capfd, "eval", tiny_models("llama"), "--task", "multiple_choice:pydoc",
                             "--limit", 20, "--no-systems", "--details", details, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["kind"] == "multiple_choice" and data["examples"] == 20
    acc = data["metrics"]["acc"]
    assert 0 <= acc <= 1 and 0 <= data["metrics"]["acc_norm"] <= 1
    rows = read_jsonl(details)
    assert len(rows) == 20
    shipped = read_jsonl(SHIPPED)[:20]  # --limit keeps the first 20 questions of the file
    assert [r["answer"] for r in rows] == [r["answer"] for r in shipped]
    assert all(len(r["loglik"]) == 4 for r in rows)
    assert acc == pytest.approx(np.mean([r["predicted"] == r["answer"] for r in rows]))
