"""`slimlm quantize`: make a model smaller, write a file people run, and say what it cost.

GGUF output is in llama.cpp's own block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0),
written from a Hugging Face folder. A method decides the integer codes and scales of each block
(round-to-nearest, GPTQ or AWQ from calibration text), blocks.py packs them byte for byte as
llama.cpp stores them, and gguf_export.py writes the file, so llama.cpp and Ollama run the result
unchanged. 1-D tensors (norms, biases) stay f32; the token embedding and output head stay f16 by
default, or Q8_0 with `embeddings="Q8_0"` (what llama.cpp's own quantizer picks for a small model's
tied embedding), in higher precision than the body either way.

Every quantize ends with a quick fidelity check: KL divergence and top-1 agreement of the new file
(on llama.cpp) against the input model (on torch) on held-out python-docs text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slimlm.compress.blocks import BlockFormat
from slimlm.compress.quant_steps import (
    KEEP,
    calibration_texts,
    chooser,
    resolve_format,
    source_folder,
    write_gguf,
    write_hf,
)
from slimlm.errors import SlimlmError

METHODS = {"rtn": "round-to-nearest in the block format (llama.cpp's reference choice of codes and scales)",
           "gptq": "GPTQ: codes and block scales chosen with second-order error compensation from calibration text",
           "awq": "AWQ: activation-aware per-channel scaling (equivalent in fp32) from calibration text, then "
                  "round-to-nearest",
           "ternary": "weights in {-1, 0, +1} times a least-squares scale per group (1.58-bit; TQ1_0/TQ2_0 or "
                      "--format hf); post-training, so expect a large quality loss",
           "llamacpp": "llama.cpp's own quantizer (any type it offers, e.g. Q4_K_M; no importance matrix): "
                       "the baseline"}


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

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_after / max(self.params_total, 1)

    def to_dict(self) -> dict:
        return dict(asdict(self), bits_per_weight=self.bits_per_weight)


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and not any(k in name for k in KEEP)


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without loading any weight (for checks up front)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as st:  # header only, as models/info.py reads it
            shapes.update({name: tuple(st.get_slice(name).get_shape()) for name in st.keys()})
    if not shapes:
        raise SlimlmError(f"{folder}: no safetensors weights found: quantize takes a Hugging Face folder "
                          "(run `slimlm convert` first for a GGUF file)")
    return shapes


def check_widths(shapes: dict[str, tuple[int, ...]], fmt: BlockFormat) -> None:
    for name, shape in shapes.items():
        if fmt.block_size and quantizable(name, shape) and shape[-1] % fmt.block_size:
            raise SlimlmError(f"{name}: the layer width {shape[-1]} is not a multiple of the {fmt.name} "
                              f"group size {fmt.block_size}: choose another format or --group-size "
                              "(--format hf takes any group size that divides the widths)")


def quantize(model: str | Path, out: str | Path, *, method: str = "rtn", format: str = "gguf:Q4_0",
             bits: int | None = None, group_size: int | None = None, symmetric: bool = True,
             force: bool = False, check: bool = True, record: bool = True, calib: str = "python-docs",
             calib_field: str | None = None, calib_samples: int = 32, calib_seq_len: int = 256,
             sequential: bool = True, embeddings: str = "f16") -> QuantizeResult:
    """Quantize a Hugging Face folder (or a model reference that resolves to one) into `out`: a
    GGUF file (`gguf:TYPE`) or a packed Hugging Face folder (`hf`, with bits/group_size/symmetric).

    `calib` is `python-docs`, a text file or a JSONL file (field `calib_field`, default "text");
    GPTQ runs layer by layer (`sequential`, memory: one layer's Hessians) unless told otherwise.
    `embeddings` is f16 or Q8_0 (GGUF: the token embedding and output head)."""
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    if method not in METHODS:
        raise SlimlmError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    if method == "llamacpp":
        return _quantize_llamacpp(model, Path(out), format, force=force, check=check, record=record)
    kind, fmt = resolve_format(format, method, bits, group_size, symmetric)
    if embeddings.upper() not in ("F16", "Q8_0"):
        raise SlimlmError(f"--embeddings {embeddings}: choose f16 or Q8_0")
    if calib_samples < 1 or calib_seq_len < 2:
        raise SlimlmError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    ref = resolve(str(model))
    folder = dense_folder(ref)
    shapes = _tensor_shapes(folder)
    check_widths(shapes, fmt)  # before any long work
    if method == "awq" and fmt.block_size == 0:
        raise SlimlmError("AWQ searches scales per group: give --group-size > 0 (per-channel is not supported)")
    targets = [n for n, s in shapes.items() if quantizable(n, s)]
    texts = calibration_texts(folder, calib, calib_field, calib_seq_len) if method in ("gptq", "awq") else None

    start = time.perf_counter()
    with source_folder(method, folder, fmt, out, texts, calib_samples, calib_seq_len) as (source, notes):
        choose = chooser(method, kind, fmt, source, texts, calib_samples, calib_seq_len, sequential, notes)
        if kind == "gguf":
            quantized = write_gguf(source, out, fmt, targets, choose, embeddings, force, method)
        else:
            quantized = write_hf(source, out, fmt, targets, choose, force, method)
    seconds = time.perf_counter() - start
    size_after = out.stat().st_size if kind == "gguf" else sum(f.stat().st_size for f in out.glob("*.safetensors"))
    result = QuantizeResult(out=str(out), method=method, format=f"{kind}:{fmt.name}",
                            size_before=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                            size_after=size_after, params_quantized=quantized,
                            params_total=sum(int(np.prod(s)) for s in shapes.values()), seconds=seconds,
                            notes=list(notes))
    params = {"bits": fmt.bits, "group_size": fmt.block_size, "symmetric": fmt.symmetric}
    if texts is not None:
        params.update(calib=calib, calib_field=calib_field, calib_samples=calib_samples,
                      calib_seq_len=calib_seq_len, sequential=sequential)
    return _finish(result, ref, folder, check, record, params)


def _quantize_llamacpp(model, out: Path, format: str, *, force: bool, check: bool, record: bool) -> QuantizeResult:
    """Export the input to an f32 GGUF, then let llama.cpp quantize it (the peer's own choices)."""
    import tempfile

    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.llamacpp_quant import check_type, llamacpp_quantize
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    kind, sep, name = format.partition(":")
    type_name = check_type(name if sep else kind)  # before any long work
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    ref = resolve(str(model))
    folder = dense_folder(ref)
    shapes = _tensor_shapes(folder)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        source = export_gguf(folder, Path(tmp) / "f32.gguf", dtype="f32")
        llamacpp_quantize(source, Path(tmp) / "out.gguf", type_name)
        (Path(tmp) / "out.gguf").replace(out)
    result = QuantizeResult(out=str(out), method="llamacpp", format=f"gguf:{type_name}",
                            size_before=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                            size_after=out.stat().st_size, params_quantized=0,
                            params_total=sum(int(np.prod(s)) for s in shapes.values()),
                            seconds=time.perf_counter() - start, notes=["tensor choices are llama.cpp's own"])
    return _finish(result, ref, folder, check, record, {})


def _finish(result: QuantizeResult, ref, folder: Path, check: bool, record: bool, extra: dict) -> QuantizeResult:
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
