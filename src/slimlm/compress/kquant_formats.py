"""Per-tensor GGUF types: llama.cpp's K-quant files (uniform Q3_K/Q4_K/Q5_K/Q6_K, the Q2_K, Q3_K_S/M/L,
Q4_K_S/M and Q5_K_S/M mixes), and the encoders for every type a per-tensor choice can land on.

A K-quant "file type" in llama.cpp is not one type but a rule that gives each tensor its own:
llama-quantize's Q4_K_M stores most weights as Q4_K but attn_v and ffn_down as Q6_K on the layers
its `use_more_bits` picks, and every type falls back to a 32-block type where 256 does not divide
a tensor's width. slimlm writes these files itself (with RTN codes from the byte-exact encoders in
kquants.py / kquants_q45.py / kquants_q23.py / iq4_nl.py), so the rule is kept here, learnt from
`llama_tensor_get_type_impl` and `tensor_type_fallback` in src/llama-quant.cpp of the llama.cpp
that llama-cpp-python 0.3.36 vendors, for dense models (no experts, not Falcon, not the 70B special
case), without an importance matrix:

- attn_v (and a fused attn_qkv, which llama.cpp counts as attn_v): Q4_K_M and Q5_K_M -> Q6_K where
  use_more_bits(layer, n_layers); Q4_K_S -> Q5_K on the first 4 layers; Q3_K_M -> Q5_K on the
  first 2 layers, Q4_K after; Q3_K_L -> Q5_K; Q2_K -> Q4_K where n_gqa (heads per KV head) >= 4,
  else Q3_K;
- ffn_down: Q4_K_M and Q5_K_M -> Q6_K where use_more_bits; Q4_K_S -> Q5_K below n_layers/8;
  Q3_K_M -> Q5_K below n_layers/16, Q4_K after; Q3_K_L -> Q5_K; Q2_K -> Q3_K;
- attn_output: Q3_K_M -> Q4_K; Q3_K_L -> Q5_K; Q2_K -> Q3_K;
- everything else: the file's base type (Q2_K for Q2_K, Q3_K for Q3_K_S/M/L, Q4_K for Q4_K_S/M,
  Q5_K for Q5_K_S/M);
- use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division);
- fallback where the width is not a multiple of 256: Q2_K and Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, and f16 where 32 does not divide it either (so also for IQ4_NL
  and the other 32-block types). Newer llama.cpp falls Q2_K/Q3_K back to IQ4_NL instead; this
  follows the vendored llama.cpp, whose llama-quantize the tests compare against.

The names follow llama-quantize's file types where one exists (gguf:Q2_K is its Q2_K mix, gguf:Q6_K
its Q6_K file); the uniform types that are no file type (gguf:Q3_K, Q4_K, Q5_K) put every quantized
weight in that type (after the same fallback), as llama-quantize --pure does. The token embedding
and output head follow quant_steps.EMBEDDING_DEFAULTS in both cases.
"""

from __future__ import annotations

import re

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from slimlm.compress.blocks import FORMATS, pack, rtn
from slimlm.errors import SlimlmError

__all__ = ["KQUANT_FORMATS", "BASE_TYPE", "MIXES", "ENCODABLE", "is_kquant_format", "kquant_name", "use_more_bits",
           "fallback", "mix_type", "block_size", "tensor_bytes", "encode", "dequantize_type", "file_type_for"]

BASE_TYPE = {"Q3_K": "Q3_K", "Q4_K": "Q4_K", "Q5_K": "Q5_K", "Q6_K": "Q6_K",
             "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
             "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}
KQUANT_FORMATS = tuple(BASE_TYPE)
MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")  # llama.cpp's rule applies
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
ENCODABLE = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FILE_TYPES = {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}  # uniform types: the nearest llama.cpp file type
_LAYER = re.compile(r"blk\.(\d+)\.")


def kquant_name(fmt: str) -> str | None:
    """'gguf:Q4_K_M' -> 'Q4_K_M'; None for a format that is not a K-quant file type."""
    kind, sep, name = fmt.partition(":")
    if not sep or kind.lower() != "gguf":
        return None
    return name.upper() if name.upper() in BASE_TYPE else None


def is_kquant_format(fmt: str) -> bool:
    return kquant_name(fmt) is not None


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block_size(type_name: str) -> int:
    if type_name.upper() == "F16":
        return 1
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0]


def fallback(type_name: str, width: int) -> str:
    """The type llama.cpp stores a tensor `width` wide in when `type_name` was asked for."""
    kind = type_name.upper()
    while kind != "F16" and width % block_size(kind):
        kind = FALLBACK.get(kind, "F16")
    return kind


def _attn_v_type(fmt_name: str, kind: str, layer: int, n_layers: int, n_gqa: int) -> str:
    if fmt_name in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
        return "Q6_K"
    return {"Q4_K_S": "Q5_K" if layer < 4 else kind, "Q3_K_M": "Q5_K" if layer < 2 else "Q4_K",
            "Q3_K_L": "Q5_K", "Q2_K": "Q4_K" if n_gqa >= 4 else "Q3_K"}.get(fmt_name, kind)


def _ffn_down_type(fmt_name: str, kind: str, layer: int, n_layers: int) -> str:
    if fmt_name in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
        return "Q6_K"
    return {"Q4_K_S": "Q5_K" if layer < n_layers // 8 else kind,
            "Q3_K_M": "Q5_K" if layer < n_layers // 16 else "Q4_K",
            "Q3_K_L": "Q5_K", "Q2_K": "Q3_K"}.get(fmt_name, kind)


def mix_type(fmt_name: str, name_gguf: str, n_layers: int, width: int, n_gqa: int = 1, n_expert: int = 0) -> str:
    """The type llama-quantize gives the body tensor `name_gguf` in a `fmt_name` file (see the
    module docstring); the uniform types give every tensor their own type. `n_gqa` (attention
    heads per key/value head) matters for Q2_K's attn_v only: pass it for that file type.
    `n_expert` (routed experts per layer) matters for 8-expert models, whose attention llama.cpp
    keeps in more bits (attn_v and attn_k Q8_0, attn_output Q5_K in the lower mixes), in every
    file type that is one of llama-quantize's (the mixes and Q6_K)."""
    fmt_name = fmt_name.upper()
    if fmt_name not in BASE_TYPE:
        raise SlimlmError(f"unknown K-quant file type {fmt_name}: choose one of {', '.join(KQUANT_FORMATS)}")
    kind = BASE_TYPE[fmt_name]
    match = _LAYER.search(name_gguf)
    if fmt_name in MIXES and match:
        layer = int(match.group(1))
        if "attn_v.weight" in name_gguf or "attn_qkv.weight" in name_gguf:
            kind = _attn_v_type(fmt_name, kind, layer, n_layers, n_gqa)
        elif "ffn_down" in name_gguf:
            kind = _ffn_down_type(fmt_name, kind, layer, n_layers)
        elif "attn_output.weight" in name_gguf and n_expert == 8:
            kind = "Q5_K" if fmt_name in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else kind
        elif "attn_output.weight" in name_gguf:
            kind = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "Q2_K": "Q3_K"}.get(fmt_name, kind)
    if n_expert == 8 and (fmt_name in MIXES or fmt_name == "Q6_K") and (
            "attn_v.weight" in name_gguf or "attn_k.weight" in name_gguf):
        kind = "Q8_0"
    return fallback(kind, width)


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` (rows, ..., width) takes in the file as `type_name`."""
    n = int(np.prod(shape))
    if type_name.upper() == "F16":
        return 2 * n
    size, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return n // size * nbytes


def encode(type_name: str, w: np.ndarray):
    """(data, GGMLQuantizationType or None) for float32 weights w as `type_name`, byte for byte as
    llama.cpp's reference quantizers write them (RTN, no importance matrix)."""
    from slimlm.compress.iq4_nl import IQ4_NL, quantize_iq4_nl
    from slimlm.compress.kquants import Q6_K, quantize_q6_k
    from slimlm.compress.kquants_q23 import Q2_K, Q3_K, quantize_q2_k, quantize_q3_k
    from slimlm.compress.kquants_q45 import Q4_K, Q5_K, quantize_q4_k, quantize_q5_k

    kind = type_name.upper()
    if kind == "F16":
        return w.astype(np.float16), None
    reference = {"Q2_K": (quantize_q2_k, Q2_K), "Q3_K": (quantize_q3_k, Q3_K), "Q4_K": (quantize_q4_k, Q4_K),
                 "Q5_K": (quantize_q5_k, Q5_K), "Q6_K": (quantize_q6_k, Q6_K), "IQ4_NL": (quantize_iq4_nl, IQ4_NL)}
    if kind in reference:
        quantizer, qtype = reference[kind]
        return quantizer(w), qtype
    if kind not in FORMATS:
        raise SlimlmError(f"slimlm cannot encode GGUF type {type_name}: choose one of {', '.join(ENCODABLE)}")
    fmt = FORMATS[kind]
    return pack(fmt, *rtn(fmt, w)), fmt.qtype


WEIGHTED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")  # slimlm has their imatrix rules


def encode_weighted(type_name: str, w: np.ndarray, importance):
    """(data, GGMLQuantizationType) for w [rows, cols] as llama-quantize --imatrix writes it, with
    `importance` one value per column (E[x_j²] of the layer's input); `encode` for a type without
    such a rule here (Q8_0 has none in llama.cpp either; Q2_K, Q3_K and IQ4_NL slimlm lacks)."""
    from slimlm.compress.blocks import FORMATS
    from slimlm.compress.blocks_imatrix import quantize_block_weighted
    from slimlm.compress.kquants import Q6_K, pack_q6_k, q6_k_codes
    from slimlm.compress.kquants_imatrix import importance_row, quantize_q4_k_weighted, quantize_q5_k_weighted
    from slimlm.compress.kquants_q45 import Q4_K, Q5_K

    kind = type_name.upper()
    w = np.ascontiguousarray(w, dtype=np.float32)
    if kind not in WEIGHTED_TYPES or w.ndim != 2:
        return encode(kind, w)
    if kind in FORMATS:
        return quantize_block_weighted(kind, w, importance), FORMATS[kind].qtype
    if kind == "Q6_K":
        return pack_q6_k(*q6_k_codes(w, importance_row(importance, w.shape[1]))), Q6_K
    coder, qtype = {"Q4_K": (quantize_q4_k_weighted, Q4_K), "Q5_K": (quantize_q5_k_weighted, Q5_K)}[kind]
    return coder(w, importance), qtype


def dequantize_type(type_name: str, w: np.ndarray, importance=None) -> np.ndarray:
    """What llama.cpp reads back after storing w as `type_name` (float32, w's shape); with
    `importance`, stored by the importance-matrix rule (encode_weighted)."""
    from gguf.quants import dequantize

    w = np.ascontiguousarray(w, dtype=np.float32)
    data, qtype = encode(type_name, w) if importance is None else encode_weighted(type_name, w, importance)
    if qtype is None:
        return data.astype(np.float32)
    return dequantize(data, qtype).reshape(w.shape).astype(np.float32)


def file_type_for(type_name: str) -> str:
    """The `general.file_type` (LlamaFileType MOSTLY_*) name for a file mostly in `type_name`."""
    kind = type_name.upper()
    return {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(kind, kind) if kind != "F16" else "F16"
