"""The measuring verbs of the CLI: eval, bench, compare, report. Parsing and printing only; the
work is in slimlm.eval. Split from cli.py to keep each file readable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import BackendOpt, ModelArg, app, out
from slimlm.cli.choices import live_help_option
from slimlm.errors import SlimlmError
from slimlm.eval.tasks import TASK_KINDS, builtin_task_help


def _task_help() -> str:
    """--task's help, from the registry of task kinds (slimlm/eval/kinds.py) and the built-in task
    sets (slimlm/data/builtin_tasks.py) as they are when the CLI runs."""
    return ("What to measure (repeatable): " + "; ".join(TASK_KINDS.values()) + "; or a task file (.yaml). "
            "Built-in task sets: " + builtin_task_help() + ".")


JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else.")


def _cost(watts: float, hardware: float, years: float, kwh: float, prices: Optional[Path]):
    from slimlm.eval.cost import CostConfig

    return CostConfig(cpu_watts_per_core=watts, hardware_usd=hardware, lifetime_years=years,
                      electricity_usd_per_kwh=kwh, api_prices=prices).validate()


WattsOpt = typer.Option(10.0, "--watts-per-core", help="Power of one busy core, for the energy estimate "
                        "when RAPL counters cannot be read (an assumption; measure yours).")
HardwareOpt = typer.Option(1500.0, "--hardware-usd", help="Price of this machine, for the local cost per 1M tokens.")
YearsOpt = typer.Option(3.0, "--lifetime-years", help="Years the machine is written off over.")
KwhOpt = typer.Option(0.15, "--usd-per-kwh", help="Electricity price.")
PricesOpt = typer.Option(None, "--api-prices", help="Your own API price table (YAML, same layout as the shipped "
                         "slimlm/eval/api_prices.yaml).")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _systems_lines(s: dict) -> list[tuple[str, str]]:
    if not s:
        return []
    rows = []
    if s.get("load_s") is not None:
        rows.append(("load", f"{s['load_s']:.2f} s"))
    if s.get("ttft_s"):
        rows.append(("time to first token", f"{s['ttft_s']['median'] * 1000:.0f} ms"))
    if s.get("decode_tps"):
        d = s["decode_tps"]
        rows.append(("decode", f"{d['median']:.1f} tok/s (min {d['min']:.1f}, max {d['max']:.1f})"))
    for length, p in (s.get("prefill_tps") or {}).items():
        if p:
            rows.append((f"prefill @{length}", f"{p['median']:.0f} tok/s"))
    if s.get("peak_rss_bytes"):
        rows.append(("peak memory (process)", f"{s['peak_rss_bytes'] / 2**20:.0f} MiB"))
    if s.get("size_bytes"):
        rows.append(("size on disk", f"{s['size_bytes'] / 2**20:.1f} MiB"))
    if s.get("params_total"):
        rows.append(("parameters", f"{s['params_total'] / 1e6:.1f}M total, {s['params_active'] / 1e6:.1f}M active"))
    if s.get("flops_per_token"):
        rows.append(("compute per token", f"{s['flops_per_token'] / 1e9:.2f} GFLOP (weights; zero context)"))
    if s.get("energy_j_per_1k_tokens") is not None:
        rows.append(("energy / 1k tokens", f"{s['energy_j_per_1k_tokens']:.0f} J, {s['energy_source']}"))
    if s.get("cost_per_1m_tokens_local") is not None:
        rows.append(("cost / 1M tokens here", f"${s['cost_per_1m_tokens_local']:.3f} (assumed hardware and power)"))
    for name, usd in sorted((s.get("api_cost_per_1m") or {}).items(), key=lambda kv: kv[1]):
        rows.append((f"  same on {name}", f"${usd:.3f} (prices as of {s.get('api_prices_as_of')})"))
    return rows


def _print_result(result) -> None:
    table = Table(title=f"{result.model} · {result.task} · {result.backend}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in result.metrics.items():
        table.add_row(("★ " if key == result.primary else "  ") + key, _fmt(value))
    table.add_row("  examples", str(result.examples))
    if result.params.get("precision"):
        table.add_row("  precision", str(result.params["precision"]))
    for key, value in _systems_lines(result.systems):
        table.add_row(f"  {key}", value)
    out.print(table)
    if result.params.get("run_id"):
        out.print(f"[dim]recorded as run {result.params['run_id']} (slimlm compare {result.params['run_id']} ...)[/dim]")


@app.command("eval")
def eval_command(
    model: str = ModelArg,
    task: list[str] = live_help_option(_task_help, ..., "--task", "-T"),
    backend: str = BackendOpt,
    limit: Optional[int] = typer.Option(None, "--limit", "-l", help="Score only the first N documents / examples."),
    batch_size: int = typer.Option(1, "--batch-size", help="Sequences per forward pass when scoring (torch)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="auto|fp32|bf16",
                                        help="Compute precision on torch (default: fp32 for log-likelihood tasks, so a "
                                             "score does not change with the CPU; auto, the fastest here, for "
                                             "generation)."),
    seed: int = typer.Option(0, "--seed", help="Seed for few-shot selection and sampling."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Few-shot examples per question (default: the task's)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Wrap prompts in the model's chat template "
                                        "(default: on for generation with chat models, off for scoring)."),
    context: int = typer.Option(2048, "--context", help="Perplexity: tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Perplexity: tokens each window moves (default "
                                         "--context: no overlap; smaller gives every token more context)."),
    field: Optional[str] = typer.Option(None, "--field", help="Perplexity over JSONL: the field holding the text."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Perplexity: also report KL divergence and "
                                            "top-1 agreement against this model (same tokenizer)."),
    samples: int = typer.Option(1, "--samples", help="HumanEval: completions per problem (pass@k needs k)."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed JSONL lines (counted)."),
    systems: bool = typer.Option(True, "--systems/--no-systems", help="Also measure speed, memory, energy, cost."),
    details: Optional[Path] = typer.Option(None, "--details", help="Write per-example results to this JSONL file."),
    watts: float = WattsOpt, hardware: float = HardwareOpt, years: float = YearsOpt, kwh: float = KwhOpt,
    prices: Optional[Path] = PricesOpt,
    as_json: bool = JsonOpt,
):
    """Does a small model meet my needs? Quality on a task plus speed, memory, energy and cost.

    \b
    Examples:
      slimlm eval smollm2-135m-instruct --task perplexity:python-docs
      slimlm eval smollm2-135m-instruct --task humaneval --limit 20
      slimlm eval smollm2-135m-instruct --task examples/tasks/capitals.yaml --shots 3
      slimlm eval my-q4.gguf --task perplexity:python-docs --reference smollm2-135m-instruct
    Every run is recorded; `slimlm compare` and `slimlm report` read them.
    """
    from slimlm.eval import evaluate
    from slimlm.paths import atomic_write_text

    cost = _cost(watts, hardware, years, kwh, prices)
    results = [evaluate(model, t, backend=backend, limit=limit, batch_size=batch_size, seed=seed, shots=shots,
                        chat=chat, context=context, stride=stride, field=field, reference=reference,
                        skip_bad_lines=skip_bad_lines, samples=samples, systems=systems, cost=cost,
                        dtype=dtype) for t in task]
    if details:
        lines = [json.dumps({"task": r.task, **row}, default=str) for r in results for row in r.details]
        atomic_write_text(details, "".join(line + "\n" for line in lines))
    if as_json:
        dicts = [r.to_dict() for r in results]
        print(json.dumps(dicts[0] if len(dicts) == 1 else {"results": dicts}, default=str))
        return
    for r in results:
        _print_result(r)


@app.command()
def bench(
    model: str = ModelArg,
    backend: str = BackendOpt,
    prompt_lengths: str = typer.Option("128,512", "--prompt-lengths", help="Prompt lengths in tokens, comma-separated."),
    gen_tokens: int = typer.Option(64, "--gen-tokens", help="Tokens generated per request."),
    repeat: int = typer.Option(3, "--repeat", help="Measure each length N times; report median and spread."),
    watts: float = WattsOpt, hardware: float = HardwareOpt, years: float = YearsOpt, kwh: float = KwhOpt,
    prices: Optional[Path] = PricesOpt,
    as_json: bool = JsonOpt,
):
    """Speed, memory, energy and cost of a model on this machine, priced against hosted APIs.

    Example: slimlm bench smollm2-135m-instruct --repeat 5
    """
    from slimlm.eval.systems import run_bench

    try:
        lengths = [int(x) for x in prompt_lengths.split(",") if x.strip()]
    except ValueError:
        raise SlimlmError(f"--prompt-lengths must be numbers separated by commas (got '{prompt_lengths}')") from None
    result = run_bench(model, backend, prompt_lengths=lengths, gen_tokens=gen_tokens, repeat=repeat,
                       cost=_cost(watts, hardware, years, kwh, prices))
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table(title=f"{model} · {result['backend']} · {result['precision']}", show_header=False, box=None)
    for key, value in _systems_lines(result):
        table.add_row(key, value)
    out.print(table)
    for note in result.get("notes", []):
        out.print(f"[dim]note: {note}[/dim]")


@app.command()
def compare(runs: Optional[list[str]] = typer.Argument(None, metavar="RUN...", help="Run ids or model names "
                                                        "(newest eval of that model); default: the newest runs."),
            as_json: bool = JsonOpt):
    """Runs side by side, with deltas against the first (green better, red worse).

    Example: slimlm compare 3 4 5
    """
    from slimlm.eval.compare import compare_runs, render_table, resolve_runs

    comparison = compare_runs(resolve_runs(runs or []))
    if as_json:
        print(json.dumps(comparison.to_dict(), default=str))
        return
    out.print(render_table(comparison))


@app.command()
def report(runs: Optional[list[str]] = typer.Argument(None, metavar="RUN...", help="Run ids or model names; "
                                                       "default: the newest runs."),
           out_dir: Path = typer.Option(Path("slimlm-report"), "--out", help="Folder for report.html and the PNGs.")):
    """Write a self-contained HTML page (opens offline) with the comparison and plots.

    The plots: quality vs size, quality vs decode speed (Pareto front marked), and cost per 1M
    tokens here vs hosted APIs. Each is also written as a PNG.

    Example: slimlm report 3 4 5 --out report/
    """
    from slimlm.eval.compare import resolve_runs
    from slimlm.eval.report import write_report

    page = write_report(resolve_runs(runs or []), out_dir)
    out.print(f"wrote {page}")
