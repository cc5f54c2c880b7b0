"""`rtn`: round-to-nearest, llama.cpp's own choice of codes and scales (the base class's hooks); also
the K-quant files and per-tensor mixed precision (mixed_precision.py)."""

from __future__ import annotations

from slimlm.compress.quant_methods.base import QuantMethod, register_quant_method


@register_quant_method("rtn")
class RoundToNearest(QuantMethod):
    help = "round-to-nearest in the block format (llama.cpp's reference choice of codes and scales)"
    typed_formats = True  # K-quant files and per-tensor mixes, through the same reference quantizers
