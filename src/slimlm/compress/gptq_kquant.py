"""GPTQ inside llama.cpp's K-quant super-blocks (Q4_K, Q5_K, Q6_K), and GPTQ for any per-tensor type.

Why: K-quant files (gguf:Q4_K_M ...) and per-tensor mixed-precision files used to get round-to-
nearest codes only, so `--method gptq` could not write them. GPTQ needs only two things from a
format (compress/gptq.py `gptq_columns`): a rule that chooses a group of columns' scales from
weights, and a way to code one column on those scales. For the K-quants both come from the
byte-exact reference encoders, reused unchanged:

- Q4_K / Q5_K: 256 columns per super-block, 8 sub-blocks of 32 with 6-bit scale sc and min m
  against fp16 d and dmin, x = d*sc*q - dmin*m (q 0..15 / 0..31). A super-block is fitted by
  kquants_q45.qkx_codes (llama.cpp's make_qkx2_quants search, then the 6-bit rounding).
- Q6_K: 16 sub-blocks of 16 with int8 scales against fp16 d, x = d*sc*(q-32) (q 0..63), fitted by
  kquants.q6_k_codes (make_qx_quants, then the int8 rounding).

At the start of each 256-column super-block (or up front from the original weights, with
act-order: GPTQ's static groups, as the 32-block types do) the super-block's stored scales are
chosen with llama.cpp's rule from the current, error-updated weights. By default that is the rule
llama-quantize uses with an importance matrix (kquants_imatrix.py) with diag(H) as the importance,
which is what an imatrix is: the mean square of each input column; `weighted=False` takes the
reference rule. Each column is then coded with the very arithmetic the reference uses for its
final codes (`nearest_int((x + dmin*m) / (d*sc))`, clamped; Q6_K `nearest_int(x / (d*sc))`), and
the error propagated is that of the value the file stores. With no correlation between inputs (H
diagonal) nothing propagates and the result is llama.cpp's bytes exactly (llama-quantize's with
--imatrix diag(H), or without one), which is what the tests check; with correlated inputs later
columns absorb earlier columns' rounding error, as in GPTQ. Where a sub-block's stored scale is 0
the reference keeps its search's codes (they all dequantize to the same value); so does this.

`gptq_encode` gives any type a per-tensor file can hold (F16, the 32-block types through
gptq.gptq_quantize, the K-quants here) as (bytes, GGML type, the values llama.cpp reads back).
"""

from __future__ import annotations

import numpy as np

from slimlm.compress.blocks import FORMATS, dequantize_codes, pack
from slimlm.compress.gptq import (
    DEFAULT_ACT_ORDER,
    DEFAULT_DAMP,
    DEFAULT_WEIGHTED,
    gptq_columns,
    gptq_quantize,
    hessian_importance,
)
from slimlm.compress.kquants import Q6_K, QK_K, dequantize_q6_k_codes, nearest_int, pack_q6_k, q6_k_codes
from slimlm.compress.kquants_imatrix import qkx_codes_weighted
from slimlm.compress.kquants_q45 import Q4_K, Q5_K, pack_q4_k, pack_q5_k, qkx_codes
from slimlm.errors import SlimlmError

__all__ = ["KQUANT_TYPES", "CODED_TYPES", "QKXGrid", "Q6KGrid", "gptq_kquant", "pack_kquant", "dequantize_kquant",
           "gptq_encode", "typed_coder"]

KQUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K")
CODED_TYPES = ("F16", *KQUANT_TYPES, *FORMATS)  # what gptq_encode codes with GPTQ; others get RTN
_NMAX = {"Q4_K": 15, "Q5_K": 31}
_F = np.float32


def _check_width(type_name: str, w: np.ndarray) -> None:
    if w.ndim != 2 or w.shape[1] == 0 or w.shape[1] % QK_K:
        raise SlimlmError(f"{type_name} needs 2-D weights whose width is a multiple of {QK_K}, got {w.shape}")


class QKXGrid:
    """Q4_K / Q5_K super-blocks for gptq_columns: (q, sc, m, d, dmin) as qkx_codes returns them."""

    block = QK_K

    def __init__(self, type_name: str, rows: int, cols: int, importance: np.ndarray | None = None):
        self.nmax, self.importance = _NMAX[type_name], importance
        self.q = np.zeros((rows, cols), np.uint8)
        self.fitted = np.zeros((rows, cols), np.uint8)  # the search's codes, kept where d*sc is 0
        self.sc, self.m = np.zeros((rows, cols // 32), np.uint8), np.zeros((rows, cols // 32), np.uint8)
        self.d, self.dmin = np.zeros((rows, cols // QK_K), np.float16), np.zeros((rows, cols // QK_K), np.float16)
        self.dd, self.dm = np.zeros((rows, cols // 32), _F), np.zeros((rows, cols // 32), _F)

    def fit(self, start: int, w: np.ndarray) -> None:
        if self.importance is None:
            q, sc, m, d, dmin = qkx_codes(w, self.nmax)
        else:
            q, sc, m, d, dmin = qkx_codes_weighted(w, self.importance[start:start + w.shape[1]], self.nmax)
        s, b = slice(start // 32, (start + w.shape[1]) // 32), slice(start // QK_K, (start + w.shape[1]) // QK_K)
        self.fitted[:, start:start + w.shape[1]] = q
        self.sc[:, s], self.m[:, s], self.d[:, b], self.dmin[:, b] = sc, m, d, dmin
        self.dd[:, s] = np.repeat(d.astype(_F), 8, axis=1) * sc.astype(_F)  # as qkx_codes and llama.cpp
        self.dm[:, s] = np.repeat(dmin.astype(_F), 8, axis=1) * m.astype(_F)

    def code(self, col: int, x: np.ndarray) -> np.ndarray:
        dd, dm = self.dd[:, col // 32], self.dm[:, col // 32]
        with np.errstate(divide="ignore", invalid="ignore"):
            fresh = np.clip(nearest_int((x + dm) / dd), 0, self.nmax)
        q = np.where(dd != 0, fresh, self.fitted[:, col]).astype(np.uint8)
        self.q[:, col] = q
        return dd * q.astype(_F) - dm

    def result(self):
        return self.q, self.sc, self.m, self.d, self.dmin


class Q6KGrid:
    """Q6_K super-blocks for gptq_columns: (q, sc, d) as q6_k_codes returns them."""

    block = QK_K

    def __init__(self, type_name: str, rows: int, cols: int, importance: np.ndarray | None = None):
        self.importance = importance
        self.q, self.fitted = np.zeros((rows, cols), np.uint8), np.zeros((rows, cols), np.uint8)
        self.sc, self.dd = np.zeros((rows, cols // 16), np.int8), np.zeros((rows, cols // 16), _F)
        self.d = np.zeros((rows, cols // QK_K), np.float16)

    def fit(self, start: int, w: np.ndarray) -> None:
        q, sc, d = q6_k_codes(w, None if self.importance is None else self.importance[start:start + w.shape[1]])
        s, b = slice(start // 16, (start + w.shape[1]) // 16), slice(start // QK_K, (start + w.shape[1]) // QK_K)
        self.fitted[:, start:start + w.shape[1]] = q
        self.sc[:, s], self.d[:, b] = sc, d
        self.dd[:, s] = np.repeat(d.astype(_F), 16, axis=1) * sc.astype(_F)

    def code(self, col: int, x: np.ndarray) -> np.ndarray:
        dd = self.dd[:, col // 16]
        with np.errstate(divide="ignore", invalid="ignore"):
            fresh = np.clip(nearest_int(x / dd), -32, 31) + 32
        q = np.where(dd != 0, fresh, self.fitted[:, col]).astype(np.uint8)
        self.q[:, col] = q
        return dd * (q.astype(_F) - _F(32))

    def result(self):
        return self.q, self.sc, self.d


def gptq_kquant(type_name: str, w: np.ndarray, H: np.ndarray, damp: float = DEFAULT_DAMP,
                act_order: bool = DEFAULT_ACT_ORDER, weighted: bool = DEFAULT_WEIGHTED) -> tuple:
    """GPTQ codes and scales of w [rows, cols] (cols a multiple of 256) in Q4_K / Q5_K
    ((q, sc, m, d, dmin), qkx_codes' layout) or Q6_K ((q, sc, d), q6_k_codes' layout); `weighted`:
    scales by llama-quantize's importance-matrix rule with diag(H) as the importance."""
    kind = type_name.upper()
    if kind not in KQUANT_TYPES:
        raise SlimlmError(f"not a K-quant type slimlm's GPTQ writes: {type_name} (one of {', '.join(KQUANT_TYPES)})")
    w = np.asarray(w, dtype=np.float32)
    _check_width(kind, w)
    if not np.isfinite(w).all():
        raise SlimlmError("the weights hold NaN or inf: cannot quantize them")
    importance = hessian_importance(H, w.shape[1], weighted)
    grid = (Q6KGrid if kind == "Q6_K" else QKXGrid)(kind, *w.shape, importance=importance)
    gptq_columns(grid, w, H, damp=damp, act_order=act_order, batch=QK_K)
    return grid.result()


def pack_kquant(type_name: str, codes: tuple) -> np.ndarray:
    """gptq_kquant's result -> the tensor's GGUF bytes (rows, n/256 * block bytes)."""
    return {"Q4_K": pack_q4_k, "Q5_K": pack_q5_k, "Q6_K": pack_q6_k}[type_name.upper()](*codes)


def dequantize_kquant(type_name: str, codes: tuple) -> np.ndarray:
    """The float32 weights llama.cpp reads back from gptq_kquant's result."""
    if type_name.upper() == "Q6_K":
        return dequantize_q6_k_codes(*codes)
    q, sc, m, d, dmin = codes
    rows, cols = q.shape
    dd = np.repeat(d.astype(_F), 8, axis=1) * sc.astype(_F)
    dm = np.repeat(dmin.astype(_F), 8, axis=1) * m.astype(_F)
    return (dd[:, :, None] * q.reshape(rows, -1, 32).astype(_F) - dm[:, :, None]).reshape(rows, cols)


def gptq_encode(type_name: str, w: np.ndarray, H: np.ndarray, damp: float = DEFAULT_DAMP,
                act_order: bool = DEFAULT_ACT_ORDER, notes: list[str] | None = None,
                weighted: bool = DEFAULT_WEIGHTED):
    """(data, GGMLQuantizationType or None for F16, the float32 values llama.cpp reads back) of w
    stored as `type_name` with GPTQ-chosen codes: what kquant_formats.encode gives with RTN codes.
    A type GPTQ does not code here (one kquant_formats encodes, such as a non-linear grid) gets
    RTN's bytes, and a line in `notes`."""
    kind = type_name.upper()
    w = np.asarray(w, dtype=np.float32)
    if kind not in CODED_TYPES:
        from slimlm.compress.kquant_formats import dequantize_type, encode

        if notes is not None and not any(n.startswith(f"{kind}:") for n in notes):
            notes.append(f"{kind}: GPTQ does not code this type, its weights got round-to-nearest")
        return (*encode(kind, w), dequantize_type(kind, w))
    if kind == "F16":
        data = w.astype(np.float16)
        return data, None, data.astype(_F)
    if kind in KQUANT_TYPES:
        codes = gptq_kquant(kind, w, H, damp=damp, act_order=act_order, weighted=weighted)
        qtype = {"Q4_K": Q4_K, "Q5_K": Q5_K, "Q6_K": Q6_K}[kind]
        return pack_kquant(kind, codes), qtype, dequantize_kquant(kind, codes)
    fmt = FORMATS[kind]
    q, d, m = gptq_quantize(fmt, w, H, damp=damp, act_order=act_order, weighted=weighted)
    return pack(fmt, q, d, m), fmt.qtype, dequantize_codes(fmt, q, d, m)


def typed_coder(types: dict[str, str], damp: float = DEFAULT_DAMP, act_order: bool = DEFAULT_ACT_ORDER,
                notes: list[str] | None = None, kept: dict | None = None):
    """For gptq_sequential: `coder(name, w, H) -> ((data, qtype), values read back)` storing each
    weight in its own type, types[name] (a Hugging Face weight name -> GGUF type); a weight in
    `kept` (source_blocks.SourceBlock) is the GGUF parent's bytes, which read back as w exactly."""
    def coder(name: str, w: np.ndarray, H: np.ndarray):
        if kept and name in kept:
            return (kept[name].data, kept[name].qtype), w
        data, qtype, values = gptq_encode(types[name], w, H, damp=damp, act_order=act_order, notes=notes)
        return (data, qtype), values
    return coder
