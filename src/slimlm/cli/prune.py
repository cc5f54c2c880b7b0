"""The `prune` verb of the CLI. Parsing and printing only; the work is in slimlm.compress.prune.

Importing this module registers the verb on `slimlm.cli.app`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import ModelArg, app, out
from slimlm.cli.choices import registry_option
from slimlm.compress.prune import PRUNE_METHODS, WIDTH_AXES


@app.command("prune")
def prune_cmd(
    model: str = ModelArg,
    out_path: Path = typer.Option(..., "--out", "-o", help="The Hugging Face folder to write."),
    method: str = registry_option(PRUNE_METHODS, "layers", "--method"),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction to remove: of the layers (layers), of "
                                          "MLP channels and heads (width), of each linear's weights (wanda, sparsegpt)."),
    keep_params: Optional[float] = typer.Option(None, "--keep-params", "--target-params",
                                                help="Instead of --ratio: fraction of non-embedding parameters to "
                                                     "keep (0.5 = half); the cut is chosen to land closest."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="wanda/sparsegpt: N:M semi-structured sparsity "
                                          "(2:4 keeps 2 of every 4 consecutive input weights)."),
    axes: str = typer.Option("mlp,heads", "--axes", help=f"width: what to narrow, some of {','.join(WIDTH_AXES)}."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration sequences (python-docs)."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="Tokens per calibration sequence."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Remove weights from a model: whole layers, width, or individual weights (sparsity).

    \b
    Example: slimlm prune ./dense --method layers --ratio 0.25 --out dense-pruned
    Example: slimlm prune ./dense --method width --keep-params 0.5 --out dense-half
    Example: slimlm prune ./dense --method wanda --pattern 2:4 --out dense-2of4
    Pruned models lose quality: check with `slimlm eval`, and distill from the original to win it back.
    Sparsity (wanda, sparsegpt) stores dense zeros: no smaller file and no CPU speed-up.
    """
    from slimlm.compress.prune import prune as do_prune

    result = do_prune(model, out_path, method=method, ratio=ratio, target_params=keep_params, pattern=pattern,
                      axes=tuple(a.strip() for a in axes.split(",") if a.strip()), calib_samples=calib_samples,
                      calib_seq_len=calib_seq_len, force=force)
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    table = Table(title=f"{model} → {result.out}", show_header=False, box=None)
    amount = (f"ratio {result.ratio}" if result.ratio is not None
              else f"pattern {result.pattern}" if result.pattern else f"keep {result.target_params} of params")
    table.add_row("method", f"{result.method}, {amount}")
    table.add_row("parameters", f"{result.params_before:,} → {result.params_after:,}")
    nonzero = " non-zero" if result.sparsity else ""
    table.add_row("non-embedding", f"{result.nonembedding_before:,} → {result.nonembedding_after:,}{nonzero} "
                                   f"({result.kept_fraction:.1%} kept)")
    if result.sparsity:
        layers = result.sparsity["layers"].values()
        table.add_row("sparsity", f"{result.sparsity['overall']:.1%} of decoder linear weights "
                                  f"(per layer {min(layers):.1%} to {max(layers):.1%})")
    for key, value in result.removed.items():
        table.add_row(key.replace("_", " "), str(value))
    table.add_row("time", f"{result.seconds:.1f} s")
    out.print(table)
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")
