"""`ternary`: weights in {-1, 0, +1} times a least-squares scale per group (compress/ternary.py).

Only ternary formats hold its codes: llama.cpp's TQ1_0/TQ2_0, or a packed folder's 2-bit
ternary format, so the class picks those and refuses every other block format."""

from __future__ import annotations

import numpy as np

from slimlm.compress.blocks import BlockFormat
from slimlm.compress.quant_methods.base import QuantJob, QuantMethod, register_quant_method
from slimlm.errors import SlimlmError


@register_quant_method("ternary")
class Ternary(QuantMethod):
    help = ("weights in {-1, 0, +1} times a least-squares scale per group (1.58-bit; TQ1_0/TQ2_0 or "
            "--format hf); post-training, so expect a large quality loss")

    def gguf_type(self, bits: int | None) -> str:
        return "TQ2_0"

    def hf_format(self, bits: int | None, group_size: int, symmetric: bool) -> BlockFormat:
        from slimlm.compress.packed import ternary_format

        return ternary_format(group_size)

    def check_format(self, kind: str, fmt: BlockFormat) -> None:
        if kind == "gguf" and not fmt.name.startswith("TQ"):
            raise SlimlmError(f"the ternary method writes TQ1_0 or TQ2_0 (or --format hf), not {fmt.name}")

    def choose(self, job: QuantJob, name: str, w: np.ndarray):
        from slimlm.compress.ternary import ternary_quantize

        return ternary_quantize(w, job.format_for(w.shape[1]).block_size)
