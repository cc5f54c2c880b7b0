"""Text corpora: the built-in ones, text files, folders of text files, and one field of a JSONL
file.

Everything is local. The built-in corpus `python-docs` is the prose of Python's own reference
documentation (`pydoc_data.topics`), which every Python install carries, so a perplexity number
or a calibration run can be reproduced on any machine without fetching a data set. `mix` is the
diverse calibration set (prose of several kinds, code, chat turns, other languages) and
`held-out-prose` / `held-out-chat` the out-of-domain evaluation corpora that it never contains,
all built from text `make setup` installs (data/calibration_mix.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slimlm.data.jsonl import JsonlReport, read_jsonl
from slimlm.errors import SlimlmError

BUILTIN_CORPORA = {
    "python-docs": "the English prose of Python's reference documentation (pydoc_data.topics)",
    "mix": "diverse calibration text: English prose of several kinds, code, chat turns, other languages",
    "held-out-prose": "general English prose (paper abstracts) that no calibration set contains",
    "held-out-chat": "chat-formatted conversations (ChatML) that no calibration set contains",
}
TEXT_SUFFIXES = (".txt", ".md")  # what a folder of text is read for


def python_docs() -> list[str]:
    """One document per reference topic, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


_LOADERS: dict[str, Callable[[], list[str]]] = {"python-docs": lambda: python_docs()}


def register_corpus(name: str, loader: Callable[[], list[str]]) -> None:
    """Give a built-in corpus named in BUILTIN_CORPORA its loader (calibration_mix.py registers
    `mix` and the held-out corpora, so this module needs no import of it)."""
    if name not in BUILTIN_CORPORA:
        raise SlimlmError(f"'{name}' is not a built-in corpus")
    _LOADERS[name] = loader


def builtin_corpus(name: str) -> list[str]:
    """The documents of a built-in corpus (BUILTIN_CORPORA), whole."""
    return _LOADERS[name]()  # the package's __init__ imports calibration_mix, which registers its corpora


def text_files(folder: Path) -> list[str]:
    """One document per text file (.txt, .md) under `folder`, in sorted path order, so a folder
    reads the same on every machine; empty files are left out."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    docs = [text for text in (p.read_text(encoding="utf-8") for p in files) if text.strip()]
    if not docs:
        kinds = ", ".join(TEXT_SUFFIXES)
        raise SlimlmError(f"{folder}: no text in the folder: put {kinds} files in it, or give one file")
    return docs


def text_documents(source: str, field_name: str | None = None, skip_bad_lines: bool = False,
                   report: JsonlReport | None = None) -> list[str]:
    """Documents for perplexity and calibration: the built-in corpus, a text file (one document),
    a folder (one document per text file), or a JSONL file's `field_name` (one document per
    line; default field 'text')."""
    if source in BUILTIN_CORPORA:
        return builtin_corpus(source)
    path = Path(source)
    if not path.exists():
        names = ", ".join(BUILTIN_CORPORA)
        raise SlimlmError(f"unknown text source '{source}': give a text or JSONL file, a folder of text files, "
                          f"or a built-in corpus ({names})")
    if path.is_dir():
        return text_files(path)
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
