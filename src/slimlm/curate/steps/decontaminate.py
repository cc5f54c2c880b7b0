"""Decontamination: drop every document that shares a word n-gram (13 by default, as GPT-3 and
lm-evaluation-harness's decontamination do) with an item of an eval task, so a model trained on
the curated data is not scored on questions it saw.

The tasks are every task slimlm ships (HumanEval and the built-in task sets) plus the user's (`tasks:`
takes anything `slimlm eval --task` takes, a task file included). datatrove's own n-gram
decontamination builds its index from lighteval tasks fetched from the hub, so the index is
built here from the task files on disk. Words are lower-cased runs of letters and digits, so
punctuation and line breaks between them do not hide an overlap. An item shorter than the n-gram
(a short question) is matched as its whole word sequence, if it has at least `min_words` words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from datatrove.pipeline.filters.base_filter import BaseFilter

from slimlm.curate.steps.base import CurateStep, register_step
from slimlm.errors import SlimlmError

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def default_tasks() -> list[str]:
    """HumanEval and every built-in task set: what slimlm evaluates on out of the box."""
    from slimlm.data import BUILTIN_TASKS

    return ["humaneval"] + [f"{t.kind}:{name}" for name, t in BUILTIN_TASKS.items()]


def task_texts(task: str) -> list[str]:
    """The texts of a task's items: every string field of every item, each on its own (a question,
    a choice, a solution), so an n-gram never spans two fields that no document would join."""
    from slimlm.data import read_jsonl
    from slimlm.data.jsonl import json_strings
    from slimlm.eval.tasks import TaskSpec, parse_task

    kind, argument = parse_task(task)
    if kind == "humaneval":
        from slimlm.eval.humaneval import load_problems

        rows = load_problems()
    elif isinstance(argument, TaskSpec):
        rows = read_jsonl(argument.data)
    else:
        raise SlimlmError(f"task {task}: a {kind} task has no items to decontaminate against: give a task with "
                          "questions (a task file, KIND:FILE.jsonl, humaneval or a built-in task)")
    return [text for row in rows for text in json_strings(row)]


class NgramIndex:
    """{n-gram: task} for every item of the tasks; items shorter than n are kept whole."""

    def __init__(self, tasks: dict[str, list[str]], n: int):
        self.n, self.grams, self.short = n, {}, {}
        for task, texts in tasks.items():
            for text in texts:
                w = words(text)
                if len(w) < n:
                    if w:
                        self.short.setdefault(len(w), {})[tuple(w)] = task
                    continue
                for i in range(len(w) - n + 1):
                    self.grams.setdefault(tuple(w[i:i + n]), task)

    def match(self, text: str) -> str | None:
        """The task `text` overlaps with, or None."""
        w = words(text)
        for i in range(len(w) - self.n + 1):
            task = self.grams.get(tuple(w[i:i + self.n]))
            if task is not None:
                return task
        for length, items in self.short.items():
            for i in range(len(w) - length + 1):
                task = items.get(tuple(w[i:i + length]))
                if task is not None:
                    return task
        return None


class _Decontaminate(BaseFilter):
    name = "🧪 Decontaminate"

    def __init__(self, tasks: dict[str, list[str]], n: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.tasks, self.n = tasks, n
        self._index = None

    def filter(self, doc):
        if self._index is None:
            self._index = NgramIndex(self.tasks, self.n)
        task = self._index.match(doc.text)
        if task is None:
            return True
        doc.metadata["contaminated_by"] = task
        return False, f"decontaminate_{task}"


@dataclass
class DecontaminateParams:
    ngram: int = 13  # words in a shared run that counts as contamination
    tasks: list[str] = field(default_factory=list)  # the user's tasks, besides the shipped ones
    shipped: bool = True  # also every task slimlm ships (humaneval and the built-in task sets)
    min_words: int = 8  # an item shorter than this (after splitting into words) is not matched


@register_step("decontaminate")
class Decontaminate(CurateStep):
    help = "eval-task contamination: drop documents sharing a 13-word run with any task item (shipped tasks + yours)"
    params = DecontaminateParams

    def all_tasks(self, params) -> list[str]:
        return list(dict.fromkeys((default_tasks() if params.shipped else []) + params.tasks))

    def check(self, params):
        if params.ngram < 1 or params.min_words < 1:
            raise SlimlmError("ngram and min_words must be at least 1")
        if not self.all_tasks(params):
            raise SlimlmError("no tasks to decontaminate against: set shipped: true or list tasks")
        for task in self.all_tasks(params):
            task_texts(task)  # fails now, naming the task, rather than in a worker

    def document_steps(self, params, ctx):
        tasks = {t: [x for x in task_texts(t) if len(words(x)) >= params.min_words] for t in self.all_tasks(params)}
        return [_Decontaminate(tasks, params.ngram, ctx.removed_writer())]
