"""Task strings and task files: `parse_task` turns what the user wrote after `--task` into a
registered task kind (kinds.py) and its argument, and task files let a user define a
multiple-choice, classification or generation task over their own JSONL without writing Python.

A task file is YAML; every key is listed in TaskSpec below and an unknown key is an error, so a
typo never silently falls back to a default. See examples/tasks/ and the README for examples.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field, fields
from pathlib import Path

from slimlm.data import BUILTIN_TASKS
from slimlm.errors import SlimlmError
from slimlm.eval.kinds import TASK_KINDS, file_kinds, get_task_kind

__all__ = ["TASK_KINDS", "TaskSpec", "builtin_task_help", "load_task_file", "parse_task"]


def builtin_task_help() -> str:
    """'KIND:NAME (what it is); ...' for the built-in task sets (slimlm.data.BUILTIN_TASKS)."""
    return "; ".join(f"{task.kind}:{name} ({task.help})" for name, task in BUILTIN_TASKS.items())


@dataclass
class TaskSpec:
    name: str
    kind: str  # a registered kind that takes a file: multiple_choice, classification, generation
    data: Path  # JSONL, relative paths are relative to the task file
    template: str = ""  # prompt with {field} placeholders; default per kind
    description: str = ""  # put before the examples (a system message with --chat)
    target_delimiter: str = " "  # between prompt and choice/label (raw prompts only)
    labels: list[str] | None = None  # classification; default: the labels found in the data
    scorers: list[str] = field(default_factory=lambda: ["exact_match"])  # generation; the first is the headline
    extract: str | None = None  # generation: regex whose first group is the answer to score
    max_tokens: int = 64  # generation
    stop: list[str] = field(default_factory=list)  # generation
    shots: int = 0
    chat: bool | None = None  # None: generation uses the chat template if the model has one; scoring does not
    source: Path | None = None  # the task file this came from

    def __post_init__(self) -> None:
        where = f"task {self.source or self.name}"
        kind = get_task_kind(self.kind)
        if kind is None or not kind.takes_file:
            raise SlimlmError(f"{where}: unknown kind '{self.kind}': use one of {', '.join(file_kinds())}")
        self.data = Path(self.data)
        self.template = self.template or kind.template
        kind.check_spec(self, where)
        if self.extract:
            try:
                re.compile(self.extract)
            except re.error as exc:
                raise SlimlmError(f"{where}: 'extract' is not a valid regular expression ({exc})") from None
        if self.labels is not None and len(set(map(str, self.labels))) < 2:
            raise SlimlmError(f"{where}: 'labels' needs at least two distinct labels")
        if self.shots < 0 or self.max_tokens < 1:
            raise SlimlmError(f"{where}: 'shots' must be >= 0 and 'max_tokens' >= 1")
        try:
            names = self.prompt_fields
        except ValueError as exc:
            raise SlimlmError(f"{where}: the template is not valid ({exc}): use {{field}} placeholders") from None
        odd = [n for n in names if not n.isidentifier()]
        if odd:
            raise SlimlmError(f"{where}: template placeholder {{{odd[0]}}} is not a field name: use {{field}}")

    @property
    def prompt_fields(self) -> tuple[str, ...]:
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.template) if name)

    @property
    def required_fields(self) -> tuple[str, ...]:
        return (*self.prompt_fields, *get_task_kind(self.kind).answer_fields)

    def render(self, record: dict) -> str:
        return self.template.format_map(record)


def load_task_file(path: Path) -> TaskSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"{path}: no such task file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SlimlmError(f"{path}{line}: not valid YAML: fix the file") from None
    if not isinstance(raw, dict):
        raise SlimlmError(f"{path}: a task file is a YAML mapping (kind:, data:, ...)")
    known = {f.name for f in fields(TaskSpec)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SlimlmError(f"{path}: unknown key '{unknown[0]}': the keys are {', '.join(sorted(known))}")
    for key in ("kind", "data"):
        if key not in raw:
            raise SlimlmError(f"{path}: missing key '{key}'")
    raw.setdefault("name", path.stem)
    if not isinstance(raw["data"], str) or not raw["data"].strip():
        raise SlimlmError(f"{path}: 'data' must be the path of a JSONL file")
    data = Path(raw["data"])
    raw["data"] = data if data.is_absolute() else path.parent / data
    for key in ("labels", "scorers", "stop"):
        if key in raw and isinstance(raw[key], str):
            raw[key] = [raw[key]]
    for key in ("labels", "scorers", "stop"):
        if raw.get(key) is not None and not isinstance(raw[key], list):
            raise SlimlmError(f"{path}: '{key}' must be a list")
    if raw.get("labels") is not None:
        raw["labels"] = [str(label) for label in raw["labels"]]
    try:
        return TaskSpec(**raw, source=path)
    except TypeError as exc:
        raise SlimlmError(f"{path}: {exc}") from None


def parse_task(task: str) -> tuple[str, object]:
    """(kind name, argument as the kind parsed it): ('perplexity', source), ('humaneval', None),
    (kind, TaskSpec) for a task file, `KIND:FILE.jsonl` or a built-in task set (`KIND:NAME`)."""
    if task.endswith((".yaml", ".yml")):
        spec = load_task_file(Path(task))
        return spec.kind, spec
    name, sep, argument = task.partition(":")
    kind = get_task_kind(name)
    if kind is not None and kind.takes_argument and sep and argument:
        return kind.name, kind.parse(argument)
    if kind is not None and not kind.takes_argument and not sep:
        return kind.name, None
    kinds = "; ".join(TASK_KINDS.values())
    builtins = ", ".join(f"{t.kind}:{name}" for name, t in BUILTIN_TASKS.items())
    raise SlimlmError(f"unknown task '{task}': use a task file (.yaml), a built-in task ({builtins}) "
                      f"or one of: {kinds}")
