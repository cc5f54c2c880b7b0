"""Helpers both torch decode loops share (torch_backend.py's one-at-a-time stream and
torch_decoder.py's continuous batching): the KV cache cast between the prefill and decode
precisions, and the name forward takes the cache by."""

from __future__ import annotations

import inspect


def cast_cache(cache, dtype) -> None:
    for layer in getattr(cache, "layers", []):
        for attr in ("keys", "values"):
            tensor = getattr(layer, attr, None)
            if tensor is not None and tensor.dtype != dtype:
                setattr(layer, attr, tensor.to(dtype))
        if hasattr(layer, "dtype"):
            layer.dtype = dtype


def cache_keyword(model) -> str:
    """transformers 5.x renamed forward's `past_key_values` to `cache` and warns on the old name;
    a model class whose forward still has only the old name gets that."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
