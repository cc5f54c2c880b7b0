"""llama.cpp's Q6_K super-block format, and its reference quantizer, in numpy.

Hand-written because the `gguf` package (gguf-py, llama.cpp's Python mirror that blocks.py checks
against) dequantizes the K-quants but has no quantizer for them: `gguf.quants.quantize(w, Q6_K)`
raises NotImplementedError. slimlm uses Q6_K where llama-quantize does by default: the output
head (or a tied token embedding) of a 4- and 5-bit file (`slimlm quantize --embeddings Q6_K`).

    Q6_K   x = d * sc[j] * (q - 32)     256 weights per super-block, 16 sub-blocks of 16;
           q 0..63 (6 bits), sc[j] int8 per sub-block, d fp16 per super-block:
           ql[128] low 4 bits, qh[64] high 2 bits, scales[16], d             (210 bytes)

Bytes, for each half h (weights 128h..128h+127, quarters k=0..3 of 32, position l in a quarter):
ql[64h + l] = low4(q[k=0]) | low4(q[k=2]) << 4, ql[64h + 32 + l] = low4(q[k=1]) | low4(q[k=3]) << 4,
qh[32h + l] = high2(q[k=0]) | high2(q[k=1]) << 2 | high2(q[k=2]) << 4 | high2(q[k=3]) << 6.

`quantize_q6_k` reproduces `quantize_row_q6_K_ref` (ggml-quants.c; what llama-quantize runs for
Q6_K without an importance matrix) bit for bit: each sub-block's scale from `make_qx_quants(16, 32,
x, L, rmse_type=1)` (round at -32/max, then try 18 nearby scales and keep the one with the best
x²-weighted least-squares fit), the sub-block scales rounded to int8 against d = max_scale/-128,
and the codes rounded again against the stored d*sc. The arithmetic is float32 in llama.cpp's
order (sequential sums, no fused multiply-add: the shipped library's SSE2 build has none), and
rounding is llama.cpp's `nearest_int` bit trick, emulated exactly.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from slimlm.errors import SlimlmError

__all__ = ["Q6_K", "QK_K", "Q6_K_BYTES", "make_qx_quants", "q6_k_codes", "pack_q6_k", "quantize_q6_k", "dequantize_q6_k_codes"]

Q6_K = GGMLQuantizationType.Q6_K
QK_K = 256                # weights per super-block
Q6_K_BYTES = 210          # ql[128] qh[64] scales[16] d(fp16)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS: a group below it is all zero
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23
_CHUNK = 1 << 14          # sub-blocks per vectorized step (~20 MB arrays: stays in cache)


def nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5*2^23 in float32 and read the mantissa (ties to even; for
    |f| >= 2^22, where llama.cpp asserts in debug builds, the same wrapped bits)."""
    val = (np.asarray(f, dtype=np.float32) + _MAGIC).view(np.int32)
    return (val & 0x007FFFFF) - 0x00400000


def sum16(a: np.ndarray) -> np.ndarray:
    """Sum over the first axis (the 16 weights of a sub-block) in float32, in order, as the C loop does."""
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def make_qx_quants(x: np.ndarray, nmax: int = 32, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for each row of x (n_sub, 16), weights qw
    (the same shape: an importance matrix) or, without them, x²:
    (scale float32 per row, L uint8 codes 0..2*nmax-1)."""
    n = x.shape[0]
    ax = np.abs(x)
    imax = ax.argmax(axis=1)  # the first of equal magnitudes, as `ax > amax` keeps it
    rows = np.arange(n)
    mx, amax = x[rows, imax], ax[rows, imax]
    zero = amax < _EPS
    mx = np.where(zero, np.float32(1), mx)
    xt = np.ascontiguousarray(x.T)[:, :, None]  # (16, n, 1): sums run over contiguous slices
    w = xt * xt if qw is None else np.ascontiguousarray(np.asarray(qw, np.float32).T)[:, :, None]
    wx = w * xt
    is_ = np.array([i for i in range(-9, 10) if i], dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        # candidate 0 is -nmax/max; then -(nmax + 0.1f*is)/max for is = -9..-1, 1..9
        steps = np.concatenate([[np.float32(nmax)], np.float32(nmax) + np.float32(0.1) * is_]).astype(np.float32)
        iscales = (-steps)[None, :] / mx[:, None]                           # (n, 19)
        lv = np.clip(nearest_int(iscales[None] * xt), -nmax, nmax - 1).astype(np.float32)  # (16, n, 19)
        sumlx = sum16(wx * lv)
        suml2 = sum16((w * lv) * lv)
        scale = np.where(suml2[:, 0] != 0, sumlx[:, 0] / suml2[:, 0], np.float32(0)).astype(np.float32)
        best = scale * sumlx[:, 0]
        chosen = np.zeros(n, dtype=np.intp)
        for k in range(1, steps.size):
            sl, s2 = sumlx[:, k], suml2[:, k]
            better = (s2 > 0) & (sl * sl > best * s2)
            chosen = np.where(better, k, chosen)
            scale = np.where(better, sl / s2, scale).astype(np.float32)
            best = np.where(better, scale * sl, best).astype(np.float32)
    L = (lv[:, rows, chosen].T + nmax).astype(np.uint8)
    L[zero] = 0
    scale[zero] = 0
    return scale, L


def q6_k_codes(w: np.ndarray, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's reference Q6_K choice for float32 weights whose last axis is a multiple of 256:
    (q uint8 0..63 shaped like w, sc int8 (..., n/16), d float16 (..., n/256)). With importance
    weights qw (broadcast to w's shape: llama.cpp's importance matrix, one value per column) it is
    quantize_row_q6_K_impl's choice instead: the sub-block scales searched with qw as the weights."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % QK_K:
        raise SlimlmError(f"Q6_K needs rows whose length is a multiple of {QK_K}, got shape {w.shape}: "
                          "store this tensor in another type (Q8_0 takes multiples of 32)")
    lead = w.shape[:-1]
    x = w.reshape(-1, 16)
    qx = None if qw is None else np.broadcast_to(np.asarray(qw, np.float32), w.shape).reshape(-1, 16)
    scales, L = np.empty(x.shape[0], np.float32), np.empty(x.shape, np.uint8)
    for s in range(0, x.shape[0], _CHUNK):
        scales[s:s + _CHUNK], L[s:s + _CHUNK] = make_qx_quants(
            x[s:s + _CHUNK], qw=None if qx is None else qx[s:s + _CHUNK])
    nb = x.shape[0] // 16
    scales, L, xb = scales.reshape(nb, 16), L.reshape(nb, 16, 16), x.reshape(nb, 16, 16)

    a = np.abs(scales)
    imax = a.argmax(axis=1)
    rows = np.arange(nb)
    max_scale = scales[rows, imax]
    zero = a[rows, imax] < _EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (np.float32(-128) / np.where(zero, np.float32(1), max_scale)).astype(np.float32)
        d = (np.float32(1) / iscale).astype(np.float16)
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        dd = d.astype(np.float32)[:, None] * sc.astype(np.float32)          # (nb, 16)
        fresh = np.clip(nearest_int(xb / dd[:, :, None]), -32, 31) + 32
    # a sub-block whose int8 scale is 0 keeps make_qx_quants' codes, as the C loop `continue`s
    L = np.where((dd != 0)[:, :, None], fresh, L).astype(np.uint8)
    L[zero], sc[zero], d[zero] = 0, 0, 0
    return L.reshape(w.shape), sc.reshape(*lead, -1), d.reshape(*lead, -1)


def pack_q6_k(q: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes q (0..63), int8 sub-block scales and fp16 super-block scales -> GGUF Q6_K bytes,
    shaped (..., n/256 * 210) as gguf.quants lays out a quantized tensor."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu" or q.shape[-1] % QK_K or q.min(initial=0) < 0 or q.max(initial=0) > 63:
        raise SlimlmError(f"Q6_K codes must be integers 0..63 in rows of a multiple of {QK_K}")
    lead, nb = q.shape[:-1], q.size // QK_K
    sc, d = np.asarray(sc), np.asarray(d, dtype=np.float32)
    if sc.size != nb * 16 or d.size != nb:
        raise SlimlmError(f"Q6_K needs 16 scales and one d per {QK_K} weights: got {sc.size} and {d.size} "
                          f"for {nb} super-blocks")
    if sc.min(initial=0) < -128 or sc.max(initial=0) > 127:
        raise SlimlmError("Q6_K sub-block scales must fit int8 (-128..127)")
    Lr = q.reshape(nb, 2, 4, 32).astype(np.uint8)  # (block, half, quarter, position)
    lo, hi = Lr & 0xF, Lr >> 4
    ql = np.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64),
                          sc.reshape(nb, 16).astype(np.int8).view(np.uint8),
                          d.reshape(nb).astype(np.float16).view(np.uint8).reshape(nb, 2)], axis=1)
    return out.reshape(*lead, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 weights -> the bytes llama.cpp's quantize_row_q6_K_ref writes for them."""
    return pack_q6_k(*q6_k_codes(w))


def dequantize_q6_k_codes(q: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The weights llama.cpp reads back from (q, sc, d): d * sc * (q - 32), in float32."""
    q = np.asarray(q)
    lead = q.shape[:-1]
    dd = np.asarray(d, dtype=np.float16).astype(np.float32).reshape(-1, 1) * \
        np.asarray(sc, dtype=np.float32).reshape(-1, 16)
    x = dd.reshape(-1, 16, 1) * (q.reshape(-1, 16, 16).astype(np.float32) - 32)
    return x.reshape(*lead, -1)
