"""The compressing verbs of the CLI: quantize and export. Parsing and printing only; the work is
in slimlm.compress."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from slimlm.cli.app import ModelArg, app, out
from slimlm.cli.choices import registry_option
from slimlm.compress.blocks import FORMATS
from slimlm.compress.calibration import CALIB_SAMPLES
from slimlm.compress.kquant_formats import KQUANT_FORMATS
from slimlm.compress.quant_methods import QUANT_METHODS
from slimlm.data import DEFAULT_CALIB


@app.command()
def quantize(
    model: str = ModelArg,
    out_path: Path = typer.Option(..., "--out", "-o", help="The file to write (e.g. model-q4_0.gguf)."),
    method: str = registry_option(QUANT_METHODS, "rtn", "--method"),
    fmt: str = typer.Option("gguf:Q4_0", "--format", help=f"gguf:TYPE (TYPE one of {', '.join(FORMATS)}, or the "
                            f"K-quants {', '.join(KQUANT_FORMATS)}; with --method llamacpp any llama.cpp type), "
                            "gguf with --target-size/--target-bpw (a type per tensor), or hf: a Hugging Face folder "
                            "with packed weights that slimlm's torch backend loads (see --bits, --group-size)."),
    target_size: float = typer.Option(None, "--target-size", help="With --format gguf: the file's size in MiB; "
                                      "each tensor gets the type (Q4_0, Q4_K, Q5_K, Q6_K, Q8_0) that buys the most "
                                      "fidelity under it, from measured sensitivity (cached per model)."),
    target_bpw: float = typer.Option(None, "--target-bpw", help="With --format gguf: the same budget as bits per "
                                     "parameter (whole file / all parameters)."),
    bits: int = typer.Option(None, "--bits", help="hf: 8, 4, 3 or 2 (default 4). gguf: picks the type "
                             "(8 Q8_0, 5 Q5_0, 4 Q4_0) when --format is just gguf."),
    group_size: int = typer.Option(None, "--group-size", help="hf: weights per scale along a row, a divisor of "
                                   "every layer width (default 64); 0 = one scale per output channel."),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="hf: codes around zero, or with a "
                                   "per-group minimum (one more fp16 per group, better for skewed weights)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    check: bool = typer.Option(True, "--check/--no-check", help="Measure KL and top-1 agreement against "
                               "the input on held-out text afterwards."),
    calib: str = typer.Option(DEFAULT_CALIB, "--calib", help="GPTQ/AWQ calibration text: mix (built in: prose, code, "
                              "chat turns, other languages; data/calibration_mix.py), python-docs (built in), "
                              "a .txt file, or a .jsonl file (see --calib-field)."),
    calib_field: str = typer.Option(None, "--calib-field", help="The JSONL field holding the text (default: text)."),
    calib_samples: int = typer.Option(CALIB_SAMPLES, "--calib-samples", help="GPTQ/AWQ: calibration sequences."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="GPTQ/AWQ: tokens per calibration sequence."),
    sequential: bool = typer.Option(True, "--sequential/--one-pass", help="GPTQ: calibrate layer by layer on "
                                    "the quantized layers' outputs (memory: one layer's Hessians), or all layers "
                                    "in one full-precision pass (faster, all Hessians in memory)."),
    embeddings: str = typer.Option("auto", "--embeddings", help="GGUF token embedding and output head: auto "
                                   "(the types llama-quantize picks for the --format type, e.g. the output head "
                                   "as Q6_K for 4- and 5-bit types), or f16, Q8_0, Q6_K for both (a width not "
                                   "divisible by 256 falls back from Q6_K to Q8_0, as llama-quantize does)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Make a model smaller in llama.cpp's block formats, and say what it cost in quality.

    \b
    Example: slimlm quantize ./dense --format gguf:Q4_0 --out smollm2-q4_0.gguf
    The file runs in llama.cpp and Ollama as is: slimlm generate smollm2-q4_0.gguf "Hello"
    GPTQ from calibration text:  slimlm quantize ./dense --method gptq --out smollm2-gptq.gguf
    A packed 3-bit torch folder: slimlm quantize ./dense --format hf --bits 3 --out smollm2-int3
    llama.cpp's Q4_K_M mix:      slimlm quantize ./dense --format gguf:Q4_K_M --out smollm2-q4_k_m.gguf
    A type per tensor, 100 MiB:  slimlm quantize ./dense --format gguf --target-size 100 --out s100.gguf
    """
    from slimlm.compress.quantize import quantize as do_quantize

    result = do_quantize(model, out_path, method=method, format=fmt, bits=bits, group_size=group_size,
                         symmetric=symmetric, force=force, check=check,
                         calib=calib, calib_field=calib_field, calib_samples=calib_samples,
                         calib_seq_len=calib_seq_len, sequential=sequential, embeddings=embeddings,
                         target_size=target_size, target_bpw=target_bpw)
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    table = Table(title=f"{model} → {result.out}", show_header=False, box=None)
    table.add_row("method, format", f"{result.method}, {result.format}")
    table.add_row("size", f"{result.size_before / 2**20:.1f} MiB → {result.size_after / 2**20:.1f} MiB "
                          f"({result.size_before / max(result.size_after, 1):.1f}x smaller)")
    table.add_row("bits per weight", f"{result.bits_per_weight:.2f} (whole file / all parameters)")
    table.add_row("time", f"{result.seconds:.1f} s")
    if result.tensor_types:
        from slimlm.compress.mixed_precision import type_summary

        table.add_row("tensor types", type_summary(result.tensor_types))
    f = result.fidelity
    if "kl_mean" in f:
        table.add_row("fidelity (held-out text)", f"KL mean {f['kl_mean']:.4f}, p99 {f['kl_p99']:.3f}, "
                      f"top-1 agreement {f['top1_agreement']:.1%} over {f['tokens']} tokens")
        table.add_row("perplexity", f"{f['perplexity']:.3f} vs {f['reference_perplexity']:.3f} before")
    elif "error" in f:
        table.add_row("fidelity", f"not measured: {f['error']}")
    out.print(table)
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")


@app.command()
def export(
    model: str = ModelArg,
    out_path: Path = typer.Option(..., "--out", "-o", help="The GGUF file to write."),
    fmt: str = typer.Option("gguf:f16", "--format", help="gguf:f32, gguf:f16 or gguf:bf16 (unquantized)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
):
    """Write a Hugging Face folder as a GGUF file that llama.cpp and Ollama load with no other file.

    Example: slimlm export ./dense --format gguf:f16 --out smollm2-f16.gguf
    """
    from slimlm.compress.export import export as do_export

    path = do_export(model, out_path, fmt, force=force)
    out.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
