"""Evaluation examples (each task kind's checks on its JSONL records) and the prompts built from them.
The readers themselves (JSONL, text, the built-in corpus) are tested in tests/data/."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from slimlm.errors import SlimlmError
from slimlm.eval.prompts import build_prompt, load_examples, pick_shots
from slimlm.eval.tasks import TaskSpec
from slimlm.models.backends import open_backend


def jsonl(tmp_path: Path, *lines, name: str = "file.jsonl") -> Path:
    """Writes lines as given (strings) or as JSON (anything else)."""
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- load_examples: per-kind checks ---------------------------------------------------------

def spec_for(kind: str, data: Path, **kwargs) -> TaskSpec:
    return TaskSpec(name="t", kind=kind, data=data, **kwargs)


@pytest.mark.parametrize("bad, problem", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer'"),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, "'answer'"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "'answer'"),
    ({"question": "q", "choices": "ab", "answer": 0}, "'choices'"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "'choices'"),
    ({"question": "q", "answer": 0}, "missing field 'choices'"),
])
def test_multiple_choice_records_are_checked(tmp_path, bad, problem):
    good = {"question": "q", "choices": ["a", "b"], "answer": 1}
    spec = spec_for("multiple_choice", jsonl(tmp_path, good, bad))
    with pytest.raises(SlimlmError, match=r"file\.jsonl:2: " + problem):
        load_examples(spec)
    assert load_examples(spec, skip_bad_lines=True) == [good]


def test_classification_label_must_be_a_task_label(tmp_path):
    path = jsonl(tmp_path, {"text": "t", "label": "pos"}, {"text": "t", "label": "meh"})
    with pytest.raises(SlimlmError, match=r"file\.jsonl:2: label 'meh'"):
        load_examples(spec_for("classification", path, labels=["pos", "neg"]))
    assert len(load_examples(spec_for("classification", path))) == 2  # no labels given: any label


def test_generation_needs_a_reference(tmp_path):
    path = jsonl(tmp_path, {"prompt": "p", "reference": "r"}, {"prompt": "p", "references": ["r", "s"]},
                 {"prompt": "p"})
    with pytest.raises(SlimlmError, match=r"file\.jsonl:3: missing field 'reference'"):
        load_examples(spec_for("generation", path))
    empty = jsonl(tmp_path, {"prompt": "p", "references": []}, name="empty.jsonl")
    with pytest.raises(SlimlmError, match=r"empty\.jsonl:1: 'references' is empty"):
        load_examples(spec_for("generation", empty))


def test_template_fields_are_required(tmp_path):
    path = jsonl(tmp_path, {"prompt": "p", "reference": "r"})
    with pytest.raises(SlimlmError, match=r"file\.jsonl:1: missing field 'context'"):
        load_examples(spec_for("generation", path, template="{context}\n{prompt}"))


# --- few-shot examples and prompts ------------------------------------------------------------

def test_pick_shots():
    records = [{"i": i} for i in range(10)]
    for index in range(10):
        for seed in range(5):
            shots = pick_shots(records, index, 3, seed)
            assert shots == pick_shots(records, index, 3, seed)
            assert len(shots) == 3 and len({s["i"] for s in shots}) == 3
            assert records[index] not in shots
    assert len({tuple(s["i"] for s in pick_shots(records, 0, 3, seed)) for seed in range(5)}) > 1
    assert pick_shots(records, 0, 0, 0) == []
    assert len(pick_shots(records, 0, 9, 0)) == 9
    with pytest.raises(SlimlmError, match="--shots 10"):
        pick_shots(records, 0, 10, 0)


SHOTS = [({"prompt": "1+1"}, "2"), ({"prompt": "2+2"}, "4")]


def test_raw_prompt_has_description_then_shots_then_question():
    spec = spec_for("generation", Path("x.jsonl"), template="Q: {prompt}\nA:", description="Add.")
    prompt = build_prompt(spec, None, {"prompt": "3+3"}, SHOTS, chat=False)
    assert prompt == "Add.\n\nQ: 1+1\nA: 2\n\nQ: 2+2\nA: 4\n\nQ: 3+3\nA:"
    assert build_prompt(spec_for("generation", Path("x.jsonl")), None, {"prompt": "3+3"}, [], chat=False) == "3+3"


def test_chat_prompt_uses_the_chat_template(tiny_models):
    backend = open_backend(str(tiny_models("llama")), "torch")
    spec = spec_for("generation", Path("x.jsonl"), template="Q: {prompt}", description="Add.")
    prompt = build_prompt(spec, backend, {"prompt": "3+3"}, SHOTS, chat=True)
    turns = [("system", "Add."), ("user", "Q: 1+1"), ("assistant", "2"), ("user", "Q: 2+2"), ("assistant", "4"),
             ("user", "Q: 3+3")]
    expected = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"
    assert prompt == expected


def test_chat_prompt_needs_a_chat_template():
    backend = SimpleNamespace(chat_template=None, render_chat=lambda messages: "should not be called")
    spec = spec_for("generation", Path("x.jsonl"))
    with pytest.raises(SlimlmError, match="no chat template"):
        build_prompt(spec, backend, {"prompt": "hi"}, [], chat=True)
