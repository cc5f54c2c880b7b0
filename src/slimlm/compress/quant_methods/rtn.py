"""`rtn`: round-to-nearest, llama.cpp's own choice of codes and scales (the base class's hooks)."""

from __future__ import annotations

from slimlm.compress.quant_methods.base import QuantMethod, register_quant_method


@register_quant_method("rtn")
class RoundToNearest(QuantMethod):
    help = "round-to-nearest in the block format (llama.cpp's reference choice of codes and scales)"
