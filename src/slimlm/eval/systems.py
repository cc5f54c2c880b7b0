"""Systems numbers for a model on this machine: speed, memory, size, energy and cost.

Behind `slimlm bench MODEL`, and attached (with quick=True) to every `eval` result, so a
quality score always travels with what it costs to get. Everything is measured on the backend
the user will actually run, with real text (Python's reference docs, shipped with Python) cut
to the requested prompt lengths, greedy and raw so no chat template changes the token counts.

The returned dict (JSON-serialisable) has these keys:

- model, backend, precision, machine (cpu_info().to_dict()), quick, repeat, gen_tokens
- load_s: seconds to open the backend (None when measure_systems got an already-open one)
- prompt_lengths: the lengths measured (as requested; ones over the context are skipped, see notes)
- prompt_tokens: {"128": tokens the prompt actually had, ...} (within a couple of the request)
- ttft_s, decode_tps: {median, min, max} at the first measured prompt length, over `repeat` runs
- ttft_s_by_length, decode_tps_by_length, prefill_tps: {"128": {median, min, max}, ...};
  prefill tokens/s is prompt tokens / time to first token (tokenizing and one sampling step
  included, as a user waits for them too)
- peak_rss_bytes: the peak resident memory of this whole process so far (ru_maxrss), so it
  includes anything loaded before, not only this model
- size_bytes, params_total, params_active, flops_per_token: read from the model files (models.info)
- workload: {requests, input_tokens, output_tokens, seconds} of the timed generations
- energy_j_per_1k_tokens: energy of the whole timed workload (prefill included) per 1000
  generated tokens; energy_source: "measured (RAPL)" or e.g. "estimated (CPU time × 10 W/core)"
- cost_per_1m_tokens_local: USD per 1M tokens (input + output, in the workload's mix) on this
  machine; cost_breakdown: hardware/energy parts and the assumptions they rest on
- api_cost_per_1m: {api model: USD per 1M tokens of the same mix}; api_prices_as_of
- notes: skipped lengths, early stops, what the energy figure leaves out
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from slimlm.errors import BackendUnavailable, SlimlmError
from slimlm.eval.cost import CostConfig, EnergyMeter, api_cost_per_1m, load_api_prices, local_cost_per_1m
from slimlm.models.backends.base import Backend, GenerationParams

QUICK_GEN_TOKENS = 16
_STRIDE = 20011  # characters between the starts of successive prompts in the corpus


def _check_inputs(prompt_lengths: Sequence[int], gen_tokens: int, repeat: int) -> list[int]:
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise SlimlmError(f"--repeat must be a whole number >= 1 (got {repeat!r})")
    if isinstance(gen_tokens, bool) or not isinstance(gen_tokens, int) or gen_tokens < 1:
        raise SlimlmError(f"--gen-tokens must be a whole number >= 1 (got {gen_tokens!r})")
    lengths = list(prompt_lengths or [])
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise SlimlmError(f"--prompt-lengths must be one or more whole numbers >= 1 (got {prompt_lengths!r})")
    return lengths


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _prompt(backend: Backend, corpus: str, index: int, tokens: int) -> str:
    """Real text that tokenizes to `tokens` tokens (or just under), a different passage per index.

    Every prompt starts elsewhere in the corpus because llama.cpp reuses the KV cache of a
    shared prefix, which would make a repeated prompt's prefill look nearly free.
    """
    start = (index * _STRIDE) % max(1, len(corpus) // 2)
    start = corpus.find("\n", start) + 1
    text = corpus[start:]
    hi = min(len(text), tokens * 8 + 64)
    while len(backend.tokenize(text[:hi])) < tokens and hi < len(text):
        hi = min(len(text), hi * 2)
    lo = 1  # largest prefix with at most `tokens` tokens, by bisection over characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(backend.tokenize(text[:mid])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def _context_length(backend: Backend) -> int | None:
    try:
        return backend.context_length
    except BackendUnavailable:  # a backend that does not know it: every length is tried
        return None


def _uses_accelerator(backend: Backend) -> bool:
    return backend.uses_accelerator()


def _peak_rss_bytes() -> int:
    """The process's peak resident memory. On Linux, VmHWM of /proc/self/status: getrusage's ru_maxrss
    survives exec, so a process spawned by a large one (shrink measures each candidate in a child)
    would report its parent's peak."""
    import sys

    import psutil

    current = psutil.Process().memory_info().rss
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return max(current, int(line.split()[1]) * 1024)  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(current, peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        return max(current, getattr(psutil.Process().memory_info(), "peak_wset", 0))


def measure_systems(backend: Backend, *, load_s: float | None = None, prompt_lengths: Sequence[int] = (128, 512),
                    gen_tokens: int = 64, repeat: int = 3, cost: CostConfig | None = None,
                    quick: bool = False) -> dict:
    """Measure an open backend: speed per prompt length (median and spread), memory, energy, cost."""
    from slimlm.hardware import cpu_info
    from slimlm.models.info import model_info
    from slimlm.progress import progress_bar

    lengths = _check_inputs(prompt_lengths, gen_tokens, repeat)
    cost = (cost or CostConfig()).validate()
    prices = load_api_prices(cost.api_prices)
    if quick:
        repeat, gen_tokens = 1, min(gen_tokens, QUICK_GEN_TOKENS)
    notes: list[str] = []
    ctx = _context_length(backend)
    fitting = [n for n in lengths if ctx is None or n + gen_tokens <= ctx]
    for n in lengths:
        if n not in fitting:
            notes.append(f"prompt length {n} skipped: with {gen_tokens} generated tokens it exceeds "
                         f"the model's context of {ctx}")
    if not fitting:
        raise SlimlmError(f"no prompt length in {lengths} fits the model's context of {ctx} tokens "
                          f"with {gen_tokens} generated: pass shorter --prompt-lengths")
    lengths = fitting[:1] if quick else list(dict.fromkeys(fitting))

    corpus = _corpus()
    plan = [(r, n, _prompt(backend, corpus, 1 + r * len(lengths) + i, n))
            for r in range(repeat) for i, n in enumerate(lengths)]
    params = GenerationParams(max_tokens=gen_tokens, temperature=0.0, seed=0)
    backend.generate(_prompt(backend, corpus, 0, 8) or "def", GenerationParams(max_tokens=2), raw=True)  # warm-up

    runs: dict[int, list] = {n: [] for n in lengths}
    with progress_bar(f"bench {backend.ref.spec}", len(plan)) as advance, EnergyMeter(cost) as meter:
        for _, n, prompt in plan:
            runs[n].append(backend.generate(prompt, params, raw=True).timings)
            meter.sample()
            advance()

    first = lengths[0]
    input_tokens = sum(t.prompt_tokens for ts in runs.values() for t in ts)
    output_tokens = sum(t.generated_tokens for ts in runs.values() for t in ts)
    short = [t.generated_tokens for ts in runs.values() for t in ts if t.generated_tokens < gen_tokens]
    if short:
        notes.append(f"{len(short)} of {len(plan)} generations stopped early (the model ended the text); "
                     "decode speed uses those with at least 2 tokens")
    if _uses_accelerator(backend):
        notes.append("energy counts the CPU only: the GPU's energy is not included")
    if meter.measured:
        notes.append("RAPL energy is the whole CPU package's, other processes included")
    decode = {n: [t.decode_tps for t in ts if t.generated_tokens >= 2 and t.decode_tps > 0] for n, ts in runs.items()}

    total_tokens = input_tokens + output_tokens
    local = local_cost_per_1m(meter.seconds / total_tokens, meter.joules / total_tokens, cost)
    try:
        info = model_info(backend.ref)
        size, total_params, active_params = info.size_bytes, info.params_total, info.params_active
        flops = info.flops_per_token
    except SlimlmError as exc:
        size = total_params = active_params = flops = None
        notes.append(f"size and parameters unavailable: {exc}")

    return {
        "model": backend.ref.spec, "backend": backend.label, "precision": backend.precision(),
        "machine": cpu_info().to_dict(), "quick": quick, "repeat": repeat, "gen_tokens": gen_tokens,
        "load_s": load_s, "prompt_lengths": lengths,
        "prompt_tokens": {str(n): int(statistics.median(t.prompt_tokens for t in runs[n])) for n in lengths},
        "ttft_s": _spread([t.ttft_s for t in runs[first]]),
        "decode_tps": _spread(decode[first]),
        "ttft_s_by_length": {str(n): _spread([t.ttft_s for t in runs[n]]) for n in lengths},
        "decode_tps_by_length": {str(n): _spread(decode[n]) for n in lengths},
        "prefill_tps": {str(n): _spread([t.prefill_tps for t in runs[n]]) for n in lengths},
        "peak_rss_bytes": _peak_rss_bytes(),
        "size_bytes": size, "params_total": total_params, "params_active": active_params,
        "flops_per_token": flops,
        "workload": {"requests": len(plan), "input_tokens": input_tokens, "output_tokens": output_tokens,
                     "seconds": meter.seconds},
        "energy_j_per_1k_tokens": 1000 * meter.joules / output_tokens if output_tokens else None,
        "energy_source": meter.source,
        "cost_per_1m_tokens_local": local["total_usd"],
        "cost_breakdown": {**local, "basis": "USD per 1M tokens (input + output, measured mix); hardware part "
                           "assumes the machine runs only this workload around the clock for its life",
                           "assumptions": cost.assumptions()},
        "api_cost_per_1m": api_cost_per_1m(input_tokens, output_tokens, prices),
        "api_prices_as_of": prices["as_of"],
        "notes": notes,
    }


def run_bench(model: str, choice: str = "auto", *, record: bool = True, **kwargs) -> dict:
    """Open `model` (timing the load), measure it with measure_systems(**kwargs), close it, and
    record the run (its id is the result's `run_id`) as every verb's library function does."""
    from slimlm.models.backends import open_backend
    from slimlm.models.reference import resolve

    lengths, gen_tokens, repeat = kwargs.get("prompt_lengths", (128, 512)), kwargs.get("gen_tokens", 64), kwargs.get("repeat", 3)
    _check_inputs(lengths, gen_tokens, repeat)
    ref = resolve(model)
    start = time.perf_counter()
    backend = open_backend(ref, choice)  # the reference resolved once, above
    load_s = time.perf_counter() - start
    try:
        result = measure_systems(backend, load_s=load_s, **kwargs)
    finally:
        backend.close()
    if record:
        from slimlm.runs import record as record_run

        result["run_id"] = record_run("bench", ref, params={"backend": result["backend"], "repeat": repeat,
                                                            "prompt_lengths": list(lengths), "gen_tokens": gen_tokens},
                                      metrics={"systems": result})
    return result
