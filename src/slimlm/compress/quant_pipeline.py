"""The block-format pipeline of quantize() and what every method does with its written file.

`quantize_blocks` is the default `QuantMethod.quantize`: it resolves the format (asking the
method), checks every input up front, lets the method rewrite the source folder (AWQ) and build
its state (GPTQ's calibration), then asks it for each weight's codes and writes them as a GGUF
file or a packed Hugging Face folder. `finish` then measures fidelity on held-out text, writes
the manifest and records the run; a method with a pipeline of its own (llamacpp) calls it too.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slimlm.compress.blocks import BlockFormat
from slimlm.compress.calibration import CALIB_SAMPLES
from slimlm.compress.quant_steps import (
    calibration_texts,
    check_embeddings,
    check_widths,
    quantizable,
    resolve_format,
    tensor_shapes,
    write_gguf,
    write_hf,
)
from slimlm.data import DEFAULT_CALIB
from slimlm.errors import SlimlmError

__all__ = ["QuantRequest", "QuantJob", "QuantizeResult", "quantize_blocks", "finish", "quick_fidelity"]


@dataclass
class QuantRequest:
    """What the user asked for: quantize()'s arguments, as one value a method receives."""
    model: str | Path
    out: Path
    format: str = "gguf:Q4_0"
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    force: bool = False
    check: bool = True
    record: bool = True
    calib: str = DEFAULT_CALIB
    calib_field: str | None = None
    calib_samples: int = CALIB_SAMPLES
    calib_seq_len: int = 256
    sequential: bool = True
    embeddings: str = "auto"
    target_size: float | None = None  # MiB: per-tensor mixed precision (mixed_precision.py)
    target_bpw: float | None = None   # bits per parameter, the whole file


@dataclass
class QuantJob:
    """One run of the block pipeline, as a method's hooks see it (the format resolved, the inputs
    checked); `notes` collects what the method wants the user to read."""
    kind: str  # "gguf" or "hf" (a packed Hugging Face folder)
    fmt: BlockFormat  # for hf with group size 0 (per channel), resolved per layer by format_for
    folder: Path  # the dense input folder
    out: Path
    texts: list[str] | None  # calibration documents, for methods with `calibrated = True`
    samples: int
    seq_len: int
    sequential: bool
    notes: list[str] = field(default_factory=list)

    def format_for(self, cols: int) -> BlockFormat:
        """The format of a layer `cols` wide (a packed folder's per-channel group becomes `cols`)."""
        from slimlm.compress.packed import for_width

        return for_width(self.fmt, cols) if self.kind == "hf" else self.fmt


@dataclass
class QuantizeResult:
    out: str
    method: str
    format: str
    size_before: int
    size_after: int
    params_quantized: int
    params_total: int
    seconds: float
    fidelity: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tensor_types: dict[str, str] = field(default_factory=dict)  # gguf name -> type, for per-tensor-typed files

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_after / max(self.params_total, 1)

    def to_dict(self) -> dict:
        return dict(asdict(self), bits_per_weight=self.bits_per_weight)


def quantize_blocks(method, req: QuantRequest) -> QuantizeResult:
    """Quantize `req.model` with `method` (a QuantMethod) into a GGUF file or a packed folder."""
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    kind, fmt = resolve_format(req.format, method, req.bits, req.group_size, req.symmetric)
    check_embeddings(req.embeddings)  # an unknown --embeddings fails before any work
    if req.calib_samples < 1 or req.calib_seq_len < 2:
        raise SlimlmError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    out = Path(req.out)
    if out.exists() and not req.force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    ref = resolve(str(req.model))
    folder = dense_folder(ref)
    shapes = tensor_shapes(folder)
    check_widths(shapes, fmt)  # before any long work
    targets = [n for n, s in shapes.items() if quantizable(n, s)]
    texts = calibration_texts(folder, req.calib, req.calib_field, req.calib_seq_len) if method.calibrated else None
    job = QuantJob(kind, fmt, folder, out, texts, req.calib_samples, req.calib_seq_len, req.sequential)

    start = time.perf_counter()
    with method.source(job) as source:
        method.prepare(job, source)

        def choose(name: str, w: np.ndarray):
            return method.choose(job, name, w)

        if kind == "gguf":
            quantized = write_gguf(source, out, fmt, targets, choose, req.embeddings, req.force, method.name,
                                   job.notes)
        else:
            quantized = write_hf(source, out, fmt, targets, choose, req.force, method.name)
    seconds = time.perf_counter() - start
    size_after = out.stat().st_size if kind == "gguf" else sum(f.stat().st_size for f in out.glob("*.safetensors"))
    result = QuantizeResult(out=str(out), method=method.name, format=f"{kind}:{fmt.name}",
                            size_before=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                            size_after=size_after, params_quantized=quantized,
                            params_total=sum(int(np.prod(s)) for s in shapes.values()), seconds=seconds,
                            notes=list(job.notes))
    params = {"bits": fmt.bits, "group_size": fmt.block_size, "symmetric": fmt.symmetric}
    if texts is not None:
        params.update(calib=req.calib, calib_field=req.calib_field, calib_samples=req.calib_samples,
                      calib_seq_len=req.calib_seq_len, sequential=req.sequential)
    return finish(result, ref, folder, req.check, req.record, params)


def finish(result: QuantizeResult, ref, folder: Path, check: bool, record: bool, extra: dict) -> QuantizeResult:
    """What every method does with its written file: fidelity check, manifest, registry row."""
    out = Path(result.out)
    if check:
        try:
            result.fidelity = quick_fidelity(out, folder)
        except SlimlmError as exc:  # the file is written and valid; only the comparison could not run
            result.fidelity = {"error": str(exc)}
    if out.is_dir():  # a packed folder: its manifest lives inside, as for every slimlm folder
        from slimlm.runs import write_manifest

        write_manifest(out, ref, "quantize", {"method": result.method, "format": result.format, **extra},
                       result.to_dict())
    else:
        _write_manifest(out, ref, result, extra)
    if record:
        from slimlm.runs import record as record_run

        record_run("quantize", ref, params={"method": result.method, "format": result.format, **extra},
                   metrics=result.to_dict(), artifact=out)
    return result


def quick_fidelity(quantized: Path, reference: Path, tokens: int = 512) -> dict:
    """KL and top-1 agreement of `quantized` (llama.cpp) vs `reference` (torch, fp32) on the last
    python-docs topics, which calibration (when a method uses it) never sees."""
    from slimlm.data import held_out_docs
    from slimlm.eval.loglik import make_scorer
    from slimlm.eval.perplexity import run_perplexity
    from slimlm.models.backends import open_backend

    full = open_backend(str(reference), "torch", dtype="float32")
    ref_scorer = make_scorer(full)
    tokens = min(tokens, ref_scorer.max_length)
    text = "\n\n".join(held_out_docs())[: tokens * 6]
    small = (open_backend(str(quantized), "torch", dtype="float32") if Path(quantized).is_dir()
             else open_backend(str(quantized), "llamacpp", logits_all=True, n_ctx=tokens))
    try:
        result = run_perplexity(make_scorer(small), [text], source="python-docs (held out)", context=tokens,
                                limit=1, reference=ref_scorer, reference_name=str(reference))
    finally:
        small.close()
    keys = ("kl_mean", "kl_p99", "top1_agreement", "perplexity", "reference_perplexity", "tokens")
    return {k: result.metrics[k] for k in keys}


def _write_manifest(out: Path, parent, result: QuantizeResult, extra: dict) -> None:
    """`model.gguf` gets `model.slimlm.json` beside it (read by `slimlm lineage`)."""
    from slimlm.runs import versions

    manifest = {"parent": {"spec": parent.spec, "path": str(parent.path), "kind": parent.kind},
                "operation": "quantize", "params": {"method": result.method, "format": result.format, **extra},
                "metrics": result.to_dict(), "versions": versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.with_suffix(".slimlm.json").write_text(json.dumps(manifest, indent=2, default=str))
