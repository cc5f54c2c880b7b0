"""Records of instruction data and prompt lists, read from JSONL (or, for training, plain text).

Chat records are what `finetune` and `distill` learn from, in three shapes, one JSON object per
line or plain text:
- chat: {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
- pairs: {"prompt": ..., "completion": ...} (one user turn, one assistant turn)
- text: {"text": ...} lines, a .txt file, a folder of text files, or the built-in `python-docs`
Each is checked as it is read, so a bad line is reported with its file and line before any
tokenizing starts. Prompt rows are what `slimlm router` labels: {"prompt": ..., optional
"reference"}.
"""

from __future__ import annotations

from pathlib import Path

from slimlm.data.corpora import BUILTIN_CORPORA, builtin_corpus, text_files
from slimlm.data.jsonl import JsonlReport, read_jsonl
from slimlm.errors import SlimlmError


def check_chat_record(record: dict) -> str | None:
    """What is wrong with a training record, in words, or None (read_jsonl adds file and line)."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return "every message needs a string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message to learn from"
        return None
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                return f"missing field '{key}' (a string)"
        return None
    if isinstance(record.get("text"), str):
        return None
    return "needs 'messages', or 'prompt' and 'completion', or 'text'"


def read_records(source: str | Path, skip_bad_lines: bool = False, report: JsonlReport | None = None) -> list:
    """Each training record as a list of messages (instruction data) or a string (plain text)."""
    name = str(source)
    if name in BUILTIN_CORPORA:
        return builtin_corpus(name)
    path = Path(source)
    if path.is_dir():
        return text_files(path)
    if not path.is_file():
        builtins = ", ".join(BUILTIN_CORPORA)
        raise SlimlmError(f"{path}: no such file: give a .jsonl or .txt file, a folder of text files, "
                          f"or a built-in corpus ({builtins})")
    if path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise SlimlmError(f"{path}: the file is empty: give text to train on")
        return [text]
    records = read_jsonl(path, skip_bad_lines=skip_bad_lines, report=report, check=check_chat_record)
    out = []
    for r in records:
        if "messages" in r:
            out.append(r["messages"])
        elif "prompt" in r:
            out.append([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}])
        else:
            out.append(r["text"])
    return out


def record_scores(source: str | Path, key: str, skip_bad_lines: bool = False) -> list[float]:
    """The score `key` of each training record `read_records` returns, in the same order: the
    record's `metadata[key]` (what `slimlm curate` writes: edu_score, perplexity...) or its own
    top-level `key`. For a curriculum; a record without one is an error naming the line."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        raise SlimlmError(f"{source}: a curriculum needs JSONL records with a score (metadata.{key}): give the "
                          "train.jsonl or data of `slimlm curate`/`slimlm synth`")
    scores = []

    def check(record: dict) -> str | None:
        problem = check_chat_record(record)
        if problem:
            return problem
        value = record.get("metadata", {}).get(key, record.get(key)) if isinstance(record.get("metadata", {}), dict) \
            else record.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"no score {key!r} (a number, in metadata or at the top level): score the data with slimlm curate"
        return None

    for record in read_jsonl(path, skip_bad_lines=skip_bad_lines, check=check):
        meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
        scores.append(float(meta.get(key, record.get(key))))
    return scores


def _check_prompt_row(row: dict) -> str | None:
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        return "has no \"prompt\" text"
    return None


def read_prompts(path: str | Path) -> list[dict]:
    """Rows of a prompts file (JSONL, each with a non-empty "prompt"), other fields kept as given."""
    return read_jsonl(Path(path), check=_check_prompt_row,
                      hint="each line needs a JSON object with a non-empty \"prompt\"")
