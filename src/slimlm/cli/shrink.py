"""`slimlm shrink`: parsing and printing only; the search is slimlm.shrink."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import ModelArg, app, err, out
from slimlm.shrink import DEFAULT_TASK, PREFER, Goals, preset_names
from slimlm.shrink.candidates import CANDIDATE_KINDS


@app.command()
def shrink(
    model: str = ModelArg,
    tasks: Optional[list[str]] = typer.Option(None, "--task", "-t", help="A task the model must still do: anything "
                                              f"`slimlm eval --task` takes; repeat for several (default: {DEFAULT_TASK}, "
                                              "532 questions on Python's standard library)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="The folder to write: model.gguf (the chosen model), "
                                 "report.html, shrink.json, candidates/."),
    preset: str = typer.Option("quick", "--preset", help=f"The candidates to try: {', '.join(preset_names())} "
                               "(shipped, in slimlm/shrink/presets/), or a YAML file of your own listing candidates of the kinds "
                               f"{CANDIDATE_KINDS.describe()}."),
    quality_floor: float = typer.Option(0.95, "--quality-floor", help="Fraction of the parent's score the model must "
                                        "keep on every task."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Absolute floor on every task's headline "
                                              "metric (a ceiling for perplexity)."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Most mean KL to the parent on held-out text."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Most peak memory (MiB) while serving."),
    max_size: Optional[float] = typer.Option(None, "--max-size", help="Largest file (MiB)."),
    min_tokens_per_s: Optional[float] = typer.Option(None, "--min-tokens-per-s", help="Slowest decode (tokens/s, "
                                                     "llama.cpp on this machine)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Minutes for the whole search; what "
                                                "does not fit is reported as skipped."),
    prefer: str = typer.Option("size", "--prefer", help=f"Among the models that qualify: {', '.join(PREFER)}."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Examples per task (default: the preset's)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text for GPTQ/AWQ (a .txt or .jsonl "
                                        "file of your own data, or a built-in corpus); default: each method's."),
    data: Optional[str] = typer.Option(None, "--data", help="Your training data (JSONL chat/pairs/text, or .txt): "
                                       "`finetune` candidates train LoRA on it before compression, and GPTQ/AWQ "
                                       "calibrate on it when it is text."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists (its finished candidates are reused)."),
    as_json: bool = typer.Option(False, "--json", help="Print shrink.json on stdout and nothing else."),
):
    """Find the smallest model that still does your job on this machine, prove it, and ship it.

    \b
    Tries the preset's candidates (quantization types and methods, llama.cpp's own quantizer,
    pruning with distillation), prunes on cheap proxies (size, KL to the parent, a decode probe),
    evaluates the rest in full on your tasks, and writes the best one that keeps --quality-floor
    of the parent's score within your budgets, with an HTML report and the line that serves it.
    A killed search continues where it stopped when rerun.

    \b
    Example: slimlm shrink smollm2-135m-instruct --preset quick --out shrunk/
    Your job: slimlm shrink ./my-model --task classification:tickets.jsonl --max-size 100 --out shrunk/
    """
    from slimlm.shrink import shrink as do_shrink
    from slimlm.shrink.report import rows, verdict

    goals = Goals(quality_floor=quality_floor, min_score=min_score, max_kl=max_kl, max_memory_mib=max_memory,
                  max_size_mib=max_size, min_tokens_per_s=min_tokens_per_s,
                  time_budget_s=time_budget * 60 if time_budget is not None else None, prefer=prefer)
    result = do_shrink(model, tasks, out_dir, preset=preset, goals=goals, limit=limit, calib=calib, data=data, force=force)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table_rows = rows(result)
    table = Table(title=f"slimlm shrink {result['model']} · {', '.join(result['tasks'])}")
    columns = [k for k in table_rows[0] if k != "why"]
    for key in columns:
        table.add_column(key.rpartition(":")[2] if key in result["tasks"] else key, no_wrap=True)
    for row in table_rows:
        style = {"chosen": "bold green", "qualifies": "green", "misses": "red", "failed": "red"}.get(row["status"])
        table.add_row(*[str(row[k]) for k in columns], style=style)
    out.width = max(out.width, 132)  # whole numbers in logs too (a pipe is 80 columns wide)
    out.print(table)
    for row in table_rows:
        if row["why"]:
            out.print(f"  {row['model']} ({row['status']}): {row['why']}", markup=False, soft_wrap=True)
    line = verdict(result)
    (out if result["chosen"] else err).print(line, markup=False, soft_wrap=True)
    out.print(f"report: {result['report']}", markup=False, soft_wrap=True)
    if result.get("serve"):
        out.print(f"serve it: {result['serve']}", markup=False, soft_wrap=True)
    if not result["chosen"]:
        raise typer.Exit(2)

