"""Log-likelihoods of token sequences from either backend: the primitive under perplexity,
fidelity, multiple choice and classification.

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

from slimlm.errors import BackendUnavailable, SlimlmError


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
    """Common face of the two scorers below."""

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


def _from_logits(logits, targets, want_rows: bool) -> Scored:
    import torch

    rows = torch.log_softmax(logits.float(), dim=-1)
    target = torch.as_tensor(targets, dtype=torch.long, device=rows.device)
    lp = rows.gather(-1, target[:, None])[:, 0]
    greedy = rows.argmax(-1) == target
    return Scored(lp.double().cpu().numpy(), greedy.cpu().numpy(), rows.cpu() if want_rows else None)


class TorchScorer(Scorer):
    name = "torch"

    def __init__(self, backend, batch_size: int = 1) -> None:
        self.backend, self.batch_size = backend, max(1, batch_size)
        self.model, self.tokenizer = backend.model, backend.tokenizer  # the prefill (full-precision) copy
        config = self.model.config
        self.max_length = getattr(config, "max_position_embeddings", None) or 1 << 20
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        tok = self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix is None:
            raise SlimlmError("the model's tokenizer has neither a BOS nor an EOS token to start a document with")
        self.prefix_id = int(prefix)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else self.prefix_id)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(self, requests: list[Request], want_rows: bool = False) -> list[Scored]:
        import torch

        self._check(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
        results: list[Scored | None] = [None] * len(requests)
        device = self.backend.device
        with torch.inference_mode():
            for first in range(0, len(order), self.batch_size):
                batch = [requests[i] for i in order[first:first + self.batch_size]]
                width = max(len(r.ids) for r in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, r in enumerate(batch):
                    ids[row, :len(r.ids)] = torch.tensor(r.ids)
                    mask[row, :len(r.ids)] = 1
                # Logits are needed from position (start - 1) on; keep only those rows.
                keep = width - min(r.start for r in batch) + 1
                kwargs = {"attention_mask": mask.to(device)} if len(batch) > 1 else {}
                logits = self.model(input_ids=ids.to(device), use_cache=False, logits_to_keep=keep, **kwargs).logits
                offset = width - keep
                for row, r in enumerate(batch):
                    part = logits[row, r.start - 1 - offset:len(r.ids) - 1 - offset]
                    results[order[first + row]] = _from_logits(part, r.ids[r.start:], want_rows)
        return results  # type: ignore[return-value]


class LlamaCppScorer(Scorer):
    """llama.cpp evaluates one sequence at a time; a request that shares a prefix with the one
    before it (the same question with another choice) reuses the cached prefix."""

    name = "llamacpp"

    def __init__(self, backend) -> None:
        self.backend, self.llm = backend, backend.llm
        if not getattr(self.llm, "_logits_all", False):
            raise BackendUnavailable("this llama.cpp model was opened without logits for every token: "
                                     "open it with logits_all=True to score text")
        self.max_length = self.llm.n_ctx()
        self.vocab_size = self.llm.n_vocab()
        vocab = self.llm._model
        prefix = vocab.token_bos()
        self.prefix_id = int(prefix if prefix is not None and prefix >= 0 else vocab.token_eos())

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
            llm.n_tokens = min(common, len(r.ids) - 1)  # always evaluate at least one token
            llm.eval(r.ids[llm.n_tokens:])
            logits = torch.from_numpy(np.array(llm.scores[r.start - 1:len(r.ids) - 1], dtype=np.float32))
            results.append(_from_logits(logits, r.ids[r.start:], want_rows))
        return results


def make_scorer(backend, batch_size: int = 1) -> Scorer:
    if backend.name == "torch":
        return TorchScorer(backend, batch_size=batch_size)
    if backend.name == "llamacpp":
        return LlamaCppScorer(backend)
    raise BackendUnavailable(f"the {backend.name} backend cannot give log-likelihoods: use --backend torch")
