"""The typer app every verb module registers on, and the options and consoles they share.

This module imports no verb module, so verb modules import it without a cycle; `slimlm.cli`
imports the verb modules (registering their commands) and holds the entry point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from slimlm.models.backends import backend_help

VERBS = ["generate", "chat", "info", "convert", "eval", "bench", "compare", "report", "quantize", "export", "serve",
         "batch", "router", "ledger", "curate", "synth", "finetune", "distill", "prune", "moe", "shrink", "runs", "lineage",
         "quickstart"]

app = typer.Typer(
    name="slimlm", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Make a small language model good enough for the job, prove it, and run it on this machine.\n\n"
         "MODEL is a Hugging Face folder, a .gguf file, or a built-in name "
         "(smollm2-135m-instruct, gemma3-270m). Nothing is downloaded.")
runs_app = typer.Typer(help="List recorded runs, or show one: `slimlm runs`, `slimlm runs show ID`.",
                       invoke_without_command=True, no_args_is_help=False)
app.add_typer(runs_app, name="runs")
out = Console()
err = Console(stderr=True)
_STATE = {"debug": False}

ModelArg = typer.Argument(..., help="Model folder, .gguf file, or built-in name (smollm2-135m-instruct, gemma3-270m).")
BackendOpt = typer.Option("auto", "--backend", "-b", help=backend_help())  # from the registry, BACKENDS


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          runs_db: Optional[Path] = typer.Option(None, "--runs-db",
                                                  help="Run registry (SQLite); default $SLIMLM_RUNS_DB, else "
                                                       "runs.db under your data folder.")):
    from slimlm.runs import set_runs_db

    _STATE["debug"] = debug
    set_runs_db(str(runs_db) if runs_db else None)


def generation_params(max_tokens: int, temperature: float, seed: Optional[int], top_p: float = 1.0):
    from slimlm.models.backends import GenerationParams

    return GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed).validate()
