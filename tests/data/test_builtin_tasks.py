"""The built-in task sets (slimlm/data/builtin_tasks.py): the shipped pydoc multiple-choice file
is well formed and big enough to separate models, and its builder follows its documented rules
and reproduces the shipped file on the Python that built it."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from slimlm.data import BUILTIN_TASKS, builtin_task, read_jsonl
from slimlm.data.builtin_tasks import PYDOC_BUILT_WITH, build_pydoc_mc, build_pydoc_mc_isolated, dumps_jsonl

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = BUILTIN_TASKS["pydoc"].path
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
same_python = pytest.mark.skipif(THIS_PYTHON != PYDOC_BUILT_WITH,
                                 reason=f"the shipped file was built with Python {PYDOC_BUILT_WITH}; "
                                        f"the standard library of {THIS_PYTHON} differs")


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    return read_jsonl(SHIPPED, required=("question", "choices", "answer"))


def test_the_shipped_file_is_in_the_package_and_named():
    assert SHIPPED.is_file() and SHIPPED.parent.name == "tasks"
    assert builtin_task("multiple_choice", "pydoc") is BUILTIN_TASKS["pydoc"]
    assert builtin_task("classification", "pydoc") is None  # a name belongs to one kind
    assert builtin_task("multiple_choice", "no-such-task") is None
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"data/tasks/*.jsonl"' in pyproject  # installed with the package, not only in a checkout


def test_shipped_items_are_well_formed(shipped):
    assert len(shipped) >= 300
    for r in shipped:
        choices, answer = r["choices"], r["answer"]
        assert len(choices) == 4 and len(set(choices)) == 4, r
        assert all(isinstance(c, str) and c for c in choices), r
        assert isinstance(answer, int) and 0 <= answer < 4, r
        assert choices[answer] == r["name"], r
        assert f"`{r['module']}`" in r["question"] and f" {r['type']} " in r["question"]
    questions = [r["question"] for r in shipped]
    assert len(set(questions)) == len(questions)  # no duplicates


def test_no_question_contains_its_answer(shipped):
    for r in shipped:
        name = r["choices"][r["answer"]]
        assert not _mentions(r["question"], name), r
        for choice in r["choices"]:  # nor a distractor: a name in the question would be a hint either way
            assert not _mentions(r["question"], choice), (choice, r)


def test_answers_and_modules_are_spread(shipped):
    positions = Counter(r["answer"] for r in shipped)
    assert set(positions) == {0, 1, 2, 3}
    assert min(positions.values()) >= 0.15 * len(shipped)  # the shuffle is not stuck on one slot
    modules = Counter(r["module"] for r in shipped)
    assert len(modules) >= 40
    assert max(modules.values()) <= 12  # PER_MODULE: no module dominates
    types_ = Counter(r["type"] for r in shipped)
    assert types_["function"] > 0 and types_["class"] > 0


def test_builder_is_deterministic():
    first, second = build_pydoc_mc(), build_pydoc_mc()  # in this process, whatever it imported
    assert first == second and len(first) >= 300
    isolated = build_pydoc_mc_isolated()  # a fresh interpreter without site-packages, as the script builds
    assert isolated == build_pydoc_mc_isolated()
    assert len(isolated) >= 300


@same_python
def test_builder_reproduces_the_shipped_file():
    assert dumps_jsonl(build_pydoc_mc_isolated()) == SHIPPED.read_text(encoding="utf-8")


@same_python
def test_build_script_check_passes_in_a_fresh_interpreter():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_builtin_tasks.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to date" in done.stdout


def _fn(name: str, doc: str):
    def f():
        pass
    f.__name__ = f.__qualname__ = name
    f.__doc__ = doc
    f.__module__ = "fakemod"
    return f


def test_builder_rules_on_a_module_of_its_own(monkeypatch):
    """The filters of the module docstring, one object each, on a module built here."""
    mod = types.ModuleType("fakemod")
    good = {
        "alpha": "Return the first letter of the Greek alphabet as a string.",
        "bravo": "bravo(x, y) -> int\n\nCount the ``sheep`` in :func:`pasture` before sunset today.",
        "charlie": "Open the gate of the north paddock slowly.\n\nMore text here.",
        "delta": "Compute the mean depth of the river mouth sediment.",
        "echo_back": "Repeat what the caller said, loudly and twice over.",
    }
    bad = {
        "foxtrot": "Dance the foxtrot with a partner of your choosing.",  # names itself
        "golf": "Too short.",  # under 4 words / 20 characters
        "hotel": "Shared words between two different functions here.",  # shared with india
        "india": "Shared words between two different functions here.",
        "juliet_romeo": "Make juliet romeo happen in the final act again.",  # the name, spaced out
        "kilo": "",  # no docstring
        "_private": "A private helper that nobody should ever see.",
        "lima": "Call fakemod from the outside world in a hurry.",  # names the module
    }
    for name, doc in {**good, **bad}.items():
        setattr(mod, name, _fn(name, doc or None))
    mod.alias_of_alpha = mod.alpha  # one object, two names: both left out
    monkeypatch.setitem(sys.modules, "fakemod", mod)

    records = build_pydoc_mc(modules=("fakemod",))
    # alpha is dropped with its alias, so 4 good questions remain
    assert sorted(r["name"] for r in records) == ["bravo", "charlie", "delta", "echo_back"]
    by_name = {r["name"]: r for r in records}
    assert '"Count the sheep in pasture before sunset today."' in by_name["bravo"]["question"]
    assert '"Open the gate of the north paddock slowly."' in by_name["charlie"]["question"]
    for r in records:
        assert len(set(r["choices"])) == 4 and r["choices"][r["answer"]] == r["name"]
        assert "_private" not in r["choices"] and "alias_of_alpha" not in r["choices"]
    assert build_pydoc_mc(modules=("fakemod",)) == records
    assert build_pydoc_mc(modules=("fakemod",), seed=17) != records  # the seed drives the draw
    assert build_pydoc_mc(modules=("fakemod", "no_such_module_here")) == records  # import failures are skipped
