"""`slimlm export` as a library call: a Hugging Face folder written as one unquantized GGUF file,
and the run recorded (as every verb's library function records its own; quantized types are
`slimlm quantize`'s). The writing itself is gguf_export.export_gguf, which quantize also uses."""

from __future__ import annotations

from pathlib import Path

from slimlm.compress.gguf_export import DTYPES, export_gguf
from slimlm.errors import SlimlmError

FORMATS = tuple(f"gguf:{d}" for d in DTYPES)


def export(model: str | Path, out: Path, fmt: str = "gguf:f16", *, force: bool = False, record: bool = True) -> Path:
    """Write `model` to the GGUF file `out` in `fmt` (gguf:f32, gguf:f16 or gguf:bf16)."""
    from slimlm.models.reference import resolve

    if fmt not in FORMATS:
        raise SlimlmError(f"unsupported export format '{fmt}': use {', '.join(FORMATS[:-1])} or {FORMATS[-1]} "
                          "(quantized types: `slimlm quantize`)")
    ref = resolve(model)
    path = export_gguf(ref.path if ref.kind == "hf" else model, out, dtype=fmt.partition(":")[2], force=force)
    if record:
        from slimlm.runs import record as record_run

        record_run("export", ref, params={"format": fmt, "out": str(path)},
                   metrics={"size_bytes": path.stat().st_size}, artifact=path)
    return path
