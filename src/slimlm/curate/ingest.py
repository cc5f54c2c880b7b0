"""Reading the user's corpus: text files and folders, JSONL (a field, or chat `messages`),
Parquet (a column), checked line by line and spread over shards that the pipeline's tasks read.

Everything is read once, here, so a bad file is found before any filter runs: a line that is not
JSON, a record without the field, a file that is not UTF-8 or not Parquet is one error naming the
file and line (`on_error="fail"`, the default) or is reported and skipped (`"skip"`). Each document
gets an id (`file:line`), its provenance and its token count (and keeps a JSONL record's own
`metadata` mapping). A chat record's turns become one
text, each turn after a line `<|role|>`, so every step judges what was said; the writer turns the
text back into `messages` (`chat_messages`).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from slimlm.data.jsonl import parse_line
from slimlm.errors import SlimlmError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
PARQUET_SUFFIXES = (".parquet",)
_TURN = re.compile(r"^<\|(system|user|assistant|tool)\|>$", re.M)


@dataclass
class IngestReport:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: problem"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def input_files(inputs: list[str | Path]) -> list[Path]:
    """The readable files under `inputs` (files, or folders searched recursively), sorted."""
    files = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) and not p.name.startswith("."))
            if not found:
                raise SlimlmError(f"{path}: no .txt, .md, .jsonl or .parquet files in this folder: give a folder "
                                  "of documents or the files themselves")
            files += found
        elif path.is_file():
            if _kind(path) is None:
                raise SlimlmError(f"{path}: unknown kind of file: give .txt/.md (one document each), .jsonl "
                                  "(one record per line) or .parquet")
            files.append(path)
        else:
            raise SlimlmError(f"{path}: no such file or folder")
    return files


def render_chat(messages: list) -> str | None:
    """The turns as one text (`<|role|>` line, then the content), or None if they are not turns."""
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                               and m.get("role") in ("system", "user", "assistant", "tool") for m in messages):
        return None
    return "\n".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)


def chat_messages(text: str) -> list[dict]:
    """render_chat, undone (after steps may have rewritten the contents)."""
    parts = _TURN.split(text)
    return [{"role": role, "content": content.strip("\n")} for role, content in zip(parts[1::2], parts[2::2])]


def file_records(path: Path, text_field: str) -> Iterator[tuple[int, dict | str]]:
    """(line, {"text", "chat"?}) or (line, problem) for each record of one file; line 0: the file."""
    try:
        yield from _file_records(path, text_field)
    except (OSError, EOFError) as exc:  # unreadable (permissions, a gzip stream cut short): the file is the problem
        yield 0, f"cannot be read ({getattr(exc, 'strerror', None) or exc})"


def _file_records(path: Path, text_field: str) -> Iterator[tuple[int, dict | str]]:
    kind = _kind(path)
    if kind == "text":
        try:
            yield 1, {"text": path.read_bytes().decode("utf-8")}
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[:exc.start].count(b"\n") + 1
            yield line, f"not UTF-8 text (byte {exc.start})"
        return
    if kind == "parquet":
        yield from _parquet(path, text_field)
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as raw:
        for number, line in enumerate(raw, start=1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, f"not UTF-8 text (byte {exc.start} of the line)"
                continue
            if not line.strip():
                continue
            record = parse_line(line, (), None)
            yield number, record if isinstance(record, str) else _text_of(record, text_field)


def _text_of(record: dict, text_field: str) -> dict | str:
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}  # kept with the document
    value = record.get(text_field)
    if isinstance(value, str):
        return {"text": value, "meta": meta}
    if "messages" in record:
        text = render_chat(record["messages"])
        return {"text": text, "chat": True, "meta": meta} if text else \
            "'messages' is not a list of {role, content} turns"
    return f"no text field {text_field!r} (a string) and no chat 'messages': name the field with --field"


def _parquet(path: Path, text_field: str) -> Iterator[tuple[int, dict | str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...: all mean "not readable Parquet"
        yield 0, f"not a readable Parquet file ({type(exc).__name__})"
        return
    if text_field not in table.schema_arrow.names:
        yield 0, f"no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}): name it with --field"
        return
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, {"text": value} if isinstance(value, str) else f"{text_field} is not a string"


def read_shards(folder: Path) -> Iterator[dict]:
    """The records of a folder of gzip JSONL shards (what the pipeline's stages write), shard by shard."""
    for shard in sorted(Path(folder).glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            yield from (json.loads(line) for line in f)


class ShardWriter:
    """Round-robin JSONL.gz shards in `folder`, written to temporary names and renamed on close."""

    def __init__(self, folder: Path, shards: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"{k:05d}.jsonl.gz" for k in range(shards)]
        self.files = [io.TextIOWrapper(gzip.open(p.with_suffix(".tmp"), "wb"), encoding="utf-8") for p in self.paths]
        self.n = 0

    def write(self, record: dict) -> None:
        self.files[self.n % len(self.files)].write(json.dumps(record, ensure_ascii=False) + "\n")
        self.n += 1

    def close(self) -> None:
        for f, p in zip(self.files, self.paths):
            f.close()
            p.with_suffix(".tmp").rename(p)


def ingest(inputs: list[str | Path], out: Path, shards: int, counter, text_field: str = "text",
           on_error: str = "fail", progress=None) -> IngestReport:
    """Read every input into `shards` shards under `out`; the report counts and lists what was skipped."""
    if on_error not in ("fail", "skip"):
        raise SlimlmError(f"on_error must be fail or skip, not {on_error!r}")
    files = input_files(inputs)
    report = IngestReport(files=len(files))
    writer = ShardWriter(out, shards)
    batch: list[dict] = []

    def flush():
        for record, count in zip(batch, counter.count([r["text"] for r in batch])):
            record["metadata"]["token_count"] = count
            report.tokens += count
            writer.write(record)
        batch.clear()

    try:
        for path in files:
            for line, record in file_records(path, text_field):
                if isinstance(record, str):
                    where = f"{path}:{line}: {record}" if line else f"{path}: {record}"
                    if on_error == "fail":
                        raise SlimlmError(f"{where}: fix it, or pass --on-error skip to skip such records")
                    report.skipped.append(where)
                    continue
                if not record["text"].strip():
                    continue
                report.documents += 1
                meta = {**record.get("meta", {}), "source": str(path), "line": line,
                        **({"chat": True} if record.get("chat") else {})}
                batch.append({"id": f"{path}:{line}", "text": record["text"], "metadata": meta})
                if len(batch) >= 256:
                    flush()
            if progress:
                progress(path)
        flush()
    finally:
        writer.close()
    if not report.documents:
        raise SlimlmError(f"no documents in {', '.join(map(str, inputs))}: every file was empty or skipped")
    return report
