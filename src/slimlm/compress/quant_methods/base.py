"""The interface of a quantization method, and the registry quantize() dispatches through.

A method is a class in the manner of gpt-fast's quantizers: it builds its state (`prepare`:
GPTQ's calibration, nothing for RTN) and then converts each weight (`choose`: the integer codes
and block scales the writer packs). Files with a type per tensor (K-quants, --target-size mixes)
ask the same of `source_typed` / `prepare_typed` / `encode_typed` once every weight's type is known
(a method that writes them sets `typed_formats`). Its constraints are part of the class too: the formats it picks
for `--format hf` and a bare `--format gguf`, and what it refuses (`check_format`), so quantize()
asks the method instead of testing its name. A method with a pipeline of its own
(llamacpp: llama.cpp's quantizer writes the whole file) overrides `quantize`.

A new method is one module in this package with a class decorated `@register_quant_method("name")`
and one line in `__init__.py` importing it; `slimlm quantize --method` lists it from then on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np

from slimlm.compress.blocks import BlockFormat
from slimlm.compress.quant_pipeline import QuantizeResult, QuantJob, QuantRequest, quantize_blocks
from slimlm.compress.quant_steps import GGUF_BY_BITS, round_to_nearest
from slimlm.errors import SlimlmError
from slimlm.registry import Registry

__all__ = ["QuantMethod", "QUANT_METHODS", "register_quant_method", "QuantJob", "QuantRequest"]


class QuantMethod:
    """Round-to-nearest unless a subclass says otherwise; every hook has the default RTN needs."""

    name: ClassVar[str] = ""  # set by register_quant_method
    help: ClassVar[str] = ""  # one line for `slimlm quantize --help`
    calibrated: ClassVar[bool] = False  # reads calibration text (--calib, --calib-samples, --calib-seq-len)
    typed_formats: ClassVar[bool] = False  # writes K-quant files (gguf:Q4_K_M...) and --target-size mixes
    # fits typed files' scales by llama-quantize's importance-matrix rules (so a mix's allocation
    # measures each type by them too: sensitivity.py `weighted`)
    importance_scales: ClassVar[bool] = False
    # a typed file may keep a GGUF parent's own blocks where a weight's type is the parent's
    # (source_blocks.py); False for a method that rewrites the weights first (AWQ's scales)
    keeps_parent_blocks: ClassVar[bool] = True

    # --- the format -------------------------------------------------------------------------

    def gguf_type(self, bits: int | None) -> str:
        """The llama.cpp type `--format gguf --bits N` means ("" if none that slimlm writes)."""
        return GGUF_BY_BITS.get(bits or 4, "")

    def hf_format(self, bits: int | None, group_size: int, symmetric: bool) -> BlockFormat:
        """The packed-folder format of `--format hf` (integer codes of `bits`, default 4)."""
        from slimlm.compress.packed import int_format

        return int_format(bits or 4, group_size, symmetric)

    def check_format(self, kind: str, fmt: BlockFormat) -> None:
        """Raise SlimlmError if this method cannot write `fmt` ("gguf" or "hf"); before any work."""

    # --- the codes --------------------------------------------------------------------------

    @contextmanager
    def source(self, job: QuantJob) -> Iterator[Path]:
        """The folder whose weights get quantized: the input, unless the method rewrites it first."""
        yield job.folder

    def prepare(self, job: QuantJob, source: Path) -> None:
        """Build whatever state `choose` needs (once per run, before the first weight)."""

    def choose(self, job: QuantJob, name: str, w: np.ndarray):
        """(q, d, m): the codes, per-group scales and mins (or None) of the weight `name`, in the
        layout blocks.pack (GGUF) or packed.save_packed (hf) takes."""
        return round_to_nearest(job.kind, job.format_for(w.shape[1]), w)

    # --- per-tensor types: K-quant files and --target-size mixes (mixed_precision.py) ---------

    @contextmanager
    def source_typed(self, job) -> Iterator[Path]:
        """The folder a typed file is written from (weights, norms and all): the input, unless the
        method rewrites the model first; job.types is known by then. The types themselves were
        chosen on the input (RTN sensitivities, K-quant rules)."""
        yield job.folder

    def prepare_typed(self, job, source: Path) -> None:
        """Build what `encode_typed` needs, once per run; `job` (mixed_precision.TypedJob) already
        holds every weight's GGUF type (job.types), so a method may choose codes for them now."""

    def encode_typed(self, job, name: str, w: np.ndarray):
        """(data, GGMLQuantizationType, or None for F16) of the weight `name` (float32, llama.cpp's
        layout) stored as job.types[name]: RTN, llama.cpp's reference quantizers byte for byte."""
        from slimlm.compress.kquant_formats import encode

        return encode(job.types[name], w)

    # --- the run ----------------------------------------------------------------------------

    def quantize(self, request: QuantRequest) -> QuantizeResult:
        """The whole run: the block pipeline (quant_pipeline.quantize_blocks) with this method's hooks,
        or for a K-quant format or a size target the per-tensor-typed one (mixed_precision.py)."""
        from slimlm.compress.mixed_precision import is_typed_request, quantize_typed

        if is_typed_request(request):
            if not self.typed_formats:
                able = " or ".join(f"--method {n}" for n in QUANT_METHODS.names() if QUANT_METHODS[n].typed_formats)
                raise SlimlmError(f"--method {self.name} does not write K-quant formats or --target-size/"
                                  f"--target-bpw files yet: use {able} (or --method llamacpp for llama.cpp's "
                                  "own K-quants)")
            return quantize_typed(self, request)
        return quantize_blocks(self, request)


QUANT_METHODS: Registry[QuantMethod] = Registry("quantization method", QuantMethod, unknown="method")
register_quant_method = QUANT_METHODS.register
