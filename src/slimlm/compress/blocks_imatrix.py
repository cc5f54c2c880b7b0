"""Q4_0, Q4_1, Q5_0 and Q5_1 as llama-quantize writes them with an importance matrix, bit for bit.

Why: a model whose hidden size is not a multiple of 256 (SmolLM2: 576, Gemma 3 270M: 640) cannot
hold K-quants in most of its weights; llama-quantize falls back to these 32-weight block types
(Q4_K -> Q5_0, Q5_K -> Q5_1, ...), so on such models they *are* the file. Without an importance
matrix llama.cpp fits them by their extremes (blocks.rtn); with one it searches each block's scale
for the lowest importance-weighted error, and on SmolLM2 that alone is the difference between KL
0.083 and 0.007 at Q5_K_M's size (bench/RESULTS.md). slimlm's GPTQ fitted these blocks by their
extremes too; with the rules here (diag(H) as the importance) it starts where llama.cpp's imatrix
files are and then spreads the rounding error, and the tests hold the bytes against ggml's own
`ggml_quantize_chunk(..., imatrix)`.

The rule (ggml-quants.c `quantize_row_q4_0_impl` and friends, read for the rule): per row,
sigma2 = sum(x²) / n; each block of 32 gets weights qw * sqrt(sigma2 + x²); Q4_0 / Q5_0 take
make_qx_quants' weighted search over 19 scales around -nmax/max (kquants.make_qx_quants, nmax 8
or 16) and store its least-squares scale; Q4_1 / Q5_1 take make_qkx3_quants' search
(kquants_q45.qkx_search, rmin -0.9, rdelta 0.05, 37 grids) and store its scale and min. The codes
are the search's, not re-rounded against the fp16 values (unlike the K-quants).
"""

from __future__ import annotations

import numpy as np

from slimlm.compress.blocks import get_format, pack
from slimlm.compress.kquants import make_qx_quants, sum16
from slimlm.compress.kquants_imatrix import importance_row
from slimlm.compress.kquants_q45 import qkx_search
from slimlm.errors import SlimlmError

__all__ = ["WEIGHTED_BLOCK_TYPES", "row_sigma2", "block_codes_weighted", "quantize_block_weighted"]

WEIGHTED_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")  # Q8_0 has no importance-matrix rule in llama.cpp
_NMAX = {"Q4_0": 8, "Q5_0": 16, "Q4_1": 15, "Q5_1": 31}
_F = np.float32
_CHUNK = 1 << 14  # blocks per vectorized step


def row_sigma2(w: np.ndarray) -> np.ndarray:
    """sum(x²) / n per row of float32 w, summed in order as the C loop does."""
    w = np.asarray(w, dtype=_F)
    return sum16(np.ascontiguousarray((w * w).T)) / _F(w.shape[1])


def block_codes_weighted(fmt_name: str, w: np.ndarray, qw, sigma2: np.ndarray | None = None):
    """(q, d, m) as blocks.rtn returns them (codes in w's shape; float32 d, and m for the _1 types,
    per row per block), chosen by llama-quantize's importance-matrix rule for w [rows, cols] with
    importance qw (one value per column). sigma2 (per row) defaults to w's own rows; GPTQ passes the
    whole rows' value when it fits a few blocks at a time."""
    kind = fmt_name.upper()
    if kind not in _NMAX:
        raise SlimlmError(f"no importance-matrix rule for {fmt_name}: one of {', '.join(WEIGHTED_BLOCK_TYPES)}")
    fmt = get_format(kind)
    w = np.ascontiguousarray(w, dtype=_F)
    if w.ndim != 2 or w.shape[1] == 0 or w.shape[1] % 32:
        raise SlimlmError(f"{kind} needs 2-D weights whose width is a multiple of 32, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise SlimlmError(f"the weights hold NaN or inf: {kind} cannot store them")
    qw = importance_row(qw, w.shape[1])
    rows, cols = w.shape
    s2 = row_sigma2(w) if sigma2 is None else np.asarray(sigma2, dtype=_F).reshape(rows)
    weights = qw[None, :] * np.sqrt(s2[:, None] + w * w)
    x, wt = w.reshape(-1, 32), weights.reshape(-1, 32)
    nb, nmax = x.shape[0], _NMAX[kind]
    q, d = np.empty((nb, 32), np.int16), np.empty(nb, _F)
    m = None if fmt.symmetric else np.empty(nb, _F)
    for s in range(0, nb, _CHUNK):
        e = min(nb, s + _CHUNK)
        if fmt.symmetric:
            d[s:e], q[s:e] = make_qx_quants(x[s:e], nmax, qw=wt[s:e])
        else:
            scale, the_min, lt = qkx_search(np.ascontiguousarray(x[s:e].T), np.ascontiguousarray(wt[s:e].T),
                                            nmax, -0.9, 0.05, 36)
            d[s:e], m[s:e], q[s:e] = scale, -the_min, lt.T
    shape = (rows, cols // 32)
    return (q.reshape(w.shape).astype(np.uint8 if fmt.qmax > 127 else np.int8), d.reshape(shape),
            None if m is None else m.reshape(shape))


def quantize_block_weighted(fmt_name: str, w: np.ndarray, qw) -> np.ndarray:
    """float32 weights [rows, cols] and an importance vector -> the bytes llama-quantize --imatrix writes."""
    q, d, m = block_codes_weighted(fmt_name, w, qw)
    return pack(fmt_name.upper(), q, d, m)
