"""Q4_K and Q5_K as llama-quantize writes them with an importance matrix, in numpy, bit for bit.

Why: an importance matrix (imatrix) is llama.cpp's one calibration lever: per input column j, the
mean of x_j² over calibration tokens, which is diag(H) of GPTQ's Hessian H = XᵀX up to a factor.
With it llama-quantize does not run the reference quantizers (kquants_q45.py) but
`quantize_row_q4_K_impl` / `quantize_row_q5_K_impl`, which choose every scale to minimise the
*importance-weighted* error. slimlm's GPTQ already owns the Hessian; without these rules its
K-quant scales were fitted as if every column mattered equally, and at 5-6 bits per weight, where
the scales matter more than the error feedback, it lost to llama.cpp's imatrix files. Here the same
rules, so GPTQ's super-block scales see what llama.cpp's do (gptq_kquant.py), and a test can hold
the bytes against ggml's own `ggml_quantize_chunk(..., imatrix)`.

Per super-block of 256 weights x with importance qw (ggml-quants.c, read for the rule):
  sigma2 = 2 * sum(x²) / 256; each sub-block of 32 gets weights qw * sqrt(sigma2 + x²) and
  make_qkx3_quants' search (kquants_q45.qkx_search with rmin -0.9, rdelta 0.05, 37 grids);
  the 8 scales and the 8 mins are then rounded to 6 bits by make_qp_quants, which searches the
  super-scale d (dmin) and refines the 6-bit values one at a time, weighted by each sub-block's
  sum of weights; the codes are finally rounded against the stored values, as without imatrix.
Q6_K with an importance matrix is kquants.q6_k_codes(w, qw).
"""

from __future__ import annotations

import numpy as np

from slimlm.compress.kquants import QK_K, nearest_int, sum16
from slimlm.compress.kquants_q45 import qkx_search
from slimlm.errors import SlimlmError

__all__ = ["qkx_codes_weighted", "quantize_q4_k_weighted", "quantize_q5_k_weighted", "importance_row"]

_F = np.float32
_EPS = _F(1e-15)  # GROUP_MAX_EPS
_CHUNK = 1 << 13  # sub-blocks per vectorized step


def importance_row(qw, cols: int) -> np.ndarray:
    """An importance vector for `cols` input columns as float32, checked: finite, not negative."""
    qw = np.asarray(qw, dtype=_F).reshape(-1)
    if qw.size != cols:
        raise SlimlmError(f"the importance matrix has {qw.size} values for a tensor of {cols} columns")
    if not np.isfinite(qw).all() or (qw < 0).any():
        raise SlimlmError("the importance matrix holds a negative, NaN or inf value: recompute it on finite activations")
    return qw


def _make_qp_quants(x: np.ndarray, sw: np.ndarray, nmax: int = 63) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(8, nmax, x, L, sw) for each row of x (nb, 8) (non-negative values: the
    sub-block scales or mins) with weights sw (nb, 8): (the super-scale float32 (nb,), L (nb, 8))."""
    n = x.shape[1]
    mx = np.maximum(x.max(axis=1), _F(0))
    zero = mx < _EPS
    mx = np.where(zero, _F(1), mx)
    nm = _F(nmax)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (nm / mx).astype(_F)
        scale = (_F(1) / iscale).astype(_F)
        L = nearest_int(iscale[:, None] * x).astype(_F)
        diff = x - scale[:, None] * L
        best = sum16(((sw * diff) * diff).T)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = ((_F(0.1) * _F(step) + nm) / mx).astype(_F)
            scale_is = (_F(1) / iscale_is).astype(_F)
            lv = np.minimum(nm, nearest_int(iscale_is[:, None] * x).astype(_F))
            diff = x - scale_is[:, None] * lv
            mse = sum16(((sw * diff) * diff).T)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale).astype(_F)
        L = np.minimum(nm, nearest_int(iscale[:, None] * x).astype(_F))
        sumlx = sum16(((sw * x) * L).T)
        suml2 = sum16(((sw * L) * L).T)
        for _ in range(5):  # a pass that changes nothing leaves the next one nothing to change
            for i in range(n):
                w, xi, li = sw[:, i], x[:, i], L[:, i]
                slx = sumlx - (w * xi) * li
                sl2 = suml2 - (w * li) * li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(nm, nearest_int((xi * sl2) / slx).astype(_F))
                ok &= new_l != li
                slx = slx + (w * xi) * new_l
                sl2 = sl2 + (w * new_l) * new_l
                ok &= ((slx * slx) * suml2) > ((sumlx * sumlx) * sl2)
                L[:, i] = np.where(ok, new_l, li)
                sumlx = np.where(ok, slx, sumlx).astype(_F)
                suml2 = np.where(ok, sl2, suml2).astype(_F)
        d = np.where(suml2 > 0, sumlx / suml2, _F(0)).astype(_F)
    L = L.astype(np.int64) & 0xFF  # stored in uint8_t, as the C array is
    d[zero], L[zero] = 0, 0
    return d, L


def qkx_codes_weighted(w: np.ndarray, qw, nmax: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """llama-quantize's Q4_K (nmax 15) or Q5_K (nmax 31) choice for float32 weights w [rows, cols]
    (cols a multiple of 256) with importance qw (one value per column):
    (q, sc, m, d, dmin) in kquants_q45.qkx_codes' layout, so pack_q4_k / pack_q5_k write them."""
    if nmax not in (15, 31):
        raise SlimlmError(f"nmax must be 15 (Q4_K) or 31 (Q5_K), got {nmax}")
    w = np.ascontiguousarray(w, dtype=_F)
    name = "Q4_K" if nmax == 15 else "Q5_K"
    if w.ndim != 2 or w.shape[1] == 0 or w.shape[1] % QK_K:
        raise SlimlmError(f"{name} needs 2-D weights whose width is a multiple of {QK_K}, got shape {w.shape}")
    qw = importance_row(qw, w.shape[1])
    rows, cols = w.shape
    nb = rows * cols // QK_K
    xs = w.reshape(nb, QK_K)
    sigma2 = (_F(2) * sum16(np.ascontiguousarray((xs * xs).T))) / _F(QK_K)            # (nb,)
    weights = np.broadcast_to(qw, w.shape).reshape(nb, QK_K) * np.sqrt(sigma2[:, None] + xs * xs)
    x, wt = xs.reshape(-1, 32), weights.reshape(-1, 32)
    ns = x.shape[0]
    scales, mins, L = np.empty(ns, _F), np.empty(ns, _F), np.empty((ns, 32), np.uint8)
    for s in range(0, ns, _CHUNK):
        xt, wtt = np.ascontiguousarray(x[s:s + _CHUNK].T), np.ascontiguousarray(wt[s:s + _CHUNK].T)
        scales[s:s + _CHUNK], mins[s:s + _CHUNK], lt = qkx_search(xt, wtt, nmax, -0.9, 0.05, 36)
        L[s:s + _CHUNK] = lt.T
    sw = sum16(np.ascontiguousarray(wt.T)).reshape(nb, 8)
    d_block, ls = _make_qp_quants(scales.reshape(nb, 8), sw)
    m_block, lm = _make_qp_quants(mins.reshape(nb, 8), sw)
    if nmax == 31:  # quantize_row_q5_K_impl clamps; Q4_K's stores the values as they come
        ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    sc, m = ls.astype(np.uint8), lm.astype(np.uint8)
    d, dmin = d_block.astype(np.float16), m_block.astype(np.float16)
    xb, L = x.reshape(nb, 8, 32), L.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = d.astype(_F)[:, None] * sc.astype(_F)
        dm = dmin.astype(_F)[:, None] * m.astype(_F)
        fresh = np.clip(nearest_int((xb + dm[:, :, None]) / dd[:, :, None]), 0, nmax)
    L = np.where((dd != 0)[:, :, None], fresh, L).astype(np.uint8)
    return (L.reshape(w.shape), sc.reshape(rows, -1), m.reshape(rows, -1), d.reshape(rows, -1),
            dmin.reshape(rows, -1))


def quantize_q4_k_weighted(w: np.ndarray, qw) -> np.ndarray:
    """float32 weights [rows, cols] and an importance vector -> the bytes llama-quantize writes as Q4_K."""
    from slimlm.compress.kquants_q45 import pack_q4_k

    return pack_q4_k(*qkx_codes_weighted(w, qw, 15))


def quantize_q5_k_weighted(w: np.ndarray, qw) -> np.ndarray:
    """float32 weights [rows, cols] and an importance vector -> the bytes llama-quantize writes as Q5_K."""
    from slimlm.compress.kquants_q45 import pack_q5_k

    return pack_q5_k(*qkx_codes_weighted(w, qw, 31))
