"""The one JSONL reader: every bad line is an error naming its file and line, or, with
skip_bad_lines, counted in the report (moved here from tests/eval/test_sources.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimlm.data import JsonlReport, read_jsonl
from slimlm.errors import SlimlmError


def jsonl(tmp_path: Path, *lines, name: str = "file.jsonl") -> Path:
    """Writes lines as given (strings) or as JSON (anything else)."""
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    path = jsonl(tmp_path, {"a": 1}, {"a": 2}, '{"a": 3', {"a": 4})
    with pytest.raises(SlimlmError) as info:
        read_jsonl(path)
    assert f"{path}:3" in str(info.value) and "file.jsonl:3" in str(info.value)
    assert "--skip-bad-lines" in str(info.value)


def test_skip_bad_lines_keeps_the_good_ones_and_reports(tmp_path):
    path = jsonl(tmp_path, {"a": 1}, {"a": 2}, '{"a": 3', {"a": 4})
    report = JsonlReport()
    assert read_jsonl(path, skip_bad_lines=True, report=report) == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert len(report.skipped) == 1 and f"{path}:3:" in report.skipped[0]


def test_missing_required_field_names_field_and_line(tmp_path):
    path = jsonl(tmp_path, {"question": "q", "answer": 1}, {"question": "q"})
    with pytest.raises(SlimlmError, match=r"file\.jsonl:2: missing field 'answer'"):
        read_jsonl(path, required=("question", "answer"))


def test_non_object_line(tmp_path):
    path = jsonl(tmp_path, {"a": 1}, "[1, 2]")
    with pytest.raises(SlimlmError, match=r"file\.jsonl:2: not a JSON object"):
        read_jsonl(path)


def test_blank_lines_are_ignored_but_counted(tmp_path):
    path = jsonl(tmp_path, {"a": 1}, "", "   ", {"a": 2})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    bad = jsonl(tmp_path, {"a": 1}, "", "oops", name="bad.jsonl")
    with pytest.raises(SlimlmError, match=r"bad\.jsonl:3:"):  # the line in the file, blank ones included
        read_jsonl(bad)


def test_all_bad_or_missing_file_is_an_error(tmp_path):
    path = jsonl(tmp_path, "oops", "[1]")
    with pytest.raises(SlimlmError, match="no usable records"):
        read_jsonl(path, skip_bad_lines=True)
    with pytest.raises(SlimlmError, match="no usable records"):
        read_jsonl(jsonl(tmp_path, "", name="empty.jsonl"))
    with pytest.raises(SlimlmError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_check_and_hint(tmp_path):
    """A caller's own check is reported like a parse error; a verb without --skip-bad-lines gives its own hint."""
    path = jsonl(tmp_path, {"n": 1}, {"n": -1})
    positive = lambda r: None if r["n"] > 0 else "'n' must be positive"  # noqa: E731
    with pytest.raises(SlimlmError) as info:
        read_jsonl(path, check=positive, hint="give positive numbers")
    assert str(info.value) == f"{path}:2: 'n' must be positive: give positive numbers"
    assert read_jsonl(path, check=positive, skip_bad_lines=True) == [{"n": 1}]
