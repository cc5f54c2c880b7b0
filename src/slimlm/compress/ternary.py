"""The `ternary` method: every weight of a group becomes -d, 0 or +d ("1.58-bit", log2 3 bits).

What a group stores is one scale d and a ternary code per weight, x = d*(q-1) with q in 0..2 (the
convention of blocks.py, so the result is written unchanged as llama.cpp's TQ1_0/TQ2_0 when the
group is 256 wide and the layer width a multiple of 256, or by packed.save_packed for any group).

Choice of codes and scale. llama.cpp's reference quantizer for TQ1_0/TQ2_0 takes d = max|w| and
rounds w/d, so only weights above half the largest one survive; on bell-shaped weights that zeros
nearly all of them. The least-squares choice is exact and cheap instead: for a fixed set S of
nonzero codes, the best signs are sign(w) and the best scale is d = mean_{S} |w|, leaving the
error |w|^2 - (sum_S |w|)^2 / |S|; for |S| = k the best S is the k largest |w|. So sort |w|
descending, take the cumulative sums c_k, and pick k maximizing c_k^2 / k: one sort per group,
vectorized over all groups. (Tests check it against an exhaustive search over all 3^n codes.)

Be warned about what this is for. Post-training ternarization of a model *trained* in 16 bits
destroys most of its quality: three levels per group cannot carry the information that
16-bit training put into the weights, and no choice of scale recovers it. Models that work
ternary (BitNet b1.58) are *trained* ternary, with the quantizer inside the training loop. This
method exists to write such models, to start ternary-aware training from a sensible point, and to
measure the cost honestly; the measured numbers on a real model are in bench/RESULTS.md (section
"ternary"), not guessed here.
"""

from __future__ import annotations

import numpy as np

from slimlm.errors import SlimlmError

__all__ = ["ternary_quantize", "ternary_error", "ternary_choose", "DEFAULT_GROUP"]

DEFAULT_GROUP = 256  # llama.cpp's TQ1_0/TQ2_0 block: the default writes those types directly


def _groups(w: np.ndarray, group_size: int) -> tuple[np.ndarray, int]:
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise SlimlmError(f"ternary quantizes 2-D float weights [rows, cols], got {w.dtype} {w.shape}")
    cols = w.shape[1]
    group = cols if group_size in (0, -1) else int(group_size)
    if group <= 0 or cols % group:
        raise SlimlmError(f"the layer width {cols} is not a multiple of the ternary group size {group_size}: "
                          "choose a group size that divides it, or 0 for per-channel")
    x = w.astype(np.float32).reshape(-1, group)
    if not np.isfinite(x).all():
        raise SlimlmError("the weights hold NaN or inf: ternary cannot store them")
    return x, group


def ternary_quantize(w: np.ndarray, group_size: int = DEFAULT_GROUP) -> tuple[np.ndarray, np.ndarray, None]:
    """Least-squares ternary codes for w [rows, cols]: (q uint8 0..2, zero 1, shape of w;
    d float32 [rows, cols // group_size]; None), ready for blocks.pack("TQ2_0"/"TQ1_0", ...) with
    group 256, or packed.save_packed with packed.ternary_format(group_size). group_size 0 or -1:
    one group per row."""
    x, group = _groups(w, group_size)
    a = np.abs(x)
    order = np.argsort(-a, axis=1, kind="stable")
    c = np.cumsum(np.take_along_axis(a, order, axis=1), axis=1, dtype=np.float64)
    k = np.arange(1, group + 1, dtype=np.float64)
    best = np.argmax(c * c / k, axis=1)  # index k-1 of the best count of nonzeros
    d = (c[np.arange(len(c)), best] / (best + 1)).astype(np.float32)
    keep_sorted = np.arange(group)[None, :] <= best[:, None]
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    q = np.where(keep, np.sign(x), 0).astype(np.int8) + 1
    rows = np.asarray(w).shape[0]
    return q.astype(np.uint8).reshape(np.asarray(w).shape), d.reshape(rows, -1), None


def ternary_choose(group_size: int = DEFAULT_GROUP):
    """The method as a per-tensor function: choose(name, w) -> (q, d, None), for callers that
    pack the codes themselves (quantize() goes through quant_methods/ternary.py)."""
    def choose(name: str, w: np.ndarray):
        return ternary_quantize(w, group_size)
    return choose


def ternary_error(w: np.ndarray, q: np.ndarray, d: np.ndarray, fp16: bool = True) -> float:
    """Sum of squared reconstruction errors of codes q (0..2) and per-group d against w, with d
    rounded to fp16 as every file stores it (fp16=False: as chosen)."""
    w = np.asarray(w, dtype=np.float32)
    d = np.asarray(d, dtype=np.float32)
    if fp16:
        d = d.astype(np.float16).astype(np.float32)
    group = w.shape[1] // d.shape[1]
    x = np.repeat(d, group, axis=1) * (np.asarray(q).astype(np.float32) - 1)
    return float(((x - w).astype(np.float64) ** 2).sum())
