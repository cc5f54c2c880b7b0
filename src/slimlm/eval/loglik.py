"""Log-likelihood scoring for the evaluation code, as the backends implement it.

The scorers live behind the backend interface (slimlm.models.backends.scoring and each
backend's own module), because how to get every position's logits is a backend's business:
torch batches a forward pass, llama.cpp needs a handle opened with logits_all. This module keeps
the names the eval code, bench/ and the tests import.
"""

from __future__ import annotations

from slimlm.models.backends.llamacpp_scoring import LlamaCppScorer
from slimlm.models.backends.scoring import Request, Scored, Scorer
from slimlm.models.backends.torch_scoring import TorchScorer


def make_scorer(backend, batch_size: int = 1) -> Scorer:
    """The backend's own scorer (BackendUnavailable where it has none)."""
    return backend.scorer(batch_size=batch_size)


__all__ = ["LlamaCppScorer", "Request", "Scored", "Scorer", "TorchScorer", "make_scorer"]
