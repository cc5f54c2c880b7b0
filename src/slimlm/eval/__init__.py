"""`slimlm eval`: does a small model meet my needs? Quality on a task, with the systems numbers
(speed, memory, energy, cost) measured beside it, recorded in the run registry.

    from slimlm.eval import evaluate
    result = evaluate("smollm2-135m-instruct", "perplexity:python-docs", limit=10)
    print(result.metrics["perplexity"])
"""

from __future__ import annotations

import time

from slimlm.errors import SlimlmError
from slimlm.eval.result import EvalResult
from slimlm.eval.tasks import TASK_KINDS, parse_task

LOGLIK_KINDS = ("perplexity", "multiple_choice", "classification")


def choose_backend(ref, kind: str, backend: str) -> str:
    """`auto` for evaluation: log-likelihood tasks are prefill-bound, where torch measured 2.5x
    llama.cpp's prompt speed on a 2-core CPU (bench/RESULTS.md); generation is decode-bound,
    where llama.cpp is faster on GGUF files."""
    from slimlm.models.backends import pick_backend

    if backend == "auto" and kind in LOGLIK_KINDS:
        return "torch"
    return pick_backend(ref, backend)


def _open(ref, name: str, kind: str, context: int):
    from slimlm.models.backends import open_backend

    if name == "llamacpp" and kind in LOGLIK_KINDS:
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
    if reference and kind != "perplexity":
        raise SlimlmError("--reference applies to perplexity tasks (fidelity on the same text)")
    report = JsonlReport()
    # Read and validate the data before loading a model, so bad input fails in a second.
    docs = records = None
    if kind == "perplexity":
        from slimlm.data import text_documents

        docs = text_documents(argument, field, skip_bad_lines=skip_bad_lines, report=report)
    elif kind != "humaneval":
        from slimlm.eval.prompts import load_examples

        records = load_examples(argument, skip_bad_lines=skip_bad_lines, report=report)
        records = records[:limit] if limit else records
    ref = resolve(model)
    name = choose_backend(ref, kind, backend)
    start = time.perf_counter()
    engine = _open(ref, name, kind, context)
    load_s = time.perf_counter() - start
    n_shots = shots if shots is not None else getattr(argument, "shots", 0)
    result = _run(kind, argument, engine, docs=docs, records=records, limit=limit, batch_size=batch_size,
                  seed=seed, shots=n_shots, chat=chat, context=context, stride=stride, reference=reference,
                  reference_backend=reference_backend, samples=samples)
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


def _run(kind, argument, engine, *, docs, records, limit, batch_size, seed, shots, chat, context, stride,
         reference, reference_backend, samples) -> EvalResult:
    if kind == "humaneval":
        from slimlm.eval.humaneval import run_humaneval

        return run_humaneval(engine, limit=limit, samples=samples, seed=seed, chat=bool(chat), shots=shots)
    if kind == "generation":
        from slimlm.eval.generation import run_generation
        from slimlm.eval.prompts import use_chat

        return run_generation(engine, argument, records, shots=shots, seed=seed,
                              chat=use_chat(argument, chat, engine, generating=True))
    from slimlm.eval.loglik import make_scorer

    scorer = make_scorer(engine, batch_size=batch_size)
    if kind == "perplexity":
        from slimlm.eval.perplexity import run_perplexity

        if chat:
            raise SlimlmError("perplexity scores plain text: drop --chat")
        ref_scorer = ref_engine = None
        if reference:
            from slimlm.models.reference import resolve

            ref_model = resolve(reference)
            ref_engine = _open(ref_model, choose_backend(ref_model, kind, reference_backend), kind, context)
            ref_scorer = make_scorer(ref_engine, batch_size=batch_size)
        try:
            return run_perplexity(scorer, docs, source=argument, context=context, stride=stride, limit=limit,
                                  reference=ref_scorer, reference_name=reference)
        finally:
            if ref_engine is not None:
                ref_engine.close()
    from slimlm.eval.choice import run_choice
    from slimlm.eval.prompts import use_chat

    return run_choice(scorer, engine, argument, records, shots=shots, seed=seed,
                      chat=use_chat(argument, chat, engine, generating=False))


__all__ = ["EvalResult", "TASK_KINDS", "evaluate"]
