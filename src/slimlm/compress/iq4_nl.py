"""llama.cpp's IQ4_NL block format (4-bit codes into a non-linear codebook), and its quantizer, in numpy.

Hand-written because gguf-py dequantizes IQ4_NL but cannot quantize it. IQ4_NL is the 32-weight
type llama.cpp's i-quants fall back to where 256 does not divide a tensor's width, and a type a
per-tensor choice can land on (kquant_formats.ENCODABLE).

    IQ4_NL   x = d * kvalues_iq4nl[q]    32 weights per block, q 0..15 indexes the codebook
             (-127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113), d fp16:
             d, qs[16] with qs[j] = q[j] | q[16 + j] << 4                     (18 bytes)

`quantize_iq4_nl` reproduces what ggml_quantize_chunk (so llama-quantize) writes for IQ4_NL
without an importance matrix, bit for bit: `quantize_iq4_nl` -> `quantize_row_iq4_nl_impl(32, 32,
..., ntry=7)` (ggml-quants.c). Per block: weights x², the scale first -max/-127 (max: the value of
largest magnitude), each weight's code the nearest codebook entry (`best_index_int8`), the
least-squares scale sum(w q x) / sum(w q²); then the same for the 15 inverse scales (i - 127)/max,
i = -7..7, keeping the best fit; the codes rounded again against the chosen float32 scale.

The nearest entry is read from a table rather than searched: near a midpoint between two entries
the C comparison x - v[k] < v[k+1] - x is exact in float32 (all codebook gaps are below 25 and
|x| is near the midpoint), so the code is the number of midpoints m with m <= x, that is of the
integers 2m <= floor(2x): one floor and one table lookup per weight and candidate scale.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from slimlm.compress.kquants import sum16
from slimlm.errors import SlimlmError

__all__ = ["IQ4_NL", "QK4_NL", "IQ4_NL_BYTES", "KVALUES_IQ4NL", "iq4_nl_codes", "pack_iq4_nl",
           "quantize_iq4_nl", "dequantize_iq4_nl_codes"]

IQ4_NL = GGMLQuantizationType.IQ4_NL
QK4_NL = 32
IQ4_NL_BYTES = 18
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_F = np.float32
_EPS = _F(1e-15)  # GROUP_MAX_EPS
_NTRY = 7         # quantize_iq4_nl's search width (the ref function's -1 is not what files get)
_CHUNK = 1 << 14  # blocks per vectorized step
_SPAN = 300       # floor(2x) is clipped to [-_SPAN, _SPAN]: beyond the codebook's ends either way
_TWICE_MIDS = KVALUES_IQ4NL[:-1].astype(np.int64) + KVALUES_IQ4NL[1:]
_CODE_OF = np.searchsorted(_TWICE_MIDS, np.arange(-_SPAN, _SPAN + 1), side="right").astype(np.uint8)
_VALUE_OF = KVALUES_IQ4NL[_CODE_OF].astype(_F)


def _table_index(al: np.ndarray) -> np.ndarray:
    """Index into _CODE_OF / _VALUE_OF for best_index_int8(16, kvalues_iq4nl, al); NaN gives 15, as in C."""
    twice = np.floor(al * _F(2))
    twice = np.where(np.isnan(twice), _F(_SPAN), twice)
    return (np.clip(twice, -_SPAN, _SPAN) + _SPAN).astype(np.intp)


def _block_scales(x: np.ndarray) -> np.ndarray:
    """The float32 scale quantize_row_iq4_nl_impl chooses for each column of x (32, n)."""
    ax = np.abs(x)
    imax = ax.argmax(axis=0)  # the first of equal magnitudes, as `ax > amax` keeps it
    cols = np.arange(x.shape[1])
    mx, zero = x[imax, cols], ax[imax, cols] < _EPS
    mx = np.where(zero, _F(1), mx)
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        def fit(inverse_scale):
            q = _VALUE_OF[_table_index(inverse_scale * x)]
            wq = w * q
            return sum16(wq * x), sum16(wq * q)

        sumqx, sumq2 = fit(_F(1) / (-mx / _F(-127)))
        d = np.where(sumq2 > 0, sumqx / sumq2, _F(0)).astype(_F)
        best = d * sumqx
        for itry in range(-_NTRY, _NTRY + 1):
            sumqx, sumq2 = fit(_F(itry - 127) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(_F)
            best = np.where(better, d * sumqx, best).astype(_F)
    return np.where(zero, _F(0), d).astype(_F)


def iq4_nl_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's IQ4_NL choice for float32 weights whose last axis is a multiple of 32:
    (q uint8 0..15 codebook indices shaped like w, d float16 (..., n/32))."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % QK4_NL:
        raise SlimlmError(f"IQ4_NL needs rows whose length is a multiple of {QK4_NL}, got shape {w.shape}: "
                          "store this tensor as f16")
    x = w.reshape(-1, QK4_NL)
    d, q = np.empty(x.shape[0], _F), np.empty(x.shape, np.uint8)
    for s in range(0, x.shape[0], _CHUNK):
        xt = np.ascontiguousarray(x[s:s + _CHUNK].T)
        dc = _block_scales(xt)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv = np.where(dc != 0, _F(1) / np.where(dc != 0, dc, _F(1)), _F(0)).astype(_F)
            q[s:s + _CHUNK] = _CODE_OF[_table_index(inv * xt)].T
        d[s:s + _CHUNK] = dc
    return q.reshape(w.shape), d.astype(np.float16).reshape(*w.shape[:-1], -1)


def pack_iq4_nl(q, d) -> np.ndarray:
    """Codebook indices q (0..15) and fp16 block scales -> GGUF IQ4_NL bytes (..., n/32 * 18)."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu" or q.shape[-1] % QK4_NL or q.min(initial=0) < 0 or q.max(initial=0) > 15:
        raise SlimlmError(f"IQ4_NL codes must be integers 0..15 in rows of a multiple of {QK4_NL}")
    nb = q.size // QK4_NL
    if np.size(d) != nb:
        raise SlimlmError(f"IQ4_NL needs one d per {QK4_NL} weights: got {np.size(d)} for {nb} blocks")
    qb = q.reshape(nb, 2, 16).astype(np.uint8)
    out = np.concatenate([np.asarray(d).reshape(nb).astype(np.float16).view(np.uint8).reshape(nb, 2),
                          qb[:, 0] | (qb[:, 1] << 4)], axis=1)
    return out.reshape(*q.shape[:-1], -1)


def quantize_iq4_nl(w: np.ndarray) -> np.ndarray:
    """float32 weights -> the bytes ggml_quantize_chunk writes for them as IQ4_NL (no importance matrix)."""
    return pack_iq4_nl(*iq4_nl_codes(w))


def dequantize_iq4_nl_codes(q, d) -> np.ndarray:
    """The weights llama.cpp reads back from (q, d): d * kvalues_iq4nl[q], in float32."""
    q = np.asarray(q)
    dd = np.asarray(d, np.float16).astype(_F).reshape(-1, 1)
    return (dd * KVALUES_IQ4NL.astype(_F)[q.reshape(-1, QK4_NL)]).reshape(q.shape)
