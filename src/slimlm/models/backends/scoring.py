"""Log-likelihoods of token sequences: the primitive under perplexity, fidelity, multiple
choice, classification and the server's `logprobs`. Each backend implements a `Scorer` natively
(torch_scoring.py, llamacpp_scoring.py) and hands one out from `Backend.scorer()`.

A request is a token sequence and the index of its first scored token; the answer is, for each
scored token, its log-probability, whether it was the model's top choice, and (on request) the
whole log-probability row, which fidelity needs for the KL divergence. Two details keep this
fast without changing a number: only the scored positions go through the LM head (the head is
a fifth of a small model's arithmetic, and a sliding window scores only part of its tokens), and
the torch scorer batches requests of similar length together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slimlm.errors import SlimlmError


@dataclass
class Request:
    ids: list[int]
    start: int  # index in ids of the first scored token (>= 1: it needs a token before it)


@dataclass
class Scored:
    logprobs: np.ndarray  # float64, one per scored token
    greedy: np.ndarray  # bool, the scored token was the argmax
    rows: object | None = None  # torch float32 [n, vocab] log-softmax rows, when asked for


class Scorer:
    """Common face of the backends' scorers."""

    name = "base"
    max_length: int
    vocab_size: int
    prefix_id: int  # put before a document so its first token is scored too

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no special tokens added (documents, choices)."""
        raise NotImplementedError

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the backend tokenizes it for generation (special tokens parsed)."""
        return self.backend.tokenize(text)  # type: ignore[attr-defined]

    def score(self, requests: list[Request], want_rows: bool = False) -> list[Scored]:
        raise NotImplementedError

    def _check(self, requests: list[Request]) -> None:
        for r in requests:
            if not 1 <= r.start < len(r.ids):
                raise ValueError(f"bad request: start {r.start} for {len(r.ids)} tokens")
            if len(r.ids) > self.max_length:
                raise SlimlmError(f"a sequence of {len(r.ids)} tokens is longer than the model's context "
                                  f"({self.max_length}): lower --context or shorten the examples")


def from_logits(logits, targets, want_rows: bool) -> Scored:
    """Log-softmax in fp32 over the rows that predict `targets`, whatever dtype the model ran in."""
    import torch

    rows = torch.log_softmax(logits.float(), dim=-1)
    target = torch.as_tensor(targets, dtype=torch.long, device=rows.device)
    lp = rows.gather(-1, target[:, None])[:, 0]
    greedy = rows.argmax(-1) == target
    return Scored(lp.double().cpu().numpy(), greedy.cpu().numpy(), rows.cpu() if want_rows else None)


__all__ = ["Request", "Scored", "Scorer", "from_logits"]
