"""The task kinds of `slimlm eval`: one small class per kind, in a registry that `evaluate`
dispatches through and the CLI's `--task` help is generated from.

A kind answers four questions, so that `evaluate` never branches on a kind's name:
- how a task string names it (`perplexity:SOURCE`, `multiple_choice:FILE.jsonl`, `humaneval`);
- which data it reads, read and validated *before* a model is loaded, so bad input fails in a
  second rather than after a minute of loading;
- whether it scores log-likelihoods (`needs_loglik`: torch by default, and llama.cpp must keep
  the logits of every position) or generates;
- how it runs on an opened backend and what result it returns.
Kinds whose data is a JSONL task file (`takes_file`; their base, FileTaskKind, is in
prompts.py) also give TaskSpec its defaults (prompt template, answer fields) and check each
record. A new kind is one module with one decorated
class, plus one import line in slimlm/eval/__init__.py (see ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from slimlm.eval.result import EvalResult
from slimlm.registry import Registry


@dataclass
class EvalOptions:
    """The options of one evaluation, as `evaluate` takes them; each kind reads the ones it uses."""

    limit: int | None = None
    batch_size: int = 1
    seed: int = 0
    shots: int = 0
    chat: bool | None = None
    context: int = 2048
    stride: int | None = None
    field: str | None = None
    reference: str | None = None
    reference_backend: str = "auto"
    skip_bad_lines: bool = False
    samples: int = 1
    # (model, backend, kind name) -> an opened backend: a second model, e.g. perplexity's reference
    open_model: Callable[[str, str, str], Any] | None = None


class TaskKind:
    """One kind of task. Subclass it, set `help`, override what differs, and decorate the class
    with `@register_task_kind("name")`."""

    name = ""  # set by register_task_kind
    help = ""  # "name:ARGUMENT  what it measures", one entry of `slimlm eval --help`
    needs_loglik = False  # scores log-likelihoods rather than generating text
    takes_argument = True  # named "name:ARGUMENT"; False: the bare name (humaneval)
    takes_file = False  # the argument is a JSONL file described by a TaskSpec (or a task file's kind)
    takes_reference = False  # accepts --reference (a second model on the same text)
    # task-file kinds: the default prompt and the JSONL fields an answer is read from
    template = ""
    answer_fields: tuple[str, ...] = ()

    def parse(self, argument: str) -> Any:
        """The task's argument (what follows "name:") as `load` and `run` take it."""
        return argument

    def check_spec(self, spec, where: str) -> None:
        """Task-file kinds: a SlimlmError naming `where` if the TaskSpec cannot work for this kind."""

    def check_record(self, spec, record: dict) -> str | None:
        """Task-file kinds: what is wrong with one JSONL record (its fields exist), or None."""
        return None

    def load(self, argument: Any, options: EvalOptions, report) -> Any:
        """The data, read and validated before a model is loaded (None: the kind reads none).
        `report` (a slimlm.data.JsonlReport) collects the lines --skip-bad-lines skipped."""
        return None

    def run(self, argument: Any, data: Any, backend, options: EvalOptions) -> EvalResult:
        raise NotImplementedError

    @staticmethod
    def scorer(backend, options: EvalOptions):
        """The log-likelihood scorer of an opened backend (kinds with needs_loglik): the backend's
        own (BackendUnavailable where it has none)."""
        return backend.scorer(batch_size=options.batch_size)


TASK_KIND_REGISTRY: Registry[TaskKind] = Registry("task kind", TaskKind)
# Class decorator: register a TaskKind under `name` (the part of a task string before ':').
register_task_kind = TASK_KIND_REGISTRY.register


def get_task_kind(name: str) -> TaskKind | None:
    """An instance of the kind `name` (kinds keep no state), or None for an unknown name."""
    cls = TASK_KIND_REGISTRY.get(name)
    return cls() if cls is not None else None


def file_kinds() -> list[str]:
    """The kinds a task file (.yaml) may name, in registration order."""
    return [name for name, kind in TASK_KIND_REGISTRY.items() if kind.takes_file]


TASK_KINDS: Mapping[str, str] = TASK_KIND_REGISTRY.helps  # name -> help, read live
