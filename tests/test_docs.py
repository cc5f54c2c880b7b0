"""The README stays true: quick start, every verb shown, the matrix covering every family."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slimlm.cli import VERBS
from slimlm.models.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _matrix_module():
    spec = importlib.util.spec_from_file_location("update_matrix", ROOT / "scripts" / "update_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_start_is_the_two_commands():
    assert "make run" in README and "make test" in README


def test_every_verb_has_an_example():
    for verb in VERBS:
        assert f"slimlm {verb}" in README, verb


def test_matrix_renders_every_family():
    table = _matrix_module().render({"llama": {"load": "passed", "generate": "failed"}})
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == len(FAMILIES)
    assert "✅" in rows[0] and "❌" in rows[0]
    assert all(f"`{t}`" in table for t in FAMILIES)


def test_readme_matrix_lists_every_family():
    start, end = README.index("<!-- matrix:start -->"), README.index("<!-- matrix:end -->")
    matrix = README[start:end]
    for model_type in FAMILIES:
        assert f"`{model_type}`" in matrix, f"run `make matrix`: {model_type} missing"


def test_readme_task_file_example_is_the_shipped_file():
    shipped = (ROOT / "examples" / "tasks" / "sentiment.yaml").read_text()
    assert shipped in README, "README's task-file example differs from examples/tasks/sentiment.yaml"
