"""Training records and prompt rows: each shape is read, and a bad line names its file and line
(the bad-line cases moved here from tests/train/test_data.py, where they went through load_data)."""

from __future__ import annotations

import json

import pytest

from slimlm.data import read_prompts, read_records
from slimlm.errors import SlimlmError

CHAT = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_three_shapes(tmp_path):
    rows = [{"messages": CHAT}, {"prompt": "Q", "completion": "A"}, {"text": "plain"}]
    assert read_records(write_jsonl(tmp_path / "mix.jsonl", rows)) == [
        CHAT, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "plain"]
    (tmp_path / "book.txt").write_text("Once upon a time.")
    assert read_records(tmp_path / "book.txt") == ["Once upon a time."]
    assert read_records("python-docs")[0].strip()


@pytest.mark.parametrize("rows, fragment", [
    (["{\"prompt\": \"a\", \"completion\": \"b\"}", "{not json"], "bad.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "bad.jsonl:2: missing field 'completion'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "bad.jsonl:1: no assistant message"),
    ([{"question": "a"}], "bad.jsonl:1: needs 'messages', or 'prompt' and 'completion', or 'text'"),
    ([{"messages": [{"role": "user"}]}], "bad.jsonl:1: every message needs a string 'role' and 'content'"),
])
def test_bad_lines_name_file_and_line(tmp_path, rows, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SlimlmError) as info:
        read_records(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_prompt_rows(tmp_path):
    rows = [{"prompt": "hello", "reference": "hi"}, {"prompt": "2+2?"}]
    assert read_prompts(write_jsonl(tmp_path / "p.jsonl", rows)) == rows
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(SlimlmError, match=r"bad\.jsonl:2: has no \"prompt\" text"):
        read_prompts(bad)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "  "}])
    with pytest.raises(SlimlmError, match=r"blank\.jsonl:1: has no \"prompt\""):
        read_prompts(blank)
    with pytest.raises(SlimlmError, match="no such file"):
        read_prompts(tmp_path / "absent.jsonl")
