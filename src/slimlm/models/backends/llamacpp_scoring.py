"""The llama.cpp backend's log-likelihood scorer, on a llama-cpp-python handle opened with
logits_all (the backend opens one on demand: LlamaCppBackend.scorer)."""

from __future__ import annotations

import numpy as np

from slimlm.errors import BackendUnavailable
from slimlm.models.backends.scoring import Request, Scored, Scorer, from_logits


class LlamaCppScorer(Scorer):
    """llama.cpp evaluates one sequence at a time; a request that shares a prefix with the one
    before it (the same question with another choice) reuses the cached prefix."""

    name = "llamacpp"
    reuse_prefix = True  # False: every request is evaluated whole (to measure what reuse buys)

    def __init__(self, backend, llm=None) -> None:
        self.backend, self.llm = backend, llm if llm is not None else backend.llm
        if not getattr(self.llm, "_logits_all", False):
            raise BackendUnavailable("this llama.cpp model was opened without logits for every token: "
                                     "open it with logits_all=True to score text")
        self.max_length = self.llm.n_ctx()
        self.vocab_size = self.llm.n_vocab()
        prefix = self.llm.token_bos()
        self.prefix_id = int(prefix if prefix is not None and prefix >= 0 else self.llm.token_eos())

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def score(self, requests: list[Request], want_rows: bool = False) -> list[Scored]:
        import torch

        self._check(requests)
        llm, results = self.llm, []
        for r in requests:
            cached = llm.input_ids[:llm.n_tokens].tolist()
            common = 0
            for a, b in zip(cached, r.ids):
                if a != b:
                    break
                common += 1
            llm.n_tokens = min(common, len(r.ids) - 1) if self.reuse_prefix else 0  # at least one token is read
            llm.eval(r.ids[llm.n_tokens:])
            logits = torch.from_numpy(np.array(llm.scores[r.start - 1:len(r.ids) - 1], dtype=np.float32))
            results.append(from_logits(logits, r.ids[r.start:], want_rows))
        return results
