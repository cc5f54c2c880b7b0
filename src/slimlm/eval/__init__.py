"""`slimlm eval`: does a small model meet my needs? Quality on a task, with the systems numbers
(speed, memory, energy, cost) measured beside it, recorded in the run registry.

    from slimlm.eval import evaluate
    result = evaluate("smollm2-135m-instruct", "perplexity:python-docs", limit=10)
    print(result.metrics["perplexity"])
"""

from __future__ import annotations

import time

from slimlm.errors import SlimlmError
from slimlm.eval.kinds import EvalOptions, get_task_kind
from slimlm.eval.result import EvalResult
from slimlm.eval.tasks import TASK_KINDS, parse_task

# The built-in task kinds register themselves on import (kinds.py), in the order `--help` lists
# them. A new kind is its module plus one line here.
# isort: off
from slimlm.eval import perplexity  # noqa: F401
from slimlm.eval import choice  # noqa: F401  multiple_choice, classification
from slimlm.eval import generation  # noqa: F401
from slimlm.eval import humaneval  # noqa: F401
# isort: on


def choose_backend(ref, kind: str, backend: str) -> str:
    """`auto` for evaluation: log-likelihood tasks are prefill-bound, where torch measured 2.5x
    llama.cpp's prompt speed on a 2-core CPU (bench/RESULTS.md); generation is decode-bound,
    where llama.cpp is faster on GGUF files."""
    from slimlm.models.backends import pick_backend

    if backend == "auto" and get_task_kind(kind).needs_loglik:
        return "torch"
    return pick_backend(ref, backend)


def _open(ref, name: str, kind: str, context: int):
    from slimlm.models.backends import open_backend

    if name == "llamacpp" and get_task_kind(kind).needs_loglik:
        # Scoring needs the logits of every position, and the window must fit in the context.
        return open_backend(str(ref.path), "llamacpp", logits_all=True, n_ctx=max(context, 512))
    return open_backend(str(ref.path), name)


def evaluate(model: str, task: str, *, backend: str = "auto", limit: int | None = None, batch_size: int = 1,
             seed: int = 0, shots: int | None = None, chat: bool | None = None, context: int = 2048,
             stride: int | None = None, field: str | None = None, reference: str | None = None,
             reference_backend: str = "auto", skip_bad_lines: bool = False, samples: int = 1,
             systems: bool = True, record: bool = True, cost=None) -> EvalResult:
    """Run one task on one model. See TASK_KINDS for the tasks and `slimlm eval --help` for options."""
    from slimlm.data import JsonlReport
    from slimlm.models.reference import resolve

    kind, argument = parse_task(task)
    if limit is not None and limit < 1:
        raise SlimlmError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise SlimlmError(f"--batch-size must be at least 1 (got {batch_size})")
    task_kind = get_task_kind(kind)
    if reference and not task_kind.takes_reference:
        raise SlimlmError("--reference applies to perplexity tasks (fidelity on the same text)")
    options = EvalOptions(limit=limit, batch_size=batch_size, seed=seed,
                          shots=shots if shots is not None else getattr(argument, "shots", 0), chat=chat,
                          context=context, stride=stride, field=field, reference=reference,
                          reference_backend=reference_backend, skip_bad_lines=skip_bad_lines, samples=samples,
                          open_model=lambda spec, name, kind_name: _open_model(spec, name, kind_name, context))
    report = JsonlReport()
    # Read and validate the data before loading a model, so bad input fails in a second.
    data = task_kind.load(argument, options, report)
    ref = resolve(model)
    name = choose_backend(ref, kind, backend)
    start = time.perf_counter()
    engine = _open(ref, name, kind, context)
    load_s = time.perf_counter() - start
    result = task_kind.run(argument, data, engine, options)
    result.task, result.model, result.backend = task, ref.spec, engine.name
    result.params.update({"backend": engine.name, "precision": engine.precision(), "limit": limit,
                          "batch_size": batch_size, "seed": seed, "field": field,
                          "skipped_lines": len(report.skipped)})
    if systems:
        from slimlm.eval.systems import measure_systems

        result.systems = measure_systems(engine, load_s=load_s, quick=True, cost=cost)
    engine.close()
    if record:
        from slimlm.runs import record as record_run

        result.params["run_id"] = record_run("eval", ref, params=result.params, metrics=result.registry_metrics())
    return result


def _open_model(model: str, backend: str, kind: str, context: int):
    """A second model for a task (perplexity's --reference), opened as the evaluated one is."""
    from slimlm.models.reference import resolve

    ref = resolve(model)
    return _open(ref, choose_backend(ref, kind, backend), kind, context)


__all__ = ["EvalResult", "TASK_KINDS", "evaluate"]
