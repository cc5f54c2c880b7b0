"""Log-probabilities for the API's `logprobs` and `echo`, from slimlm's own scorer.

The numbers come from the backend's own scorer, the code under `slimlm eval`, so a harness that
scores multiple choice through the server (lm-evaluation-harness's local-completions) gets exactly
the numbers `slimlm eval` gets on the same model in the same precision (the server computes in the
backend's plan, `slimlm eval --dtype auto`; eval's default is fp32). Token texts are built from
each token's own bytes, which is what OpenAI's `bytes` field carries when a token is only part of
a character.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for a prompt's first token, which has no context
    top: list[tuple[str, float]] = field(default_factory=list)  # the most likely tokens at this position
    raw: bytes | None = None  # the token's bytes (its text may hold a replacement character)


class Scoring:
    """Token texts and log-probabilities for one backend. Scoring runs in the engine's worker,
    under its lock, like generation."""

    def __init__(self, backend, context: int) -> None:
        self.backend, self.context = backend, context
        self._scorer = None
        self.reuse_prefix = True  # the scorer reuses the prefix it shares with the request before
    @property
    def available(self) -> bool:
        return self.backend.supports("score")

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes, which may be part of a character (byte-level vocabularies)."""
        return self.backend.token_bytes(token)

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def scorer(self):
        """The backend's scorer, made on the first request that asks for log-probabilities (on
        llama.cpp that opens a second handle with every position's logits: see its scorer())."""
        if self._scorer is None:
            self._scorer = self.backend.scorer()
            if hasattr(self._scorer, "reuse_prefix"):
                self._scorer.reuse_prefix = self.reuse_prefix
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
        from slimlm.models.backends.scoring import Request

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
        from slimlm.models.backends.scoring import Request

        scorer = self.scorer()
        generated = scorer.encode(text)[:max(0, scorer.max_length - len(ids))]
        if not generated:
            return []
        scored = scorer.score([Request(list(ids) + generated, len(ids))], want_rows=k > 0)[0]
        return [self._lp(t, float(lp), scored.rows[i] if k > 0 else None, k)
                for i, (t, lp) in enumerate(zip(generated, scored.logprobs))]

    def close(self) -> None:
        """The scorer's resources (llama.cpp's second handle) belong to the backend, which closes them."""
        self._scorer = None
