"""Continuous batching on the torch backend: the forward pass for decoder.py's schedule.

Every slot keeps its own KV cache, one sequence long, that grows as it reads (transformers'
`DynamicCache`). One step of the schedule runs here as:
- each prompt chunk alone, on the prefill model with the slot's own cache, as the one-at-a-time
  path reads a prompt;
- all the slots that are decoding (one token each) together, in one forward pass of the decode
  model over a *batched* cache: the slots' caches stacked row by row and left-padded to the
  longest, an attention mask hiding the padding, and each row's own position ids. This is how
  transformers' `generate` runs a left-padded batch. The batched cache persists from step to step
  while the same slots decode, and is rebuilt (rows split back into their own caches, then stacked
  again) only when one joins or leaves, so a steady batch pays no copying beyond what
  `DynamicCache` itself does.

Why not transformers' own continuous batching (`generate_batch`, `init_continuous_batching`):
it is a scheduler of its own (its own queue, its own thread, paged cache) that returns finished
requests, while slimlm's scheduler (decoder.py + serve/batching.py) is shared with llama.cpp and
owns streaming, stop strings, per-request samplers, prefix reuse and cancellation. This module
only has to supply the forward pass, as llamacpp_decoder.py does; bench/torch_batching.py measures
the two side by side.

A sliding-window or hybrid cache (Gemma 3's local layers) keeps only the last window of each
sequence, so rows of different lengths cannot share one left-padded layout: those models decode
one at a time (`TorchBackend.batchable` says so and the engine uses --parallel 1).
"""

from __future__ import annotations

import numpy as np

from slimlm.models.backends.decoder import SequenceDecoder


class TorchDecoder(SequenceDecoder):
    def __init__(self, backend, slots: int, batch_tokens: int, context: int) -> None:
        super().__init__(slots, batch_tokens, context)
        self._backend = backend
        self._own: dict = {}  # slot -> its DynamicCache (batch 1), while it is not a row of the batch
        self._rows: list[int] = []  # the slots of the batched cache, in row order
        self._batch = None  # DynamicCache with one left-padded row per slot in _rows
        self._mask = None  # [rows, columns]: 1 where a row's column holds one of its tokens
        self._special = set(backend.tokenizer.all_special_ids)  # (a property that builds a list on each call)

    def is_end(self, token: int) -> bool:
        return token in self._backend.stop_ids

    def text_bytes(self, token: int) -> bytes:
        if token in self._special:
            return b""  # the one-at-a-time stream decodes with skip_special_tokens
        return self._backend.token_bytes(token)

    # -- the forward pass ----------------------------------------------------------------------
    def _passes(self, entries):
        import torch

        decoding = [e for e in entries if len(e[1]) == 1 and e[2] > 0]
        reading = [e for e in entries if e not in decoding]
        with torch.inference_mode():
            for slot, tokens, start, want in reading:  # each alone; its first token can go out at once
                logits = self._read(slot, tokens, start, want)
                yield {slot: logits} if want else {}
            if decoding:
                self._regroup([e[0] for e in decoding])
                yield self._decode(decoding)

    def _read(self, slot: int, tokens: list[int], start: int, want: bool):
        """A prompt chunk, alone, on the prefill model (the one-at-a-time path's prefill)."""
        import torch
        from transformers import DynamicCache

        from slimlm.models.backends.torch_cache import cache_keyword, cast_cache

        b = self._backend
        cache = (self._own.get(slot) if start else None) or DynamicCache()  # from 0: a fresh cache
        cast_cache(cache, b.plan.prefill)
        ids = torch.tensor([tokens], device=b.device)
        positions = torch.arange(start, start + len(tokens), device=b.device)[None]
        logits = b.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{cache_keyword(b.model): cache}).logits
        if want and b.plan.split:
            cast_cache(cache, b.plan.decode)  # the rest of this sequence is decoding
        self._own[slot] = cache
        return logits[0, -1].float().cpu().numpy() if want else None

    def _decode(self, entries) -> dict[int, np.ndarray]:
        """One token for each decoding slot, all in one forward pass over the batched cache."""
        import torch

        from slimlm.models.backends.torch_cache import cache_keyword

        b = self._backend
        ids = torch.tensor([[e[1][0]] for e in entries], device=b.device)
        positions = torch.tensor([[e[2]] for e in entries], device=b.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(entries), 1))], dim=1)
        padded = bool((self._mask == 0).any())
        logits = b.decode_model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                                attention_mask=self._mask if padded else None,
                                **{cache_keyword(b.decode_model): self._batch}).logits
        rows = logits[:, -1].float().cpu().numpy()
        return {slot: rows[i] for i, slot in enumerate(self._rows)}

    # -- the batched cache -----------------------------------------------------------------------
    def _regroup(self, rows: list[int]) -> None:
        """Make the batched cache hold exactly `rows` (in that order): split the old rows back into
        their own caches, then stack the new ones, left-padded to the longest."""
        import torch
        from transformers import DynamicCache

        if rows == self._rows:
            return
        for r, slot in enumerate(self._rows):
            pad = int((self._mask[r] == 0).sum())
            self._own[slot] = DynamicCache(ddp_cache_data=[
                (keys[r:r + 1, :, pad:].contiguous(), values[r:r + 1, :, pad:].contiguous())
                for keys, values, *_ in self._batch])
        self._rows, self._batch, self._mask = list(rows), None, None
        if not rows:
            return
        caches = [self._own.pop(slot) for slot in rows]
        lengths = [c.get_seq_length() for c in caches]
        width = max(lengths)
        layers = []
        for per_slot in zip(*(list(c) for c in caches)):
            keys, values = per_slot[0][0], per_slot[0][1]
            shape = (len(rows), keys.shape[1], width, keys.shape[3])
            k, v = keys.new_zeros(shape), values.new_zeros((*shape[:3], values.shape[3]))
            for i, (ki, vi, *_) in enumerate(per_slot):
                k[i, :, width - lengths[i]:] = ki[0]
                v[i, :, width - lengths[i]:] = vi[0]
            layers.append((k, v))
        self._batch = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.zeros((len(rows), width), dtype=torch.long, device=self._backend.device)
        for i, n in enumerate(lengths):
            self._mask[i, width - n:] = 1

    def _truncate(self, slot: int, keep: int) -> int:
        if slot in self._rows:
            self._regroup([s for s in self._rows if s != slot])
        cache = self._own.get(slot)
        if cache is None or keep == 0:
            self._own.pop(slot, None)
            return 0
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., :keep, :], layer.values[..., :keep, :]
        return keep

    def close(self) -> None:
        self._own.clear()
        self._rows, self._batch, self._mask = [], None, None
