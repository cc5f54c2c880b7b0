"""llama.cpp's Q4_K and Q5_K super-block formats, and their reference quantizers, in numpy.

The companion of kquants.py (Q6_K), for the same reason: gguf-py dequantizes the K-quants but
cannot quantize them.

    Q4_K   x = d * sc[j] * q - dmin * m[j]     256 weights per super-block, 8 sub-blocks of 32;
           q 0..15, sc[j] and m[j] 6 bits each (12 bytes), d and dmin fp16:
           d, dmin, scales[12], qs[128]                                       (144 bytes)
    Q5_K   the same with q 0..31: d, dmin, scales[12], qh[32], qs[128]       (176 bytes)

Bytes: scales[j] = sc[j] | (sc[j+4] >> 4) << 6, scales[j+4] = m[j] | (m[j+4] >> 4) << 6,
scales[j+8] = low4(sc[j+4]) | low4(m[j+4]) << 4 for j = 0..3 (get_scale_min_k4's layout);
for each 64 weights c = 0..3 and position l < 32: qs[32c + l] = low4(q[64c + l]) | low4(q[64c + 32 + l]) << 4,
and (Q5_K) bit 2c of qh[l] is the fifth bit of q[64c + l], bit 2c+1 that of q[64c + 32 + l].

`quantize_q4_k` / `quantize_q5_k` reproduce `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`
(ggml-quants.c; what llama-quantize runs without an importance matrix) bit for bit: each
sub-block's scale and min from `make_qkx2_quants(32, nmax, x, weights, ...)` with weights
av_x + |x| (av_x = sqrt(mean(x²)) over the sub-block), searching nstep+1 scales
(rmin + 0.1*is + nmax)/(max - min) by weighted least squares (Q4_K: nmax 15, rmin -1, 20 steps;
Q5_K: nmax 31, rmin -0.5, 15 steps); the scales and mins rounded to 6 bits against their
super-block maxima, and the codes rounded again against the stored values. float32 arithmetic in
llama.cpp's order and its `nearest_int`, as kquants.py does.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from slimlm.compress.kquants import QK_K, nearest_int, sum16
from slimlm.errors import SlimlmError

__all__ = ["Q4_K", "Q5_K", "Q4_K_BYTES", "Q5_K_BYTES", "qkx_codes", "qkx_search", "pack_q4_k", "pack_q5_k",
           "quantize_q4_k", "quantize_q5_k"]

Q4_K = GGMLQuantizationType.Q4_K
Q5_K = GGMLQuantizationType.Q5_K
Q4_K_BYTES = 144
Q5_K_BYTES = 176
_F = np.float32
_PARAMS = {15: (_F(-1.0), 20), 31: (_F(-0.5), 15)}  # nmax -> (rmin, nstep); rdelta is 0.1f
_CHUNK = 1 << 13  # sub-blocks per vectorized step


def scale_min_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weighted least-squares (scale, min, D) of x ~ scale * L + min from the sums over a
    sub-block, with a positive min clamped to 0 (scale refit alone), as make_qkx2_quants and
    Q2_K's variant of it compute each candidate grid; D <= 0 marks a degenerate fit."""
    D = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    pos = this_min > 0
    this_min = np.where(pos, _F(0), this_min)
    this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(_F)
    return this_scale, this_min, D


def _make_qkx2_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(32, nmax, x, av_x + |x|, L, &the_min, Laux, rmin, 0.1f, nstep, false) for
    each column of x (32, n): (scale float32 (n,), the_min float32 (n,), L uint8 (32, n))."""
    rmin, nstep = _PARAMS[nmax]
    av_x = np.sqrt(sum16(x * x) / _F(32))
    return qkx_search(x, av_x[None, :] + np.abs(x), nmax, rmin, _F(0.1), nstep)


def qkx_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin, rdelta, nstep: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weighted scale-and-min search llama.cpp's make_qkx2_quants and make_qkx3_quants share
    (use_mad false), for each column of x (32, n) with weights w (32, n): start from the grid
    spanning [min(x, 0), max(x)], try nstep+1 grids (rmin + rdelta*is + nmax) / (max - min), fit
    scale and min to each by weighted least squares, keep the lowest weighted squared error.
    Returns (scale float32 (n,), the_min float32 (n,), L uint8 (32, n))."""
    mn = np.minimum(x.min(axis=0), _F(0))
    mx = x.max(axis=0)
    flat = mx == mn
    sum_w = sum16(w)
    sum_x = sum16(w * x)
    nm = _F(nmax)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rng = mx - mn
        xm = x - mn[None, :]
        iscale = nm / rng
        scale = _F(1) / iscale
        L = np.clip(nearest_int(iscale[None, :] * xm), 0, nmax).astype(_F)
        diff = (scale[None, :] * L + mn[None, :]) - x
        best = sum16(w * (diff * diff))
        for step in range(nstep + 1):
            # the C loop reads `min` as it goes: a better candidate's min moves the later ones' grid
            rng = mx - mn
            xm = x - mn[None, :]
            iscale = ((_F(rmin) + _F(rdelta) * _F(step)) + nm) / rng
            la = np.clip(nearest_int(iscale[None, :] * xm), 0, nmax).astype(_F)
            wl = w * la
            sum_l, sum_l2, sum_xl = sum16(wl), sum16(wl * la), sum16(wl * x)
            this_scale, this_min, D = scale_min_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl)
            diff = (this_scale[None, :] * la + this_min[None, :]) - x
            cur = sum16(w * (diff * diff))
            better = (D > 0) & (cur < best)
            L = np.where(better[None, :], la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = L.astype(np.uint8)
    L[:, flat] = 0
    scale = np.where(flat, _F(0), scale).astype(_F)
    return scale, (-mn).astype(_F), L


def qkx_codes(w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's reference Q4_K (nmax 15) or Q5_K (nmax 31) choice for float32 weights whose last
    axis is a multiple of 256: (q uint8 0..nmax shaped like w, sc uint8 0..63 (..., n/32),
    m uint8 0..63 (..., n/32), d float16 (..., n/256), dmin float16 (..., n/256))."""
    if nmax not in _PARAMS:
        raise SlimlmError(f"nmax must be 15 (Q4_K) or 31 (Q5_K), got {nmax}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    name = "Q4_K" if nmax == 15 else "Q5_K"
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % QK_K:
        raise SlimlmError(f"{name} needs rows whose length is a multiple of {QK_K}, got shape {w.shape}: "
                          "store this tensor in another type (Q8_0 takes multiples of 32)")
    lead = w.shape[:-1]
    x = w.reshape(-1, 32)
    ns = x.shape[0]
    scales, mins, L = np.empty(ns, _F), np.empty(ns, _F), np.empty((ns, 32), np.uint8)
    for s in range(0, ns, _CHUNK):
        xt = np.ascontiguousarray(x[s:s + _CHUNK].T)
        scales[s:s + _CHUNK], mins[s:s + _CHUNK], lt = _make_qkx2_quants(xt, nmax)
        L[s:s + _CHUNK] = lt.T
    nb = ns // 8
    scales, mins, L, xb = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32), x.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0)).astype(_F)
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0)).astype(_F)
        # uint8 ls = nearest_int(...): the int wraps to its low byte, then MIN(63, ls)
        sc = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
        m = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
        d = (max_scale / _F(63)).astype(np.float16)
        dmin = (max_min / _F(63)).astype(np.float16)
        dd = d.astype(_F)[:, None] * sc.astype(_F)                    # (nb, 8)
        dm = dmin.astype(_F)[:, None] * m.astype(_F)
        fresh = np.clip(nearest_int((xb + dm[:, :, None]) / dd[:, :, None]), 0, nmax)
    # a sub-block whose stored scale is 0 keeps make_qkx2_quants' codes, as the C loop `continue`s
    L = np.where((dd != 0)[:, :, None], fresh, L).astype(np.uint8)
    return L.reshape(w.shape), sc.reshape(*lead, -1), m.reshape(*lead, -1), d.reshape(*lead, -1), \
        dmin.reshape(*lead, -1)


def _head(q, sc, m, d, dmin, nmax: int, name: str) -> tuple[tuple, int, np.ndarray, np.ndarray]:
    q = np.asarray(q)
    if q.dtype.kind not in "iu" or q.shape[-1] % QK_K or q.min(initial=0) < 0 or q.max(initial=0) > nmax:
        raise SlimlmError(f"{name} codes must be integers 0..{nmax} in rows of a multiple of {QK_K}")
    lead, nb = q.shape[:-1], q.size // QK_K
    sc, m = np.asarray(sc).reshape(-1), np.asarray(m).reshape(-1)
    if sc.size != nb * 8 or m.size != nb * 8 or np.size(d) != nb or np.size(dmin) != nb:
        raise SlimlmError(f"{name} needs 8 scales, 8 mins, one d and one dmin per {QK_K} weights")
    if min(sc.min(initial=0), m.min(initial=0)) < 0 or max(sc.max(initial=0), m.max(initial=0)) > 63:
        raise SlimlmError(f"{name} sub-block scales and mins must be 6-bit (0..63)")
    sc, m = sc.reshape(nb, 8).astype(np.uint8), m.reshape(nb, 8).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=1)
    head = np.concatenate([np.asarray(d).reshape(nb).astype(np.float16).view(np.uint8).reshape(nb, 2),
                           np.asarray(dmin).reshape(nb).astype(np.float16).view(np.uint8).reshape(nb, 2),
                           scales], axis=1)
    return lead, nb, head, q.reshape(nb, 4, 2, 32).astype(np.uint8)  # (block, 64-chunk, half, position)


def pack_q4_k(q, sc, m, d, dmin) -> np.ndarray:
    """Codes q (0..15), 6-bit scales and mins, fp16 d and dmin -> GGUF Q4_K bytes (..., n/256 * 144)."""
    lead, nb, head, Lr = _head(q, sc, m, d, dmin, 15, "Q4_K")
    qs = Lr[:, :, 0] | (Lr[:, :, 1] << 4)
    return np.concatenate([head, qs.reshape(nb, 128)], axis=1).reshape(*lead, -1)


def pack_q5_k(q, sc, m, d, dmin) -> np.ndarray:
    """Codes q (0..31), 6-bit scales and mins, fp16 d and dmin -> GGUF Q5_K bytes (..., n/256 * 176)."""
    lead, nb, head, Lr = _head(q, sc, m, d, dmin, 31, "Q5_K")
    lo, hi = Lr & 0xF, Lr >> 4
    qs = lo[:, :, 0] | (lo[:, :, 1] << 4)
    qh = np.zeros((nb, 32), np.uint8)
    for c in range(4):
        qh |= (hi[:, c, 0] << (2 * c)) | (hi[:, c, 1] << (2 * c + 1))
    return np.concatenate([head, qh, qs.reshape(nb, 128)], axis=1).reshape(*lead, -1)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 weights -> the bytes llama.cpp's quantize_row_q4_K_ref writes for them."""
    return pack_q4_k(*qkx_codes(w, 15))


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """float32 weights -> the bytes llama.cpp's quantize_row_q5_K_ref writes for them."""
    return pack_q5_k(*qkx_codes(w, 31))
