"""The main job for now: the built-in SmolLM2 on both backends, three prompts, one table.

It shows a newcomer the whole loop in a minute: a real model from a package, no download,
two inference engines behind one interface, and speed measured on this machine.
"""

from __future__ import annotations

import time

import psutil
from rich.console import Console
from rich.table import Table

from slimlm.hardware import cpu_info
from slimlm.models.backends import GenerationParams, open_backend
from slimlm.models.reference import resolve

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence explaining what a small language model is.",
    "List three prime numbers.",
]


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def run_backend(which: str, max_tokens: int, ref=None) -> dict:
    """Load the model (`ref`, a ModelRef resolved once by the caller; default MODEL) on the
    backend `which`, answer the prompts, and record the run."""
    from slimlm.runs import record

    ref = ref or resolve(MODEL)
    before = _rss_mb()
    start = time.perf_counter()
    engine = open_backend(ref, which)
    load_s = time.perf_counter() - start
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    ttfts, rates, answers, peak = [], [], [], _rss_mb()
    for prompt in PROMPTS:
        completion = engine.generate(prompt, params)
        ttfts.append(completion.timings.ttft_s)
        if completion.timings.decode_tps:
            rates.append(completion.timings.decode_tps)
        answers.append(completion.text.strip())
        peak = max(peak, _rss_mb())
    row = {"backend": engine.label, "detail": engine.precision(),
           "load_s": load_s, "ttft_ms": 1000 * sum(ttfts) / len(ttfts),
           "decode_tps": sum(rates) / len(rates) if rates else 0.0, "peak_mb": peak, "added_mb": peak - before,
           "answers": answers}
    record("quickstart", ref, params={"backend": engine.label, "max_tokens": max_tokens},
           metrics={k: v for k, v in row.items() if isinstance(v, float)})
    engine.close()
    return row


def run_quickstart(console: Console | None = None, max_tokens: int = 48) -> list[dict]:
    console = console or Console()
    console.print(f"[bold]slimlm quickstart[/bold]: {MODEL} on {cpu_info().describe()}")
    ref, rows = resolve(MODEL), []
    for which in ("llamacpp", "torch"):
        with console.status(f"loading {MODEL} on {which} and answering {len(PROMPTS)} prompts"):
            rows.append(run_backend(which, max_tokens, ref))
    for i, prompt in enumerate(PROMPTS):
        console.print(f"\n[bold]> {prompt}[/bold]")
        for row in rows:
            console.print(f"  [cyan]{row['backend']:>8}[/cyan]: {row['answers'][i][:200]}")
    table = Table(title=f"{MODEL}: {len(PROMPTS)} prompts, up to {max_tokens} tokens each, greedy")
    for col in ("backend", "precision", "load (s)", "first token (ms)", "decode (tokens/s)", "peak memory (MiB)"):
        table.add_column(col, justify="left" if col in ("backend", "precision") else "right")
    for row in rows:
        table.add_row(row["backend"], row["detail"], f"{row['load_s']:.1f}", f"{row['ttft_ms']:.0f}",
                      f"{row['decode_tps']:.1f}", f"{row['peak_mb']:.0f}")
    console.print()
    console.print(table)
    return rows
