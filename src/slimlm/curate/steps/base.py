"""What a curation step is: one small class in a registry, its parameters a dataclass.

A recipe (curate/recipe.py) is a list of steps by name; each name is looked up in CURATE_STEPS,
so a new step is one module and one decorator line, and `slimlm curate --help` lists it. A step
either judges one document at a time (a filter, a rewrite: `document_steps`, which the runner
chains into one datatrove pipeline with its neighbours) or needs the whole corpus at once (a
deduplication: `corpus_stages`, datatrove's multi-stage jobs, run between two such pipelines).

Most of the judging is datatrove's own code (its Gopher/C4/FineWeb filters, its MinHash and
exact dedup); a slimlm step is the thin part around it: strict parameters whose defaults are the
published ones, the removed documents kept for `slimlm curate inspect`, and token accounting.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.registry import Registry


@dataclass
class NoParams:
    """A step without settings."""


@dataclass
class StepContext:
    """What a step is built with: where its files go and how the corpus is sharded."""

    work: Path  # the run's work folder
    label: str  # "03-gopher_quality": names the step's folders
    tasks: int  # shards of the corpus (each datatrove task reads one)
    token_counter: Any = None  # TokenCounter of the run (text-changing steps recount)
    workers: int = 1  # processes that run a stage's tasks at once on one machine

    def threads(self) -> int:
        """CPU threads for a step that runs a model in each worker: the cores shared out, since
        two processes each spinning all cores' threads run a model several times slower."""
        from slimlm.hardware import default_threads

        return max(1, default_threads() // max(1, min(self.workers, self.tasks)))

    def removed_writer(self):
        """Where the documents this step removes go (with `filter_reason` in their metadata)."""
        from datatrove.pipeline.writers import JsonlWriter

        return JsonlWriter(str(self.work / "removed" / self.label), output_filename="${rank}.jsonl.gz")

    def folder(self, name: str) -> Path:
        return self.work / "steps" / self.label / name


@dataclass
class Stage:
    """One datatrove job: a pipeline run as `tasks` tasks (a task is a shard, or a bucket)."""

    name: str
    pipeline: list
    tasks: int


@dataclass
class CorpusPlan:
    """What a whole-corpus step runs: `stages` in order, then `filters` first in the pipeline that
    reads `source` (the shards the stages read, or new shards they wrote, such as scored copies)."""

    stages: list
    filters: list
    source: Path


class CurateStep:
    """One step of a recipe. Subclass it, set `help` and `params`, implement one of the two
    builders, and decorate the class with `@register_step("name")`."""

    name = ""  # set by register_step
    help = ""  # one line for `slimlm curate --help`
    params: type = NoParams  # a dataclass: a recipe's settings for this step, loaded strictly
    whole_corpus = False  # True: corpus_stages (needs every document at once)

    def check(self, params) -> None:
        """A SlimlmError if the settings cannot work (called before any work is done)."""

    def document_steps(self, params, ctx: StepContext) -> list:
        """datatrove PipelineSteps that judge or rewrite one document at a time."""
        raise NotImplementedError

    def corpus_stages(self, params, ctx: StepContext, source: Path) -> CorpusPlan:
        """The stages that read the shards in `source` and prepare, and the filter steps that then
        run first in the pipeline reading the plan's source, shard for shard."""
        raise NotImplementedError


CURATE_STEPS: Registry[CurateStep] = Registry("curation step", CurateStep, unknown="curation step")
register_step = CURATE_STEPS.register


def params_of(datatrove_class, skip: tuple[str, ...] = ("exclusion_writer", "language"), name: str = "") -> type:
    """A dataclass of a datatrove filter's own keyword arguments and defaults.

    The defaults are the thresholds each rule set was published with (Gopher, C4, FineWeb), as
    datatrove encodes them; reading them from its signature keeps one source of truth instead of a
    copy that could drift. Tuples become lists, which is what YAML writes."""
    fields = []
    for p in inspect.signature(datatrove_class.__init__).parameters.values():
        if p.name == "self" or p.name in skip or p.default is inspect.Parameter.empty:
            continue
        default = [list(v) for v in p.default] if _pairs(p.default) else p.default
        # datatrove's own annotation (int | None, float, bool...) checks a recipe's value, except
        # pairs of (n, fraction), which YAML writes as lists of lists
        kind = Any if _pairs(p.default) or p.annotation is inspect.Parameter.empty else p.annotation
        value = dataclasses.field(default_factory=lambda d=default: [list(v) for v in d]) if _pairs(p.default) \
            else default
        fields.append((p.name, kind, value))
    return dataclasses.make_dataclass(name or f"{datatrove_class.__name__}Params", fields)


def _pairs(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, tuple) for v in value)


def step_help() -> str:
    return CURATE_STEPS.describe()


def check_positive(params, *names: str) -> None:
    for n in names:
        value = getattr(params, n)
        if value is not None and value <= 0:
            raise SlimlmError(f"{n} must be positive, not {value}")
