"""The measurements every shrink candidate gets, the same for each so they compare.

Cheap proxies first, in the search's own process: fidelity to the parent (KL, top-1 agreement and
perplexity on held-out text that calibration never sees, via quantize's `quick_fidelity`) and a
short decode timing in llama.cpp. Then, for candidates that can still reach the front, the full
evaluation: each task's score and the systems numbers `slimlm eval` reports (time to first token,
decode tokens/s, peak memory, energy and cost per 1M tokens), on llama.cpp, the backend that
serves a GGUF file.

The full evaluation runs in a child process (spawned, one at a time): a process's peak memory only
grows, so measured in the search's own process every candidate would inherit the largest one
before it; a child gives each candidate its own peak, and a crash in a native library costs one
candidate, not the search.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from slimlm.errors import SlimlmError

PROBE_TOKENS = 32
FIDELITY_TOKENS = 512
SYSTEMS_KEYS = ("ttft_s", "decode_tps", "prefill_tps", "peak_rss_bytes", "energy_j_per_1k_tokens",
                "cost_per_1m_tokens_local", "api_cost_per_1m", "precision", "backend")


def fidelity(artifact: Path, parent: Path) -> dict:
    """KL, top-1 agreement and perplexity of `artifact` against the parent (torch, fp32) on held-out text."""
    from slimlm.compress.quant_pipeline import quick_fidelity

    return quick_fidelity(artifact, parent, tokens=FIDELITY_TOKENS)


def decode_probe(artifact: Path) -> float:
    """Decode tokens/s over PROBE_TOKENS greedy tokens in llama.cpp: the speed proxy (a second or two)."""
    from slimlm.models import GenerationParams
    from slimlm.models.backends import open_backend

    backend = open_backend(str(artifact), "llamacpp")
    try:
        params = GenerationParams(max_tokens=PROBE_TOKENS, temperature=0.0, seed=0)
        backend.generate("The history of", GenerationParams(max_tokens=2), raw=True)  # warm-up
        timings = backend.generate("The history of the city begins", params, raw=True).timings
        return float(timings.decode_tps)
    finally:
        backend.close()


def _task_result(result) -> dict:
    return {"score": float(result.score), "primary": result.primary, "higher_is_better": result.higher_is_better,
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
            "examples": result.examples, "run_id": result.params.get("run_id")}


def evaluate_tasks(artifact: str, tasks: list[str], limit: int | None) -> dict:
    """Every task's score and the systems numbers of one model file (runs in the child process)."""
    from slimlm.eval import evaluate

    scores, systems = {}, {}
    start = time.perf_counter()
    for i, task in enumerate(tasks):
        result = evaluate(artifact, task, backend="llamacpp", limit=limit, systems=(i == 0))
        scores[task] = _task_result(result)
        if i == 0:
            systems = {k: result.systems.get(k) for k in SYSTEMS_KEYS}
    return {"scores": scores, "systems": systems, "seconds": time.perf_counter() - start}


def _die_with_parent() -> None:
    """In the child: end when the search process dies (Linux), so a killed search leaves no
    evaluation running on behind it; elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def evaluate_in_child(artifact: Path, tasks: list[str], limit: int | None) -> dict:
    """evaluate_tasks in a fresh spawned process (its own peak memory); a SlimlmError comes back as one."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_die_with_parent) as pool:
        try:
            return pool.submit(evaluate_tasks, str(artifact), list(tasks), limit).result()
        except SlimlmError:
            raise
        except Exception as exc:  # noqa: BLE001 - a crash of the child is this candidate's failure
            raise SlimlmError(f"evaluating {artifact.name} failed: {type(exc).__name__}: {exc}") from exc


def relative(score: float, parent: float, higher_is_better: bool) -> float:
    """The fraction of the parent's quality kept (1.0 = as good; for lower-is-better metrics the ratio inverts)."""
    if higher_is_better:
        return score / parent if parent else (1.0 if score >= parent else 0.0)
    return parent / score if score else 1.0
