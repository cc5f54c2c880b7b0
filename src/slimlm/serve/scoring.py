"""Log-probabilities for the API's `logprobs` and `echo`, from slimlm's own scorer.

The numbers come from slimlm.eval.loglik, the code under `slimlm eval`, so a harness that scores
multiple choice through the server (lm-evaluation-harness's local-completions) gets exactly the
numbers `slimlm eval` gets on the same model. Token texts are built from each token's own bytes,
which is what OpenAI's `bytes` field carries when a token is only part of a character.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for a prompt's first token, which has no context
    top: list[tuple[str, float]] = field(default_factory=list)  # the most likely tokens at this position
    raw: bytes | None = None  # the token's bytes (its text may hold a replacement character)


def _byte_decoder(tokenizer) -> dict:
    """GPT-2's byte-to-character table, inverted, if the tokenizer is byte-level (else empty)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel":
        return {}
    # GPT-2's table: printable bytes stand for themselves, the others for chr(256 + n).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class Scoring:
    """Token texts and log-probabilities for one backend. Scoring runs in the engine's worker,
    under its lock, like generation."""

    def __init__(self, backend, context: int) -> None:
        self.backend, self.context = backend, context
        self._scorer = self._score_backend = None
        self._byte_decoder: dict | None = None

    @property
    def available(self) -> bool:
        return self.backend.name in ("torch", "llamacpp")

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes, which may be part of a character (byte-level vocabularies)."""
        if self.backend.name == "llamacpp":
            return self.backend.llm.detokenize([token], special=True)
        tokenizer = getattr(self.backend, "tokenizer", None)
        if tokenizer is None:
            return str(token).encode()
        piece = tokenizer.convert_ids_to_tokens(token)
        if self._byte_decoder is None:
            self._byte_decoder = _byte_decoder(tokenizer)
        if self._byte_decoder and piece not in tokenizer.all_special_tokens and all(
                c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return tokenizer.decode([token]).encode("utf-8")

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def scorer(self):
        if self._scorer is None:
            from slimlm.eval.loglik import make_scorer

            backend = self.backend
            if backend.name == "llamacpp" and not getattr(backend.llm, "_logits_all", False):
                # llama.cpp keeps logits of every position only when opened with logits_all, which
                # costs n_ctx x vocab floats (800 MB for SmolLM2 at 4096) and slows every prefill.
                # Generation never needs them, so a second handle on the same file (weights are
                # memory-mapped, so shared) opens on the first request that asks for logprobs,
                # as `slimlm eval` opens its own for scoring.
                from slimlm.models.backends import open_backend

                self._score_backend = open_backend(str(backend.ref.path), "llamacpp", logits_all=True,
                                                   n_ctx=self.context)
                backend = self._score_backend
            self._scorer = make_scorer(backend)
        return self._scorer

    def _top(self, row, k: int) -> list[tuple[str, float]]:
        if k <= 0 or row is None:
            return []
        values, order = row.topk(min(k, row.shape[-1]))
        return [(self.token_text(int(i)), float(v)) for v, i in zip(values, order)]

    def _lp(self, token: int, logprob: float | None, row=None, k: int = 0) -> TokenLogprob:
        raw = self.token_bytes(token)
        return TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, self._top(row, k), raw)

    def prompt(self, ids: list[int], k: int, next_token: bool) -> tuple[list[TokenLogprob], TokenLogprob | None]:
        """Each prompt token's log-probability given the ones before it (the first has none), and
        optionally the greedy next token, read off the same forward pass."""
        from slimlm.eval.loglik import Request

        scorer = self.scorer()
        seq = list(ids) + ([scorer.prefix_id] if next_token else [])
        out = [self._lp(ids[0], None)]
        if len(seq) < 2:
            return out, None
        scored = scorer.score([Request(seq, 1)], want_rows=k > 0 or next_token)[0]
        rows = scored.rows
        for pos, token in enumerate(ids[1:]):
            out.append(self._lp(token, float(scored.logprobs[pos]), rows[pos] if rows is not None else None, k))
        if not next_token:
            return out, None
        token = int(rows[-1].argmax())
        return out, self._lp(token, float(rows[-1][token]), rows[-1], k)

    def continuation(self, ids: list[int], text: str, k: int) -> list[TokenLogprob]:
        """Log-probabilities of generated text. Backends stream text, not ids, so the text is
        re-tokenized and scored in one forward pass (for greedy decoding, the numbers the
        sampler saw)."""
        from slimlm.eval.loglik import Request

        scorer = self.scorer()
        generated = scorer.encode(text)[:max(0, scorer.max_length - len(ids))]
        if not generated:
            return []
        scored = scorer.score([Request(list(ids) + generated, len(ids))], want_rows=k > 0)[0]
        return [self._lp(t, float(lp), scored.rows[i] if k > 0 else None, k)
                for i, (t, lp) in enumerate(zip(generated, scored.logprobs))]

    def close(self) -> None:
        if self._score_backend is not None:
            self._score_backend.close()
