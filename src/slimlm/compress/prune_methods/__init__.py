"""Prune methods, one module each, registered by name in PRUNE_METHODS.

prune() and `slimlm prune --method` both read the registry: adding a method is a module here
(copy layers.py for a structured cut, wanda.py for a sparsity rule) plus its import line below.
"""

from slimlm.compress.prune_methods.base import (
    PRUNE_METHODS,
    PruneJob,
    PruneMethod,
    SparsityMethod,
    StructuredMethod,
    register_prune_method,
)

# The built-in methods: each registers itself on import, in the order `--help` lists them.
# isort: off
from slimlm.compress.prune_methods import layers  # noqa: F401
from slimlm.compress.prune_methods import width  # noqa: F401
from slimlm.compress.prune_methods import wanda  # noqa: F401
from slimlm.compress.prune_methods import sparsegpt  # noqa: F401
# isort: on

__all__ = ["PRUNE_METHODS", "PruneJob", "PruneMethod", "SparsityMethod", "StructuredMethod", "register_prune_method"]
