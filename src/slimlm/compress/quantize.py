"""`slimlm quantize`: make a model smaller, write a file people run, and say what it cost.

GGUF output is in llama.cpp's own block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0),
written from a Hugging Face folder. A method decides the integer codes and scales of each block
(round-to-nearest, GPTQ or AWQ from calibration text), blocks.py packs them byte for byte as
llama.cpp stores them, and gguf_export.py writes the file, so llama.cpp and Ollama run the result
unchanged. 1-D tensors (norms, biases) stay f32; the token embedding and output head get, by
default (`embeddings="auto"`), the types llama-quantize gives them for the same type (the table
EMBEDDING_DEFAULTS in quant_steps.py: e.g. the output head, or the tied token embedding, as Q6_K
for the 4- and 5-bit types, encoded by kquants.py, Q8_0 where 256 does not divide the width), so
both files have the same size; `embeddings="f16"`, `"Q8_0"` or `"Q6_K"` overrides it.

Every quantize ends with a quick fidelity check: KL divergence and top-1 agreement of the new file
(on llama.cpp) against the input model (on torch) on held-out python-docs text.

Where things are: this module is the entry point; each method is a class in quant_methods/
(registered by name, looked up here, listed by the CLI), the shared pipeline and the fidelity
check are quant_pipeline.py, the format/calibration/writer steps quant_steps.py.
"""

from __future__ import annotations

from pathlib import Path

from slimlm.compress.calibration import CALIB_SAMPLES
from slimlm.compress.quant_methods import QUANT_METHODS, QuantRequest
from slimlm.compress.quant_pipeline import QuantizeResult, quick_fidelity
from slimlm.compress.quant_steps import check_widths, quantizable, tensor_shapes
from slimlm.data import DEFAULT_CALIB
from slimlm.errors import SlimlmError

__all__ = ["quantize", "QuantizeResult", "QUANT_METHODS", "METHODS", "quick_fidelity", "quantizable",
           "check_widths", "tensor_shapes"]

METHODS = QUANT_METHODS  # the registry under its earlier name: {name: method class (with .help)}


def quantize(model: str | Path, out: str | Path, *, method: str = "rtn", format: str = "gguf:Q4_0",
             bits: int | None = None, group_size: int | None = None, symmetric: bool = True,
             force: bool = False, check: bool = True, record: bool = True, calib: str = DEFAULT_CALIB,
             calib_field: str | None = None, calib_samples: int = CALIB_SAMPLES, calib_seq_len: int = 256,
             sequential: bool = True, embeddings: str = "auto", target_size: float | None = None,
             target_bpw: float | None = None) -> QuantizeResult:
    """Quantize a Hugging Face folder (or a model reference that resolves to one) into `out`: a
    GGUF file (`gguf:TYPE`) or a packed Hugging Face folder (`hf`, with bits/group_size/symmetric).

    `method` is a name in QUANT_METHODS. `calib` is `python-docs`, a text file or a JSONL file
    (field `calib_field`, default "text"); GPTQ runs layer by layer (`sequential`, memory: one
    layer's Hessians) unless told otherwise. `embeddings` (GGUF: the token embedding and output
    head) is auto (llama-quantize's choice for the type, quant_steps.EMBEDDING_DEFAULTS), f16, Q8_0
    or Q6_K (Q6_K falls back to Q8_0 where 256 does not divide the width).

    `format` also takes llama.cpp's K-quant files: gguf:Q3_K, gguf:Q4_K, gguf:Q5_K, gguf:Q6_K (one
    type for every weight) and the mixes gguf:Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M (llama-quantize's
    per-tensor rule, kquant_formats.py); RTN writes llama-quantize's bytes, GPTQ chooses its own codes
    and scales in each tensor's type (gptq_kquant.py). With `format="gguf"` and `target_size` (MiB of
    the whole file) or `target_bpw` (bits per parameter, the whole file), each weight gets its own
    type under the budget from measured sensitivity (mixed_precision.py; the result's `tensor_types`
    holds the choice). Both take `method` rtn, gptq (its own codes) or awq (RTN codes of the rescaled model)."""
    request = QuantRequest(model=model, out=Path(out), format=format, bits=bits, group_size=group_size,
                           symmetric=symmetric, force=force, check=check, record=record, calib=calib,
                           calib_field=calib_field, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                           sequential=sequential, embeddings=embeddings, target_size=target_size,
                           target_bpw=target_bpw)
    chosen = QUANT_METHODS.create(method)
    if (target_size is not None or target_bpw is not None) and not chosen.typed_formats:
        able = ", ".join(n for n in QUANT_METHODS.names() if QUANT_METHODS[n].typed_formats)
        raise SlimlmError(f"--method {method} does not choose per-tensor types for --target-size/--target-bpw "
                          f"yet: use --method {able}")
    return chosen.quantize(request)
