"""`llamacpp`: llama.cpp's own quantizer (compress/llamacpp_quant.py), the baseline slimlm's methods
are measured against and the way to K-quants. It writes the whole file itself, so it replaces the
block pipeline (`quantize`) rather than choosing codes; the fidelity check and records are shared."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from slimlm.compress.quant_methods.base import QuantizeResult, QuantMethod, QuantRequest, register_quant_method
from slimlm.compress.quant_pipeline import finish
from slimlm.compress.quant_steps import tensor_shapes
from slimlm.errors import SlimlmError


@register_quant_method("llamacpp")
class LlamaCpp(QuantMethod):
    help = ("llama.cpp's own quantizer (any type it offers, e.g. Q4_K_M; no importance matrix): "
            "the baseline")

    def quantize(self, request: QuantRequest) -> QuantizeResult:
        """Export the input to an f32 GGUF, then let llama.cpp quantize it (the peer's own choices)."""
        from slimlm.compress.gguf_export import export_gguf
        from slimlm.compress.llamacpp_quant import check_type, llamacpp_quantize
        from slimlm.models.loading import dense_folder
        from slimlm.models.reference import resolve

        out = Path(request.out)
        kind, sep, name = request.format.partition(":")
        type_name = check_type(name if sep else kind)  # before any long work
        if out.exists() and not request.force:
            raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
        ref = resolve(str(request.model))
        folder = dense_folder(ref)
        shapes = tensor_shapes(folder)
        start = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
            source = export_gguf(folder, Path(tmp) / "f32.gguf", dtype="f32")
            llamacpp_quantize(source, Path(tmp) / "out.gguf", type_name)
            (Path(tmp) / "out.gguf").replace(out)
        result = QuantizeResult(out=str(out), method=self.name, format=f"gguf:{type_name}",
                                size_before=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                                size_after=out.stat().st_size, params_quantized=0,
                                params_total=sum(int(np.prod(s)) for s in shapes.values()),
                                seconds=time.perf_counter() - start, notes=["tensor choices are llama.cpp's own"])
        return finish(result, ref, folder, request.check, request.record, {})
