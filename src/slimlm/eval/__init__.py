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


DTYPES = ("auto", "fp32", "bf16")


def eval_dtype(kind: str, dtype: str | None) -> str:
    """The compute precision a task runs in: log-likelihood tasks score in fp32 unless asked, so a
    score does not change with the CPU (`auto` picks bf16 on CPUs with native bf16); generation
    keeps `auto`, the fastest plan measured on this machine."""
    if dtype is not None and dtype not in DTYPES:
        raise SlimlmError(f"--dtype must be one of {', '.join(DTYPES)} (got '{dtype}')")
    return dtype or ("fp32" if get_task_kind(kind).needs_loglik else "auto")


def _open(ref, name: str, kind: str, context: int, dtype: str | None = None):
    from slimlm.models.backends import BACKENDS, open_backend

    cls, kwargs = BACKENDS[name], {}
    if get_task_kind(kind).needs_loglik:
        # Scoring needs the logits of every position, and the window must fit in the context.
        kwargs.update(cls.scoring_options(max(context, 512)))
    if cls.supports("dtype"):
        kwargs["dtype"] = eval_dtype(kind, dtype)
    return open_backend(ref, name, **kwargs)


def evaluate(model: str, task: str, *, backend: str = "auto", limit: int | None = None, batch_size: int = 1,
             seed: int = 0, shots: int | None = None, chat: bool | None = None, context: int = 2048,
             stride: int | None = None, field: str | None = None, reference: str | None = None,
             reference_backend: str = "auto", skip_bad_lines: bool = False, samples: int = 1,
             systems: bool = True, record: bool = True, cost=None, dtype: str | None = None) -> EvalResult:
    """Run one task on one model. See TASK_KINDS for the tasks and `slimlm eval --help` for options.
    dtype: auto, fp32 or bf16 on torch; None is fp32 for log-likelihood tasks, auto for generation."""
    from slimlm.data import JsonlReport
    from slimlm.models.reference import resolve

    kind, argument = parse_task(task)
    if limit is not None and limit < 1:
        raise SlimlmError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise SlimlmError(f"--batch-size must be at least 1 (got {batch_size})")
    eval_dtype(kind, dtype)  # a bad --dtype fails in a second, before data or model load
    task_kind = get_task_kind(kind)
    if reference and not task_kind.takes_reference:
        raise SlimlmError("--reference applies to perplexity tasks (fidelity on the same text)")
    options = EvalOptions(limit=limit, batch_size=batch_size, seed=seed,
                          shots=shots if shots is not None else getattr(argument, "shots", 0), chat=chat,
                          context=context, stride=stride, field=field, reference=reference,
                          reference_backend=reference_backend, skip_bad_lines=skip_bad_lines, samples=samples,
                          open_model=lambda spec, name, kind_name: _open_model(spec, name, kind_name, context, dtype))
    report = JsonlReport()
    # Read and validate the data before loading a model, so bad input fails in a second.
    data = task_kind.load(argument, options, report)
    ref = resolve(model)
    name = choose_backend(ref, kind, backend)
    _check_dtype(name, dtype)
    start = time.perf_counter()
    engine = _open(ref, name, kind, context, dtype)
    load_s = time.perf_counter() - start
    result = task_kind.run(argument, data, engine, options)
    result.task, result.model, result.backend = task, ref.spec, engine.label
    result.params.update({"backend": engine.label, "precision": engine.precision(), "limit": limit,
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


def check_task(task: str, limit: int | None = None) -> int:
    """Parse `task` and read its data as `evaluate` would, without a model: the number of examples
    it holds, or the one-line SlimlmError `evaluate` would raise. For verbs that run a task many
    times (shrink) and must fail in a second, before any long work."""
    from slimlm.data import JsonlReport

    kind, argument = parse_task(task)
    data = get_task_kind(kind).load(argument, EvalOptions(limit=limit), JsonlReport())
    return len(data) if hasattr(data, "__len__") else 0


def _check_dtype(name: str, dtype: str | None) -> None:
    from slimlm.models.backends import BACKENDS

    if dtype not in (None, "auto") and not BACKENDS[name].supports("dtype"):
        raise SlimlmError(f"--dtype applies to the torch backend: the {name} backend computes in the model file's own "
                          "types (drop --dtype, or use --backend torch)")


def _open_model(model: str, backend: str, kind: str, context: int, dtype: str | None = None):
    """A second model for a task (perplexity's --reference), opened as the evaluated one is."""
    from slimlm.models.reference import resolve

    ref = resolve(model)
    return _open(ref, choose_backend(ref, kind, backend), kind, context, dtype)


__all__ = ["EvalResult", "TASK_KINDS", "check_task", "evaluate"]
