"""Text corpora: the built-in python-docs, text files, folders and a JSONL field (the
text_documents tests moved here from tests/eval/test_sources.py)."""

from __future__ import annotations

import json

import pytest

from slimlm.data import read_records, text_documents
from slimlm.errors import SlimlmError


def test_builtin_corpus():
    docs = text_documents("python-docs")
    assert len(docs) >= 50 and all(doc.strip() for doc in docs)
    assert docs == text_documents("python-docs")  # a fixed order


def test_text_and_jsonl_documents(tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("line one\n\nline two\n")
    assert text_documents(str(txt)) == ["line one\n\nline two\n"]
    path = tmp_path / "file.jsonl"
    path.write_text("".join(json.dumps({"body": b}) + "\n" for b in ("first", "second", "  ", "third")))
    assert text_documents(str(path), field_name="body") == ["first", "second", "third"]
    with pytest.raises(SlimlmError, match=r"file\.jsonl:1: missing field 'text'"):
        text_documents(str(path))  # the default field


def test_unknown_text_source_names_the_builtin_corpora(tmp_path):
    with pytest.raises(SlimlmError, match="python-docs"):
        text_documents(str(tmp_path / "nope.txt"))


def test_a_folder_is_one_document_per_text_file_in_path_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")  # not text: left out
    assert text_documents(str(tmp_path)) == ["first", "second", "third"]
    assert read_records(tmp_path) == ["first", "second", "third"]  # training reads a folder the same way
    (tmp_path / "none").mkdir()
    with pytest.raises(SlimlmError, match="no text in the folder"):
        text_documents(str(tmp_path / "none"))
