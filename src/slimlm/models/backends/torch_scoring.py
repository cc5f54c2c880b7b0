"""The torch backend's native parts for reading a model rather than running it: log-likelihood
scoring (batched, only the scored positions through the LM head) and a token's own bytes."""

from __future__ import annotations

from slimlm.errors import SlimlmError
from slimlm.models.backends.scoring import Request, Scored, Scorer, from_logits


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
                    results[order[first + row]] = from_logits(part, r.ids[r.start:], want_rows)
        return results  # type: ignore[return-value]


def byte_decoder(tokenizer) -> dict:
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


def token_bytes(tokenizer, table: dict, token: int) -> bytes:
    """A token's own bytes from a Hugging Face tokenizer: through the byte-level table (`table`,
    from byte_decoder), SentencePiece's <0xNN> byte fallback, or else its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if table and piece not in tokenizer.all_special_tokens and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    return tokenizer.decode([token]).encode("utf-8")
