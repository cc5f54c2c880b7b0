"""Quantization methods, one module each, registered by name in QUANT_METHODS.

quantize() and `slimlm quantize --method` both read the registry: adding a method is a module
here (copy rtn.py, or ternary.py for one with format constraints) plus its import line below.
"""

from slimlm.compress.quant_methods.base import (
    QUANT_METHODS,
    QuantJob,
    QuantMethod,
    QuantRequest,
    register_quant_method,
)

# The built-in methods: each registers itself on import, in the order `--help` lists them.
# isort: off
from slimlm.compress.quant_methods import rtn  # noqa: F401
from slimlm.compress.quant_methods import gptq  # noqa: F401
from slimlm.compress.quant_methods import awq  # noqa: F401
from slimlm.compress.quant_methods import ternary  # noqa: F401
from slimlm.compress.quant_methods import llamacpp  # noqa: F401
# isort: on

__all__ = ["QUANT_METHODS", "QuantJob", "QuantMethod", "QuantRequest", "register_quant_method"]
