"""The one JSONL reader: every verb that reads records (eval tasks, training data, router
prompts, perplexity text) goes through `read_jsonl`, so a bad line is reported the same way
everywhere: with its file and line number, and skipped only when the user asked for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError

SKIP_HINT = "fix the line, or pass --skip-bad-lines to skip it"


@dataclass
class JsonlReport:
    """Lines skipped with --skip-bad-lines, so the result can say how many were dropped."""

    skipped: list[str] = field(default_factory=list)


def read_jsonl(path: Path, required: tuple[str, ...] = (), skip_bad_lines: bool = False,
               report: JsonlReport | None = None, check: Callable[[dict], str | None] | None = None,
               hint: str = SKIP_HINT) -> list[dict]:
    """Records of a JSONL file. A malformed line, a record missing a required field, or one that
    `check` finds a problem with is an error naming the file and line, unless `skip_bad_lines`
    is set (then it is counted in `report`). `hint` ends the error: what the user can do about
    the line (a verb without --skip-bad-lines passes its own)."""
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"{path}: no such file: give the path to a JSONL file")
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            problem = parse_line(line, required, check)
            if isinstance(problem, dict):
                records.append(problem)
                continue
            where = f"{path}:{number}: {problem}"
            if not skip_bad_lines:
                raise SlimlmError(f"{where}: {hint}")
            if report is not None:
                report.skipped.append(where)
    if not records:
        raise SlimlmError(f"{path}: no usable records: the file is empty or every line was skipped")
    return records


def parse_line(line: str, required: tuple[str, ...], check: Callable[[dict], str | None] | None) -> dict | str:
    """The line's record, or what is wrong with it in words (read_jsonl adds the file and line)."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        return f"not valid JSON ({exc.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [f for f in required if f not in record]
    if missing:
        return f"missing field '{missing[0]}'"
    problem = check(record) if check is not None else None
    return problem if problem else record


def json_strings(value) -> list[str]:
    """Every string inside a parsed JSON value (nested dicts and lists), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in json_strings(v)]
    return []
