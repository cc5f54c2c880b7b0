"""Built-in task sets: evaluation data that ships with slimlm, addressable by name
(`slimlm eval MODEL --task multiple_choice:pydoc`), and the deterministic builder of each.

`pydoc` (src/slimlm/data/tasks/pydoc-mc.jsonl) is a multiple-choice task built from the
docstrings of Python's own standard library, so it needs no download and no licence beyond
Python's. Construction (`build_pydoc_mc`, run by `scripts/build_builtin_tasks.py`):

1. Modules: the fixed list `PYDOC_MODULES` of standard-library modules that import without side
   effects (no antigravity/this/tkinter/idlelib/turtle, nothing that opens a window, a browser or
   a socket); a module that does not import on this Python is left out.
2. Names: a module's public functions and classes (its `__all__` where it has one, otherwise its
   names without a leading underscore whose object was defined in that module), in sorted order.
   Aliases (one object under two names), hooks (names ending in `hook`, such as
   sys.excepthook, which programs and test runners replace) and objects defined outside the
   standard library (a package's patch, such as torch's inspect.getfile) are left out.
3. Description: the first sentence of the object's docstring (`inspect.getdoc`), after leading
   call-signature lines (`name(args) -> result`), with reST markup (``x``, :func:`x`) unwrapped.
   Kept only if it has 4 to 40 words and 20 to 300 characters; reads as a sentence (starts with
   a letter, balanced parentheses, no `->`, no trailing colon); does not contain the module's
   last name part as a word; the whole question does not contain the object's own name as a
   word, ignoring case (so `datetime.datetime` is out); for names of 5 or more letters and
   digits, does not contain the name once case, spaces and punctuation are removed from both
   ("Threaded child watcher" gives ThreadedChildWatcher away). A description that two objects
   share is dropped for both.
4. Question: "Which function of Python's `M` module does this describe? \"<description>\"" (or
   "class"), with 4 choices: the right name and 3 other names of the same kind from the same
   module, none of which appears in the question as a word and none sharing the description,
   drawn with a fixed seed; the right answer's position is drawn with the same seed. A module
   gives at most `PER_MODULE` questions (a seeded sample, so `os` does not dominate).
5. Records are written sorted by (module, name), one JSON object per line, with `question`,
   `choices`, `answer` (index) and `module`, `name`, `type` for reference.

The file is built in a fresh interpreter without site-packages (`build_pydoc_mc_isolated`), so
nothing another package imported or patched can change it. The standard library changes between
Python versions, so the shipped file is the reference: `PYDOC_BUILT_WITH` records the Python
(major.minor) that built it, and the builder run on that Python reproduces it byte for byte (a
test checks this); on another Python it may give a slightly different set, which is why the file
ships rather than being built on the fly. On Python 3.11 it gives 532 questions from 81 modules.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PYDOC_BUILT_WITH = "3.11"  # the Python (major.minor) whose standard library built the shipped file
SEED = 16
PER_MODULE = 12
CHOICES = 4

# Standard-library modules that import without side effects; sorted, one place to extend.
PYDOC_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "bz2", "calendar",
    "cmath", "codecs", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "email.utils", "enum", "filecmp",
    "fnmatch", "fractions", "functools", "gc", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies", "imaplib", "importlib",
    "importlib.util", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "lzma", "math", "mimetypes", "operator", "os", "os.path", "pathlib", "pickle", "pkgutil",
    "platform", "plistlib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "select", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3", "stat",
    "statistics", "string", "struct", "subprocess", "sys", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "token", "tokenize", "tomllib", "traceback", "types", "typing",
    "unicodedata", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib", "zoneinfo",
)


@dataclass(frozen=True)
class BuiltinTask:
    kind: str  # the task kind that reads it (multiple_choice, ...)
    file: str  # under TASKS_DIR
    help: str  # one line for `slimlm eval --help`

    @property
    def path(self) -> Path:
        return TASKS_DIR / self.file


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "pydoc": BuiltinTask(
        kind="multiple_choice", file="pydoc-mc.jsonl",
        help="4-choice questions: which standard-library function or class does a sentence of its "
             "docstring describe"),
}


def builtin_task(kind: str, name: str) -> BuiltinTask | None:
    """The built-in task `name` if it is one read by `kind`, else None."""
    task = BUILTIN_TASKS.get(name)
    return task if task is not None and task.kind == kind else None


# --- the builder ---------------------------------------------------------------------------

_SIGNATURE = re.compile(r"^[\w.]+\s*\(.*\)\s*(->.*)?$|^[\w.]+\s*->")
_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]`'\"])\.(\s|$)")


def _public_objects(module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(module).items()
                 if getattr(obj, "__module__", None) == module.__name__]
    out = []
    for name in sorted(set(names)):
        if name.startswith("_") or name.endswith("hook"):  # hooks: programs and test runners replace them
            continue
        obj = getattr(module, name, None)
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and _from_stdlib(obj, module.__name__):
            out.append((name, obj))
    return out


def _from_stdlib(obj, module_name: str) -> bool:
    """False for an object a third-party package put in place of the standard library's (torch
    replaces inspect.getfile), so what the builder sees does not depend on what was imported."""
    home = getattr(obj, "__module__", None)
    return home is None or home == module_name or home.partition(".")[0] in sys.stdlib_module_names


def _describe(obj) -> str | None:
    """The first sentence of the object's docstring, or None."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    lines = [line.strip() for line in doc.strip().splitlines()]
    while lines and (not lines[0] or _SIGNATURE.match(lines[0])):
        lines.pop(0)
    paragraph = []
    for line in lines:
        if not line:
            break
        paragraph.append(line)
    text = " ".join(paragraph)
    text = _ROLE.sub(r"\1", text).replace("``", "").replace("`", "")
    match = _SENTENCE_END.search(text)
    if match:
        text = text[:match.start() + 1]
    text = " ".join(text.split())
    return text or None


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text, flags=re.IGNORECASE) is not None


def _module_candidates(module_name: str) -> list[dict]:
    """(name, type, description) of the module's usable objects, before de-duplication."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except Exception:
            return []
    seen_ids: dict[int, int] = {}
    objects = _public_objects(module)
    for _, obj in objects:
        seen_ids[id(obj)] = seen_ids.get(id(obj), 0) + 1
    out = []
    for name, obj in objects:
        if seen_ids[id(obj)] > 1:  # an alias: the same object under two names
            continue
        out.append({"module": module_name, "name": name, "type": "class" if inspect.isclass(obj) else "function",
                    "description": _describe(obj)})
    return out


def _usable(candidate: dict) -> bool:
    text, name = candidate["description"], candidate["name"]
    if not text or not 20 <= len(text) <= 300 or not 4 <= len(text.split()) <= 40:
        return False
    if not text[0].isalpha() or text.endswith(":") or "->" in text or text.count("(") != text.count(")"):
        return False  # a fragment of a signature or of a list, not a sentence
    short = candidate["module"].rsplit(".", 1)[-1]
    if _mentions(_question(candidate), name) or _mentions(text, short):
        return False
    squashed = _squash(name)
    return len(squashed) < 5 or squashed not in _squash(text)


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _question(candidate: dict) -> str:
    return (f"Which {candidate['type']} of Python's `{candidate['module']}` module does this describe? "
            f"\"{candidate['description']}\"")


def build_pydoc_mc(modules: tuple[str, ...] = PYDOC_MODULES, seed: int = SEED,
                   per_module: int = PER_MODULE) -> list[dict]:
    """The records of the `pydoc` task, as the module docstring describes; the same on every run
    of the same Python."""
    if sys.flags.optimize >= 2:
        raise RuntimeError("docstrings are stripped (python -OO): build the task without -OO")
    records = []
    for module_name in sorted(modules):
        candidates = _module_candidates(module_name)
        counts: dict[str, int] = {}
        for c in candidates:
            if c["description"]:
                counts[c["description"]] = counts.get(c["description"], 0) + 1
        rng = random.Random(f"{seed}:{module_name}")
        items = []
        for c in candidates:
            if not _usable(c) or counts[c["description"]] > 1:
                continue
            question = _question(c)
            pool = [o["name"] for o in candidates
                    if o["type"] == c["type"] and o["name"] != c["name"]
                    and o["description"] != c["description"] and not _mentions(question, o["name"])
                    and o["name"].lower() != c["name"].lower()]
            if len(pool) < CHOICES - 1:
                continue
            choices = rng.sample(pool, CHOICES - 1)
            answer = rng.randrange(CHOICES)
            choices.insert(answer, c["name"])
            items.append({"question": question, "choices": choices, "answer": answer,
                          "module": module_name, "name": c["name"], "type": c["type"]})
        if len(items) > per_module:
            items = rng.sample(items, per_module)
        records += sorted(items, key=lambda r: r["name"])
    return records


def build_pydoc_mc_isolated() -> list[dict]:
    """`build_pydoc_mc()` run in a fresh interpreter of this Python with no site-packages
    (`python -I -S`), so the result cannot depend on what the calling process imported or patched
    (torch, for one, replaces inspect.getfile). The shipped file is built this way."""
    import subprocess

    done = subprocess.run([sys.executable, "-I", "-S", __file__], capture_output=True, text=True,
                          encoding="utf-8", timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"building the pydoc task failed:\n{done.stderr}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def dumps_jsonl(records: list[dict]) -> str:
    """The file's exact text: one JSON object per line, keys in a fixed order, ASCII-safe."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


if __name__ == "__main__":  # the isolated build: this file imports only the standard library
    sys.stdout.reconfigure(encoding="utf-8")
    sys.stdout.write(dumps_jsonl(build_pydoc_mc()))
