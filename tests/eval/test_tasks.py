"""Task files and task strings: shipped examples load, mistakes are errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimlm.data import JsonlReport
from slimlm.errors import SlimlmError
from slimlm.eval.prompts import load_examples
from slimlm.eval.tasks import TASK_KINDS, TaskSpec, load_task_file, parse_task

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "examples" / "tasks").glob("*.y*ml"))


def test_there_are_shipped_tasks():
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_task_loads_and_all_records_validate(path):
    spec = load_task_file(path)
    assert spec.source == path and spec.data.is_file()
    lines = [line for line in spec.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    report = JsonlReport()
    records = load_examples(spec, skip_bad_lines=True, report=report)
    assert report.skipped == []
    assert len(records) == len(lines)
    assert load_examples(spec) == records  # strict mode agrees


def write(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BAD_TASK_FILES = {
    "unknown-key": ("kind: generation\ndata: d.jsonl\ntemplte: '{prompt}'\n", "unknown key 'templte'"),
    "no-kind": ("data: d.jsonl\n", "missing key 'kind'"),
    "no-data": ("kind: generation\n", "missing key 'data'"),
    "bad-yaml": ("kind: generation\ndata: [d.jsonl\n", "not valid YAML"),
    "unknown-kind": ("kind: summarisation\ndata: d.jsonl\n", "unknown kind 'summarisation'"),
    "unknown-scorer": ("kind: generation\ndata: d.jsonl\nscorers: [exact_match, bleu]\n", "unknown scorer 'bleu'"),
    "a-list": ("- kind: generation\n- data: d.jsonl\n", "YAML mapping"),
    "empty": ("", "YAML mapping"),
    "bad-template": ("kind: generation\ndata: d.jsonl\ntemplate: '{unclosed'\n", "template"),
    "no-scorers": ("kind: generation\ndata: d.jsonl\nscorers: []\n", "scorers"),
    "one-label": ("kind: classification\ndata: d.jsonl\nlabels: [yes]\n", "labels"),
    "negative-shots": ("kind: generation\ndata: d.jsonl\nshots: -1\n", "shots"),
    "data-not-a-path": ("kind: generation\ndata: 5\n", "data"),
    "labels-not-a-list": ("kind: classification\ndata: d.jsonl\nlabels: 5\n", "labels"),
    "bad-extract-regex": ("kind: generation\ndata: d.jsonl\nextract: '(unclosed'\n", "extract"),
}


@pytest.mark.parametrize("text, problem", BAD_TASK_FILES.values(), ids=BAD_TASK_FILES.keys())
def test_bad_task_file_is_an_error_naming_the_file(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(SlimlmError) as info:
        load_task_file(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_missing_task_file(tmp_path):
    with pytest.raises(SlimlmError, match="no such task file"):
        load_task_file(tmp_path / "absent.yaml")


def test_relative_data_resolves_against_the_task_file(tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    folder.mkdir()
    write(folder, "kind: generation\ndata: sub/d.jsonl\n")
    monkeypatch.chdir(tmp_path)  # not the task file's folder
    spec = load_task_file(Path("tasks") / "task.yaml")
    assert spec.data.resolve() == (folder / "sub" / "d.jsonl").resolve()
    assert spec.name == "task" and spec.template == "{prompt}"
    absolute = write(folder, f"kind: generation\ndata: {tmp_path / 'abs.jsonl'}\n", "abs.yaml")
    assert load_task_file(absolute).data == tmp_path / "abs.jsonl"


def test_parse_task_strings():
    assert parse_task("humaneval") == ("humaneval", None)
    assert parse_task("perplexity:python-docs") == ("perplexity", "python-docs")
    kind, spec = parse_task("multiple_choice:x.jsonl")
    assert kind == "multiple_choice" and isinstance(spec, TaskSpec)
    assert (spec.name, spec.data, spec.template) == ("x", Path("x.jsonl"), "Question: {question}\nAnswer:")
    assert parse_task("classification:y.jsonl")[1].template == "{text}\nLabel:"
    assert parse_task("generation:z.jsonl")[1].scorers == ["exact_match"]


def test_parse_task_yaml_path():
    path = ROOT / "examples" / "tasks" / "capitals.yaml"
    kind, spec = parse_task(str(path))
    assert kind == "multiple_choice" and spec.source == path and spec.name == "capitals"


@pytest.mark.parametrize("task", ["mmlu", "perplexity", "perplexity:", "generation:", "translation:x.jsonl",
                                  "humaneval:x"])
def test_parse_task_unknown(task):
    with pytest.raises(SlimlmError, match="unknown task"):
        parse_task(task)


def test_task_kinds():
    assert set(TASK_KINDS) == {"perplexity", "multiple_choice", "classification", "generation", "humaneval"}
    assert all(description.strip() for description in TASK_KINDS.values())
