"""Verbs about one model: generate, chat, info, convert, runs, lineage, quickstart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import BackendOpt, ModelArg, app, err, generation_params, out, runs_app
from slimlm.errors import SlimlmError


@app.command()
def generate(
    model: str = ModelArg,
    prompt: str = typer.Argument(..., help="The prompt. For chat models it becomes one user turn (see --raw)."),
    backend: str = BackendOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy; higher samples more freely."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling, for repeatable output."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    stats: bool = typer.Option(False, "--stats", help="Print tokens and speed on stderr afterwards."),
):
    """Complete one prompt, streaming the answer to the terminal.

    Example: slimlm generate smollm2-135m-instruct "Name three prime numbers."
    """
    from slimlm.generate import Generation

    gen = Generation(model, prompt, generation_params(max_tokens, temperature, seed, top_p), backend=backend, raw=raw)
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        t = gen.timings
        err.print(f"[dim]{gen.label}: {t.prompt_tokens} prompt + {t.generated_tokens} generated tokens, "
                  f"first token {t.ttft_s * 1000:.0f} ms, {t.decode_tps:.1f} tokens/s[/dim]")


@app.command()
def chat(
    model: str = ModelArg,
    backend: str = BackendOpt,
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start the conversation."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy."),
    seed: Optional[int] = typer.Option(None, "--seed"),
):
    """Talk to a model in the terminal. /reset starts over, /exit (or Ctrl-D) leaves."""
    from slimlm.chat import ChatSession
    from slimlm.models.backends import open_backend
    from slimlm.models.reference import resolve

    params = generation_params(max_tokens, temperature, seed)
    ref = resolve(model)
    engine = open_backend(ref, backend)
    if not engine.chat_template:
        raise SlimlmError(f"{model} has no chat template: use `slimlm generate --raw` for plain completion")
    session = ChatSession(engine, params, system=system)
    err.print(f"[dim]{ref.display_name} on {engine.label}. /reset to start over, /exit to leave.[/dim]")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            break
        reply = session.handle(line)
        if reply is None:
            break
        for piece in reply:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


@app.command()
def info(model: str = ModelArg, as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Architecture, parameters (total and active), dtype or quantization, size, context, chat template."""
    from slimlm.models.info import model_info

    result = model_info(model)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table(show_header=False, box=None)
    d = result.to_dict()
    for key in ("model", "format", "architecture", "family", "params_total", "params_active", "dtype",
                "size_bytes", "context_length", "chat_template", "experts", "experts_per_token", "flops_per_token"):
        value = d[key]
        if value is None:
            continue
        if key.startswith("params"):
            value = f"{value:,} ({value / 1e6:.1f}M)"
        elif key == "flops_per_token":
            value = f"{value / 1e9:.2f} GFLOP (zero context)"
        elif key == "size_bytes":
            value = f"{value / 2**20:.1f} MiB"
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)


@app.command()
def convert(model: str = ModelArg, out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to write."),
            force: bool = typer.Option(False, "--force", help="Replace OUT if it exists.")):
    """Write a dense Hugging Face folder (safetensors, config, tokenizer, chat template) from a GGUF file."""
    from slimlm.models.loading import convert as do_convert

    path = do_convert(model, out_dir, force=force)
    out.print(f"wrote {path}")


@runs_app.callback()
def runs_list(ctx: typer.Context, limit: int = typer.Option(20, "--limit", help="How many of the newest runs."),
              as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List recorded runs, newest first."""
    if ctx.invoked_subcommand:
        return
    from slimlm.runs import list_runs

    rows = list_runs(limit=limit)
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], default=str))
        return
    table = Table("id", "when", "command", "model", "metrics")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(r.metrics.items())[:4])
        table.add_row(str(r.id), r.to_dict()["created_iso"], r.command, r.model, metrics)
    out.print(table)


@runs_app.command("show")
def runs_show(run_id: int = typer.Argument(..., metavar="ID")):
    """Show one run: parameters, metrics, lineage, versions, machine."""
    from slimlm.runs import get_run

    run = get_run(run_id)
    if run is None:
        raise SlimlmError(f"no run with id {run_id}: `slimlm runs` lists them")
    print(json.dumps(run.to_dict(), indent=2, default=str))


@app.command()
def lineage(model: str = ModelArg, as_json: bool = typer.Option(False, "--json")):
    """The chain of operations behind a model, newest first, from the manifests slimlm writes."""
    from slimlm.models.reference import resolve
    from slimlm.runs import lineage as chain_of

    ref = resolve(model)
    chain = chain_of(ref.path)
    if as_json:
        print(json.dumps(chain, default=str))
        return
    for depth, step in enumerate(chain):
        params = ", ".join(f"{k}={v}" for k, v in (step.get("params") or {}).items())
        out.print(f"{'  ' * depth}{'└─ ' if depth else ''}{step['model']}  [bold]{step['operation']}[/bold] {params}")


@app.command()
def quickstart(max_tokens: int = typer.Option(48, "--max-tokens", "-n", help="Tokens per answer.")):
    """Load the built-in SmolLM2, answer three prompts on both backends, and compare their speed."""
    from slimlm.quickstart import run_quickstart

    run_quickstart(out, max_tokens=max_tokens)
