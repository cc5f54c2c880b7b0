"""llama.cpp's Q2_K and Q3_K super-block formats, and their reference quantizers, in numpy.

The low-bit companions of kquants.py (Q6_K) and kquants_q45.py (Q4_K, Q5_K), hand-written for the
same reason: gguf-py dequantizes the K-quants but has no quantizer for them. llama-quantize's
Q2_K and Q3_K_S/M/L files are mostly these two types (kquant_formats.py).

    Q2_K   x = d * sc[j] * q - dmin * m[j]   256 weights per super-block, 16 sub-blocks of 16;
           q 0..3, sc[j] and m[j] 4 bits each, d and dmin fp16:
           scales[16] = sc | m << 4, qs[64], d, dmin                          (84 bytes)
    Q3_K   x = d * sc[j] * (q - 4)           q 0..7, sc[j] -32..31 (6 bits, stored + 32), d fp16:
           hmask[32], qs[64], scales[12], d                                   (110 bytes)

Bytes: for each half h (weights 128h..128h+127) and l < 32, qs[32h + l] holds the low two bits of
q[128h + l], q[128h + 32 + l], q[128h + 64 + l], q[128h + 96 + l] at bits 0, 2, 4, 6. Q3_K's third
bit of q[i] is bit i // 32 of hmask[i % 32]; its 6-bit scale s[j] = sc[j] + 32 has the low four
bits in scales[j] (j < 8) or the high nibble of scales[j - 8], the top two at bit 2*(j // 4) of
scales[8 + j % 4].

`quantize_q2_k` / `quantize_q3_k` reproduce `quantize_row_q2_K_ref` / `quantize_row_q3_K_ref`
(ggml-quants.c; what llama-quantize runs without an importance matrix) bit for bit. Q2_K: each
sub-block's scale and min from `make_qkx2_quants(16, 3, x, |x|, ..., -0.5f, 0.1f, 15, use_mad)`
(weighted absolute error), rounded to 4 bits against the super-block maxima, codes rounded again.
Q3_K: each sub-block's scale from `make_q3_quants(16, 4, x, L, do_rmse)`: round at -4/max, then up
to five passes that move one code at a time while the x²-weighted fit improves (a pass that changes
nothing is a fixed point, so always running five gives the C loop's result), the scales rounded to
6 bits against -32/max_scale, codes rounded again. float32 in llama.cpp's order and its
`nearest_int`, as kquants.py does; the loops run over the 16 weights, vectorized over sub-blocks.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from slimlm.compress.kquants import QK_K, nearest_int, sum16
from slimlm.compress.kquants_q45 import scale_min_fit
from slimlm.errors import SlimlmError

__all__ = ["Q2_K", "Q3_K", "Q2_K_BYTES", "Q3_K_BYTES", "q2_k_codes", "q3_k_codes", "pack_q2_k", "pack_q3_k",
           "quantize_q2_k", "quantize_q3_k", "dequantize_q2_k_codes", "dequantize_q3_k_codes"]

Q2_K = GGMLQuantizationType.Q2_K
Q3_K = GGMLQuantizationType.Q3_K
Q2_K_BYTES = 84
Q3_K_BYTES = 110
_F = np.float32
_EPS = _F(1e-15)  # GROUP_MAX_EPS
_CHUNK = 1 << 14  # sub-blocks per vectorized step


def _check(w: np.ndarray, name: str) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % QK_K:
        raise SlimlmError(f"{name} needs rows whose length is a multiple of {QK_K}, got shape {w.shape}: "
                          "store this tensor in another type (Q4_0 takes multiples of 32)")
    return w


def _by_subblock(w: np.ndarray, fn) -> tuple[np.ndarray, ...]:
    """fn on the (16, n) transposed sub-blocks of w, chunk by chunk: its outputs stacked per sub-block."""
    x = w.reshape(-1, 16)
    parts = [fn(np.ascontiguousarray(x[s:s + _CHUNK].T)) for s in range(0, x.shape[0], _CHUNK)]
    return tuple(np.concatenate([p[k].T if p[k].ndim == 2 else p[k] for p in parts]) for k in range(len(parts[0])))


def _make_qkx2_mad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(16, 3, x, |x|, L, &the_min, Laux, -0.5f, 0.1f, 15, true) for each column of
    x (16, n): (scale float32 (n,), the_min float32 (n,), L uint8 (16, n))."""
    w = np.abs(x)
    mn = np.minimum(x.min(axis=0), _F(0))
    mx = x.max(axis=0)
    flat = mx == mn
    sum_w, sum_x = sum16(w), sum16(w * x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # iscale * (x - min) stays within [0, 4.5] off the flat columns, where np.rint is nearest_int
        iscale = _F(3) / (mx - mn)
        scale = _F(1) / iscale
        L = np.clip(np.rint(iscale * (x - mn)), 0, 3)
        best = sum16(w * np.abs((scale * L + mn) - x))
        for step in range(16):
            # the C loop reads `min` as it goes: a better candidate's min moves the later ones' grid
            iscale = ((_F(-0.5) + _F(0.1) * _F(step)) + _F(3)) / (mx - mn)
            la = np.clip(np.rint(iscale * (x - mn)), 0, 3)
            wl = w * la
            sum_l, sum_l2, sum_xl = sum16(wl), sum16(wl * la), sum16(wl * x)
            this_scale, this_min, D = scale_min_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl)
            cur = sum16(w * np.abs((this_scale * la + this_min) - x))
            better = (D > 0) & (cur < best) & ~flat
            L = np.where(better, la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat, _F(0), L).astype(np.uint8)
    return np.where(flat, _F(0), scale).astype(_F), (-mn).astype(_F), L


def q2_k_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's reference Q2_K choice for float32 weights whose last axis is a multiple of 256:
    (q uint8 0..3 shaped like w, sc uint8 0..15 (..., n/16), m uint8 0..15 (..., n/16),
    d float16 (..., n/256), dmin float16 (..., n/256))."""
    w = _check(w, "Q2_K")
    lead = w.shape[:-1]
    scales, mins, L = _by_subblock(w, _make_qkx2_mad)
    nb = scales.size // 16
    scales, mins, L, xb = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 16, 16), w.reshape(nb, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(max_scale > 0, _F(15) / max_scale, _F(0)).astype(_F)
        imin = np.where(max_min > 0, _F(15) / max_min, _F(0)).astype(_F)
        # y.scales[j] = l (uint8), then |= l_min << 4: both ints wrap to the low byte
        byte = (nearest_int(iscale[:, None] * scales) | (nearest_int(imin[:, None] * mins) << 4)) & 0xFF
        d = (max_scale / _F(15)).astype(np.float16)
        dmin = (max_min / _F(15)).astype(np.float16)
        dd = d.astype(_F)[:, None] * (byte & 0xF).astype(_F)
        dm = dmin.astype(_F)[:, None] * (byte >> 4).astype(_F)
        fresh = np.clip(nearest_int((xb + dm[:, :, None]) / dd[:, :, None]), 0, 3)
    # a sub-block whose stored scale is 0 keeps make_qkx2_quants' codes, as the C loop `continue`s
    L = np.where((dd != 0)[:, :, None], fresh, L).astype(np.uint8)
    return (L.reshape(w.shape), (byte & 0xF).astype(np.uint8).reshape(*lead, -1),
            (byte >> 4).astype(np.uint8).reshape(*lead, -1), d.reshape(*lead, -1), dmin.reshape(*lead, -1))


def _make_q3_quants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(16, 4, x, L, true) for each column of x (16, n): (scale float32 (n,), L uint8 0..7)."""
    ax = np.abs(x)
    imax = ax.argmax(axis=0)  # the first of equal magnitudes, as `ax > amax` keeps it
    cols = np.arange(x.shape[1])
    mx, zero = x[imax, cols], ax[imax, cols] < _EPS
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = np.clip(nearest_int((_F(-4) / np.where(zero, _F(1), mx)) * x), -4, 3).astype(_F)
        sumlx, suml2 = sum16(wx * L), sum16((w * L) * L)
        for _ in range(5):
            for i in range(16):
                li = L[i]
                slx0 = sumlx - wx[i] * li
                sl20 = suml2 - (w[i] * li) * li
                new = np.clip(nearest_int((x[i] * sl20) / slx0), -4, 3).astype(_F)
                slx = slx0 + wx[i] * new
                sl2 = sl20 + (w[i] * new) * new
                take = (slx0 > 0) & (new != li) & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
                L[i] = np.where(take, new, li)
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _F(0)).astype(_F)
    L = (L + 4).astype(np.uint8)
    L[:, zero] = 0  # an all-zero sub-block returns codes 0, not 4
    return np.where(zero, _F(0), scale).astype(_F), L


def q3_k_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's reference Q3_K choice for float32 weights whose last axis is a multiple of 256:
    (q uint8 0..7 shaped like w, sc int8 -32..31 (..., n/16), d float16 (..., n/256))."""
    w = _check(w, "Q3_K")
    lead = w.shape[:-1]
    scales, L = _by_subblock(w, _make_q3_quants)
    nb = scales.size // 16
    scales, L, xb = scales.reshape(nb, 16), L.reshape(nb, 16, 16), w.reshape(nb, 16, 16)
    imax = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), imax]
    live = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (_F(-32) / np.where(live, max_scale, _F(1))).astype(_F)
        l8 = ((nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
        sc = np.where(live[:, None], np.clip(l8, -32, 31), -32).astype(np.int8)  # all-zero bytes: -32
        d = np.where(live, _F(1) / iscale, _F(0)).astype(np.float16)
        dd = d.astype(_F)[:, None] * sc.astype(_F)
        fresh = np.clip(nearest_int(xb / dd[:, :, None]), -4, 3) + 4
    L = np.where((dd != 0)[:, :, None], fresh, L).astype(np.uint8)
    return L.reshape(w.shape), sc.reshape(*lead, -1), d.reshape(*lead, -1)


def _codes(q, nmax: int, name: str) -> tuple[tuple, int, np.ndarray]:
    q = np.asarray(q)
    if q.dtype.kind not in "iu" or q.shape[-1] % QK_K or q.min(initial=0) < 0 or q.max(initial=0) > nmax:
        raise SlimlmError(f"{name} codes must be integers 0..{nmax} in rows of a multiple of {QK_K}")
    return q.shape[:-1], q.size // QK_K, q.reshape(q.size // QK_K, 2, 4, 32).astype(np.uint8)


def _qs(Lr: np.ndarray) -> np.ndarray:
    """Low two bits of (block, half, quarter, position) codes -> qs[64] per block."""
    lo = Lr & 3
    return (lo[:, :, 0] | (lo[:, :, 1] << 2) | (lo[:, :, 2] << 4) | (lo[:, :, 3] << 6)).reshape(len(Lr), 64)


def _fp16_bytes(v, nb: int) -> np.ndarray:
    return np.asarray(v).reshape(nb).astype(np.float16).view(np.uint8).reshape(nb, 2)


def pack_q2_k(q, sc, m, d, dmin) -> np.ndarray:
    """Codes q (0..3), 4-bit scales and mins, fp16 d and dmin -> GGUF Q2_K bytes (..., n/256 * 84)."""
    lead, nb, Lr = _codes(q, 3, "Q2_K")
    sc, m = np.asarray(sc).reshape(-1), np.asarray(m).reshape(-1)
    if sc.size != nb * 16 or m.size != nb * 16 or np.size(d) != nb or np.size(dmin) != nb:
        raise SlimlmError(f"Q2_K needs 16 scales, 16 mins, one d and one dmin per {QK_K} weights")
    if min(sc.min(initial=0), m.min(initial=0)) < 0 or max(sc.max(initial=0), m.max(initial=0)) > 15:
        raise SlimlmError("Q2_K sub-block scales and mins must be 4-bit (0..15)")
    scales = (sc.astype(np.uint8) | (m.astype(np.uint8) << 4)).reshape(nb, 16)
    out = np.concatenate([scales, _qs(Lr), _fp16_bytes(d, nb), _fp16_bytes(dmin, nb)], axis=1)
    return out.reshape(*lead, -1)


def pack_q3_k(q, sc, d) -> np.ndarray:
    """Codes q (0..7), 6-bit signed scales (-32..31), fp16 d -> GGUF Q3_K bytes (..., n/256 * 110)."""
    lead, nb, Lr = _codes(q, 7, "Q3_K")
    sc = np.asarray(sc).reshape(-1)
    if sc.size != nb * 16 or np.size(d) != nb:
        raise SlimlmError(f"Q3_K needs 16 scales and one d per {QK_K} weights")
    if sc.min(initial=0) < -32 or sc.max(initial=0) > 31:
        raise SlimlmError("Q3_K sub-block scales must be 6-bit signed (-32..31)")
    hi = Lr.reshape(nb, 8, 32) >> 2  # (block, 32-group of weights, position)
    hmask = np.zeros((nb, 32), np.uint8)
    for g in range(8):
        hmask |= hi[:, g] << g
    s = (sc.astype(np.int16) + 32).astype(np.uint8).reshape(nb, 16)
    scales = np.concatenate([(s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4), np.zeros((nb, 4), np.uint8)], axis=1)
    for j in range(16):
        scales[:, 8 + j % 4] |= (s[:, j] >> 4) << (2 * (j // 4))
    out = np.concatenate([hmask, _qs(Lr), scales, _fp16_bytes(d, nb)], axis=1)
    return out.reshape(*lead, -1)


def quantize_q2_k(w: np.ndarray) -> np.ndarray:
    """float32 weights -> the bytes llama.cpp's quantize_row_q2_K_ref writes for them."""
    return pack_q2_k(*q2_k_codes(w))


def quantize_q3_k(w: np.ndarray) -> np.ndarray:
    """float32 weights -> the bytes llama.cpp's quantize_row_q3_K_ref writes for them."""
    return pack_q3_k(*q3_k_codes(w))


def dequantize_q2_k_codes(q, sc, m, d, dmin) -> np.ndarray:
    """The weights llama.cpp reads back from Q2_K codes: d*sc*q - dmin*m, in float32."""
    q = np.asarray(q)
    dd = np.asarray(d, np.float16).astype(_F).reshape(-1, 1) * np.asarray(sc, _F).reshape(-1, 16)
    mm = np.asarray(dmin, np.float16).astype(_F).reshape(-1, 1) * np.asarray(m, _F).reshape(-1, 16)
    x = dd.reshape(-1, 16, 1) * q.reshape(-1, 16, 16).astype(_F) - mm.reshape(-1, 16, 1)
    return x.reshape(q.shape)


def dequantize_q3_k_codes(q, sc, d) -> np.ndarray:
    """The weights llama.cpp reads back from Q3_K codes: d*sc*(q - 4), in float32."""
    q = np.asarray(q)
    dd = np.asarray(d, np.float16).astype(_F).reshape(-1, 1) * np.asarray(sc, _F).reshape(-1, 16)
    return (dd.reshape(-1, 16, 1) * (q.reshape(-1, 16, 16).astype(_F) - 4)).reshape(q.shape)
