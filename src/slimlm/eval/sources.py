"""Where evaluation data comes from: text files, JSONL files and the built-in corpus.

Everything is local. The built-in corpus `python-docs` is the prose of Python's own reference
documentation (`pydoc_data.topics`), which every Python install carries, so a perplexity number
can be reproduced on any machine without fetching a data set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError

BUILTIN_CORPORA = {"python-docs": "the English prose of Python's reference documentation (pydoc_data.topics)"}


def python_docs() -> list[str]:
    """One document per reference topic, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


@dataclass
class JsonlReport:
    """Lines skipped with --skip-bad-lines, so the result can say how many were dropped."""

    skipped: list[str] = field(default_factory=list)


def read_jsonl(path: Path, required: tuple[str, ...] = (), skip_bad_lines: bool = False,
               report: JsonlReport | None = None, check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """Records of a JSONL file. A malformed line, a record missing a required field, or one that
    `check` finds a problem with is an error naming the file and line, unless `skip_bad_lines`
    is set (then it is counted in `report`)."""
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"{path}: no such file: give the path to a JSONL file")
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            problem = None
            try:
                record = json.loads(line)
            except ValueError as exc:
                problem = f"not valid JSON ({exc.msg})"
            else:
                if not isinstance(record, dict):
                    problem = "not a JSON object"
                else:
                    missing = [f for f in required if f not in record]
                    if missing:
                        problem = f"missing field '{missing[0]}'"
                    elif check is not None:
                        problem = check(record)
            if problem:
                where = f"{path}:{number}: {problem}"
                if not skip_bad_lines:
                    raise SlimlmError(f"{where}: fix the line, or pass --skip-bad-lines to skip it")
                if report is not None:
                    report.skipped.append(where)
                continue
            records.append(record)
    if not records:
        raise SlimlmError(f"{path}: no usable records: the file is empty or every line was skipped")
    return records


def text_documents(source: str, field_name: str | None = None, skip_bad_lines: bool = False,
                   report: JsonlReport | None = None) -> list[str]:
    """Documents for perplexity: the built-in corpus, a text file (one document), or a JSONL
    file's `field_name` (one document per line; default field 'text')."""
    if source in BUILTIN_CORPORA:
        return python_docs()
    path = Path(source)
    if not path.exists():
        names = ", ".join(BUILTIN_CORPORA)
        raise SlimlmError(f"unknown text source '{source}': give a text or JSONL file, or a built-in corpus ({names})")
    if path.suffix == ".jsonl":
        key = field_name or "text"
        records = read_jsonl(path, required=(key,), skip_bad_lines=skip_bad_lines, report=report)
        docs = [str(r[key]) for r in records if str(r[key]).strip()]
    else:
        docs = [path.read_text(encoding="utf-8")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SlimlmError(f"{path}: no text to score")
    return docs
