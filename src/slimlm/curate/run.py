"""Running a recipe: read the corpus into shards, chain the steps into datatrove jobs, count what
each step kept and removed, and publish the result all at once.

The recipe becomes a few datatrove pipelines. Steps that judge one document at a time share one
pipeline (reader -> steps -> writer, one task per shard); a deduplication step needs the whole
corpus, so the pipeline before it ends there, its own stages run (signatures, buckets,
clusters), and its filter opens the next pipeline, which reads the same shards again. After
each step a `Tally` counts the documents and tokens that got through, so the funnel does not
depend on what each datatrove block chooses to record.

Everything is written under `.OUT.work/` beside OUT. datatrove marks each finished task, so a
run killed at any moment and started again redoes only the tasks that had not finished (a task's
files are rewritten whole, never appended to); OUT itself appears only at the end, by one rename.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from slimlm.curate.ingest import chat_messages, ingest
from slimlm.curate.recipe import Recipe, load_recipe
from slimlm.curate.steps import CURATE_STEPS, Stage, StepContext
from slimlm.curate.tokens import TokenCounter
from slimlm.errors import SlimlmError

EXECUTORS = ("local", "ray")


class Tally(PipelineStep):
    """Counts the documents and tokens that reach it (one per recipe step, after the step)."""

    name = "tally"
    type = "🧮 - TALLY"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("documents")
            self.stat_update("tokens", value=int(doc.metadata.get("token_count", 0)))
            yield doc


def output_record(writer, doc) -> dict:
    """One curated document as the output JSONL holds it: text (or chat messages), id, metadata."""
    meta = dict(doc.metadata)
    meta.pop("file_path", None)  # the shard it was read from (datatrove's); `source` is the user's file
    record = {"id": doc.id, "text": doc.text, "metadata": meta}
    if meta.get("chat"):
        record["messages"] = chat_messages(doc.text)
    return record


@dataclass
class RunOptions:
    text_field: str = "text"
    on_error: str = "fail"  # a bad record: fail, or skip and report
    tasks: int = 4  # shards (a datatrove task each)
    workers: int = 0  # processes at once (0: one per CPU core)
    executor: str = "local"  # local (multiprocessing) or ray
    address: str | None = None  # a Ray cluster's address (executor ray); None starts a local one
    output_format: str = "jsonl"  # jsonl or parquet


@dataclass
class CurateResult:
    out: Path
    funnel: list[dict]
    input: dict
    seconds: float
    skipped: list[str] = field(default_factory=list)


def _workers(options: RunOptions) -> int:
    """Processes that run a stage's tasks at once (0 asks for one per CPU core)."""
    return options.workers or os.cpu_count() or 1


def _executor(stage: Stage, logs: Path, options: RunOptions):
    workers = _workers(options)
    if options.executor == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                   logging_dir=str(logs), skip_completed=True)
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                 logging_dir=str(logs), skip_completed=True)


class _Runner:
    def __init__(self, recipe: Recipe, work: Path, options: RunOptions, say):
        self.recipe, self.work, self.options, self.say = recipe, work, options, say
        self.stages: list[tuple[str, list]] = []  # (logs folder, label per pipeline element)

    def run_stage(self, stage: Stage, labels: list, name: str) -> None:
        logs = self.work / "logs" / name
        self.say(f"{name}: {stage.name} ({stage.tasks} task{'s' * (stage.tasks > 1)})")
        if self.options.executor == "ray":
            import ray

            if not ray.is_initialized():
                ray.init(address=self.options.address, ignore_reinit_error=True, log_to_driver=False)
        try:
            with _stderr_to(self.work / "logs" / "datatrove.log"):
                _executor(stage, logs, self.options).run()
        except SlimlmError as exc:
            raise SlimlmError(f"{name} ({stage.name}) failed: {exc}: rerun the same command to continue") from exc
        except Exception as exc:  # a worker's error, re-raised here by the executor
            raise SlimlmError(f"{name} failed ({type(exc).__name__}: {exc}): the log is {logs}/logs; rerun the same "
                              "command to continue from the tasks that finished") from exc
        self.stages.append((str(logs), labels))

    def pipeline(self, source: Path, elements: list[tuple[str | None, PipelineStep]], dest: Path, name: str,
                 final: bool) -> None:
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

        if final and self.options.output_format == "parquet":
            writer = ParquetWriter(str(dest), output_filename="${rank}.parquet", adapter=output_record)
        else:
            writer = JsonlWriter(str(dest), output_filename="${rank}.jsonl.gz", adapter=output_record if final else None)
        steps = [JsonlReader(str(source))] + [e for _, e in elements] + [writer]
        labels = [None] + [label for label, _ in elements] + [None]
        self.run_stage(Stage("documents" if not final else "documents -> output", steps, self.options.tasks),
                       labels, name)


def curate(recipe: str | Path | dict | Recipe, inputs: list[str | Path], out: str | Path, options: RunOptions | None = None,
           force: bool = False, say=print) -> CurateResult:
    """Run `recipe` over `inputs` into `out` (data/, removed/, curate.json, report.html)."""
    from slimlm.curate.report import funnel, write_report

    options = options or RunOptions()
    if options.executor not in EXECUTORS:
        raise SlimlmError(f"unknown executor {options.executor!r}: choose one of {', '.join(EXECUTORS)}")
    if options.output_format not in ("jsonl", "parquet"):
        raise SlimlmError(f"unknown output format {options.output_format!r}: choose jsonl or parquet")
    if options.tasks < 1 or options.workers < 0:
        raise SlimlmError("--tasks must be at least 1 and --workers at least 0")
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another --out or pass --force to replace it")
    counter = TokenCounter(recipe.tokenizer)
    counter.check()
    start = time.perf_counter()
    work = out.parent / f".{out.name}.work"
    plan = {"recipe": recipe.as_dict(), "inputs": [str(Path(i).resolve()) for i in inputs],
            "options": {k: v for k, v in vars(options).items() if k not in ("workers", "executor", "address")}}
    _claim(work, plan, force)

    ingested = work / "ingest.json"
    if not ingested.exists():
        say(f"reading {len(inputs)} input{'s' * (len(inputs) > 1)}")
        try:
            report = ingest(inputs, work / "shards" / "00-input", options.tasks, counter, options.text_field,
                            options.on_error)
        except BaseException:  # bad input (or a kill) before any step ran: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
            raise
        _write_json(ingested, vars(report))
    input_report = json.loads(ingested.read_text())

    runner = _Runner(recipe, work, options, say)
    source, elements, n = work / "shards" / "00-input", [], 0
    for i, step in enumerate(recipe.steps, start=1):
        cls = CURATE_STEPS.create(step.name)
        ctx = StepContext(work=work, label=f"{i:02d}-{step.name}", tasks=options.tasks, token_counter=counter,
                          workers=_workers(options))
        if cls.whole_corpus:
            if elements:
                n += 1
                dest = work / "shards" / f"{n:02d}"
                runner.pipeline(source, elements, dest, f"{n:02d}-documents", final=False)
                source, elements = dest, []
            corpus_plan = cls.corpus_stages(step.params, ctx, source)
            for k, stage in enumerate(corpus_plan.stages, start=1):
                runner.run_stage(stage, [None] * len(stage.pipeline), f"{ctx.label}-{k}-{stage.name.replace(' ', '_')}")
            source = corpus_plan.source
            elements += [(ctx.label, f) for f in corpus_plan.filters]
        else:
            elements += [(ctx.label, s) for s in cls.document_steps(step.params, ctx)]
        elements.append((ctx.label, Tally()))
    runner.pipeline(source, elements, work / "output" / "data", f"{n + 1:02d}-output", final=True)

    steps = funnel(recipe, input_report, runner.stages)
    for row in steps:  # what a step measured about itself (the grader's F1, the cut): its *.json files
        found = sorted((work / "steps" / row["label"]).rglob("*.json"))
        if found:
            row["details"] = {p.stem: json.loads(p.read_text()) for p in found}
    result = CurateResult(out=out, funnel=steps, input=input_report, seconds=time.perf_counter() - start,
                          skipped=input_report["skipped"])
    final = work / "output"
    if (work / "removed").exists():
        shutil.move(str(work / "removed"), final / "removed")
    _write_json(final / "curate.json", {"recipe": recipe.as_dict(), "inputs": plan["inputs"], "options": plan["options"],
                                        "input": input_report, "funnel": steps, "seconds": round(result.seconds, 2)})
    write_report(final)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(final, out)
    shutil.rmtree(work, ignore_errors=True)
    return result


@contextmanager
def _stderr_to(path: Path):
    """datatrove's workers log every task to stderr (and to their log files); a user wants one
    progress line per stage, so the file descriptor itself points at a log file meanwhile (worker
    processes inherit it, which redirecting sys.stderr would not do)."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _claim(work: Path, plan: dict, force: bool) -> None:
    """Start `work`, or continue it if the same run left it; another run's work is an error."""
    marker = work / "plan.json"
    if work.exists() and marker.exists() and json.loads(marker.read_text()) != plan:
        if not force:
            raise SlimlmError(f"{work} holds an unfinished run with another recipe, inputs or options: rerun that, "
                              "or pass --force to start over")
        shutil.rmtree(work)
    elif work.exists() and force and not marker.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        _write_json(marker, plan)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    tmp.replace(path)
