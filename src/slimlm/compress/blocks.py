"""llama.cpp's GGUF block formats as data, and round-to-nearest in them.

GPTQ, AWQ and ternary training choose their own integer codes and scales; for llama.cpp and
Ollama to run the result unchanged, those choices must land in the exact bytes of a llama.cpp
block type. So the formats are kept here as data (value formula, code range, byte layout), with
`pack`/`unpack` between (codes, scales) and GGUF tensor bytes, and `rtn`, which reproduces
llama.cpp's reference quantizer (ggml-quants.c, mirrored by `gguf.quants`) bit for bit: the
baseline every smarter method is measured against is llama.cpp's own.

Codes are the integers llama.cpp stores, and every format reads them the same way:

    x = d * (q - zero) + m        (m only for the _1 types; d and m are stored as fp16)

    Q8_0   x = d*q          q int8 -128..127, 32 per block: d, qs[32]            (34 bytes)
    Q4_0   x = d*(q-8)      q 0..15, 32 per block: d, qs[16] nibbles             (18 bytes)
    Q4_1   x = d*q + m      q 0..15, 32 per block: d, m, qs[16]                  (20 bytes)
    Q5_0   x = d*(q-16)     q 0..31, 32 per block: d, qh[4] (5th bits), qs[16]   (22 bytes)
    Q5_1   x = d*q + m      q 0..31, 32 per block: d, m, qh[4], qs[16]           (24 bytes)
    TQ1_0  x = d*(q-1)      q 0..2 (ternary), 256 per block: qs[48] 5 trits/byte
                            in base 3, qh[4] 4 trits/byte, d                     (54 bytes)
    TQ2_0  x = d*(q-1)      q 0..2 (ternary), 256 per block: qs[64] 2 bits each, d  (66 bytes)

Nibbles: byte j of a 32-block holds q[j] in its low 4 bits and q[j+16] in its high 4 bits; qh is
a little-endian uint32 whose bit j is bit 4 of q[j]. TQ2_0 byte 32c+j holds q[128c+32k+j] at
bits 2k. TQ1_0 byte b holds trits t0..t4 as ceil((81*t0 + 27*t1 + 9*t2 + 3*t3 + t4) * 256/243),
so trit k is read back as ((b * 3^k mod 256) * 3) >> 8.

d may be negative: Q4_0/Q5_0 take d = max/-8 (max: the weight of largest magnitude, with its
sign), so that weight lands exactly on code 0 and only the opposite extreme can be clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from slimlm.errors import SlimlmError

__all__ = ["BlockFormat", "FORMATS", "get_format", "pack", "unpack", "dequantize_codes", "rtn", "safe_inverse",
           "roundf"]


@dataclass(frozen=True)
class BlockFormat:
    name: str
    qtype: GGMLQuantizationType
    block_size: int
    bits: int                    # code width in the file (the ternary types hold 3 levels)
    symmetric: bool              # no per-block min m
    qmin: int
    qmax: int
    zero: int                    # the code for 0.0 in a symmetric format
    layout: tuple[tuple[str, int], ...]  # (field, bytes) in block order; d and m are fp16
    rtn_rule: str                # llama.cpp's scale choice: absmax | signed_max | min_max
    formula: str

    @property
    def bytes_per_block(self) -> int:
        return sum(size for _, size in self.layout)

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_per_block / self.block_size


_T = GGMLQuantizationType
FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("Q8_0", _T.Q8_0, 32, 8, True, -128, 127, 0, (("d", 2), ("qs", 32)), "absmax",
                "x = d*q, q int8; d = amax/127"),
    BlockFormat("Q4_0", _T.Q4_0, 32, 4, True, 0, 15, 8, (("d", 2), ("qs", 16)), "signed_max",
                "x = d*(q-8), q 0..15; d = max/-8"),
    BlockFormat("Q4_1", _T.Q4_1, 32, 4, False, 0, 15, 0, (("d", 2), ("m", 2), ("qs", 16)), "min_max",
                "x = d*q + m, q 0..15; d = (max-min)/15, m = min"),
    BlockFormat("Q5_0", _T.Q5_0, 32, 5, True, 0, 31, 16, (("d", 2), ("qh", 4), ("qs", 16)), "signed_max",
                "x = d*(q-16), q 0..31; d = max/-16"),
    BlockFormat("Q5_1", _T.Q5_1, 32, 5, False, 0, 31, 0, (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)),
                "min_max", "x = d*q + m, q 0..31; d = (max-min)/31, m = min"),
    BlockFormat("TQ1_0", _T.TQ1_0, 256, 2, True, 0, 2, 1, (("qs", 48), ("qh", 4), ("d", 2)), "absmax",
                "x = d*(q-1), q 0..2 (ternary, base-3 packed); d = amax"),
    BlockFormat("TQ2_0", _T.TQ2_0, 256, 2, True, 0, 2, 1, (("qs", 64), ("d", 2)), "absmax",
                "x = d*(q-1), q 0..2 (ternary, 2 bits each); d = amax"),
)}


def get_format(fmt: str | BlockFormat | GGMLQuantizationType) -> BlockFormat:
    if isinstance(fmt, BlockFormat):
        return fmt
    key = fmt.name if isinstance(fmt, GGMLQuantizationType) else str(fmt).upper()
    if key not in FORMATS:
        raise SlimlmError(f"unknown block format {fmt!r}: known formats are {', '.join(FORMATS)}")
    return FORMATS[key]


def _block_shape(fmt: BlockFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) < 1:
        raise SlimlmError(f"{fmt.name} needs weights with at least one axis (rows of the layer), got a scalar")
    cols = shape[-1]
    if cols == 0 or cols % fmt.block_size:
        raise SlimlmError(f"the layer width {cols} is not a multiple of the {fmt.name} block size "
                          f"{fmt.block_size}: store this tensor in another type (or pad its rows)")
    return (*shape[:-1], cols // fmt.block_size)


def _fp16(name: str, what: str, x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16)
    if not np.isfinite(h).all():
        raise SlimlmError(f"{name} {what} must be finite and fit fp16 (|value| <= 65504); "
                          f"got {x.ravel()[~np.isfinite(h).ravel()][0]}")
    return h


def _validate(fmt: BlockFormat, q, d, m) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checked codes, and d, m rounded to fp16 as the file stores them."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu":
        raise SlimlmError(f"{fmt.name} codes must be integers, got {q.dtype}: round them first")
    bshape = _block_shape(fmt, q.shape)
    d = np.asarray(d, dtype=np.float32)
    if d.shape != bshape:
        raise SlimlmError(f"{fmt.name} scales d have shape {d.shape}, expected {bshape} "
                          f"(one per block of {fmt.block_size} weights)")
    if fmt.symmetric and m is not None:
        raise SlimlmError(f"{fmt.name} stores no per-block min ({fmt.formula}): pass m=None")
    if not fmt.symmetric:
        if m is None:
            raise SlimlmError(f"{fmt.name} needs per-block mins m ({fmt.formula})")
        m = np.asarray(m, dtype=np.float32)
        if m.shape != bshape:
            raise SlimlmError(f"{fmt.name} mins m have shape {m.shape}, expected {bshape}")
    bad = (q < fmt.qmin) | (q > fmt.qmax)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SlimlmError(f"{fmt.name} codes must lie in {fmt.qmin}..{fmt.qmax} ({fmt.formula}); "
                          f"got {q[at]} at index {at}")
    return q, _fp16(fmt.name, "scales d", d), None if m is None else _fp16(fmt.name, "mins m", m)


_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def _trits_to_bytes(t: np.ndarray, per: int) -> np.ndarray:
    """t: (n, k*per) trits; byte j of the result packs t[:, i*per + j] for i < k, first trit highest."""
    n, k = t.shape[0], t.shape[1] // per
    v = (t.reshape(n, k, per).astype(np.uint16) * _POW3[:k].reshape(1, k, 1)).sum(axis=1)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _bytes_to_trits(b: np.ndarray, k: int) -> np.ndarray:
    n, per = b.shape
    mult = _POW3[::-1][:k].reshape(1, k, 1)  # 1, 3, 9, ...: brings trit i to the top
    t = (((b.reshape(n, 1, per).astype(np.uint16) * mult) & 0xFF) * 3) >> 8
    return t.reshape(n, k * per).astype(np.uint8)


def _pack_codes(fmt: BlockFormat, u: np.ndarray) -> dict[str, np.ndarray]:
    """u: (n_blocks, block_size) stored codes as uint8 bit patterns -> the code fields."""
    n = u.shape[0]
    if fmt.name == "Q8_0":
        return {"qs": u}
    if fmt.name == "TQ2_0":
        g = u.reshape(n, 2, 4, 32) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        return {"qs": np.bitwise_or.reduce(g, axis=2).reshape(n, 64)}
    if fmt.name == "TQ1_0":
        qs = np.concatenate([_trits_to_bytes(u[:, :160], 32), _trits_to_bytes(u[:, 160:240], 16)], axis=1)
        return {"qs": qs, "qh": _trits_to_bytes(u[:, 240:], 4)}
    half = fmt.block_size // 2
    out = {"qs": (u[:, :half] & 0x0F) | ((u[:, half:] & 0x0F) << 4)}
    if fmt.bits == 5:
        out["qh"] = np.packbits((u >> 4) & 1, axis=1, bitorder="little")
    return out


def _unpack_codes(fmt: BlockFormat, f: dict[str, np.ndarray]) -> np.ndarray:
    n = f["qs"].shape[0]
    if fmt.name == "Q8_0":
        return f["qs"].view(np.int8)
    if fmt.name == "TQ2_0":
        s = f["qs"].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        return (s & 3).reshape(n, 256)
    if fmt.name == "TQ1_0":
        qs = f["qs"]
        return np.concatenate([_bytes_to_trits(qs[:, :32], 5), _bytes_to_trits(qs[:, 32:], 5),
                               _bytes_to_trits(f["qh"], 4)], axis=1)
    u = np.concatenate([f["qs"] & 0x0F, f["qs"] >> 4], axis=1)
    if fmt.bits == 5:
        u |= np.unpackbits(f["qh"], axis=1, bitorder="little") << 4
    return u


def pack(fmt: str | BlockFormat, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """GGUF tensor bytes, shape (..., cols // block_size * bytes_per_block), for codes q
    (..., cols) and per-block d (and m for the _1 types), shape (..., cols // block_size)."""
    fmt = get_format(fmt)
    q, d16, m16 = _validate(fmt, q, d, m)
    n = q.size // fmt.block_size
    u = q.reshape(n, fmt.block_size).astype(np.int8 if fmt.qmin < 0 else np.uint8).view(np.uint8)
    fields = _pack_codes(fmt, u)
    fields["d"] = d16.reshape(n).astype("<f2").view(np.uint8).reshape(n, 2)
    if m16 is not None:
        fields["m"] = m16.reshape(n).astype("<f2").view(np.uint8).reshape(n, 2)
    out = np.concatenate([fields[name] for name, _ in fmt.layout], axis=1)
    return out.reshape(*q.shape[:-1], q.shape[-1] // fmt.block_size * fmt.bytes_per_block)


def unpack(fmt: str | BlockFormat, raw: np.ndarray | bytes, shape: tuple[int, ...]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The codes (int8, `shape`), d and m (float32, exactly the stored fp16 values) in `raw`."""
    fmt = get_format(fmt)
    raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else np.asarray(raw)
    if raw.dtype != np.uint8:
        raise SlimlmError(f"{fmt.name} tensor bytes must be uint8, got {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    bshape = _block_shape(fmt, shape)
    n = int(np.prod(bshape))
    if raw.size != n * fmt.bytes_per_block:
        raise SlimlmError(f"{fmt.name} data for shape {shape} must be {n * fmt.bytes_per_block} bytes "
                          f"({n} blocks of {fmt.bytes_per_block}), got {raw.size}")
    blocks, fields, at = raw.reshape(n, fmt.bytes_per_block), {}, 0
    for name, size in fmt.layout:
        fields[name] = np.ascontiguousarray(blocks[:, at:at + size])
        at += size
    q = _unpack_codes(fmt, fields).astype(np.int8).reshape(shape)

    def half(name: str) -> np.ndarray:
        return fields[name].view("<f2").astype(np.float32).reshape(bshape)

    return q, half("d"), None if fmt.symmetric else half("m")


def dequantize_codes(fmt: str | BlockFormat, q: np.ndarray, d: np.ndarray,
                     m: np.ndarray | None = None) -> np.ndarray:
    """The float32 weights llama.cpp reads from these codes, d and m rounded to fp16 first."""
    fmt = get_format(fmt)
    q, d16, m16 = _validate(fmt, q, d, m)
    n = q.size // fmt.block_size
    x = d16.reshape(n, 1).astype(np.float32) * (q.reshape(n, fmt.block_size).astype(np.float32)
                                                 - np.float32(fmt.zero))
    if m16 is not None:
        x = x + m16.reshape(n, 1).astype(np.float32)
    return x.reshape(q.shape)


def safe_inverse(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d is 0 (llama.cpp's `d ? 1/d : 0`, used by every RTN rule)."""
    out = np.zeros_like(d)
    np.divide(np.float32(1), d, out=out, where=d != 0)
    return out


def roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.round rounds them to even)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), v)


def rtn(fmt: str | BlockFormat, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest as llama.cpp's reference quantizer does it: codes (int8, w's shape), the
    float32 d the codes were computed with (fp16 rounding happens in `pack`), and m (or None)."""
    fmt = get_format(fmt)
    w = np.asarray(w)
    if w.dtype.kind != "f":
        raise SlimlmError(f"{fmt.name} quantizes floating-point weights, got {w.dtype}")
    bshape = _block_shape(fmt, w.shape)
    x = w.astype(np.float32).reshape(-1, fmt.block_size)
    if not np.isfinite(x).all():
        raise SlimlmError(f"the weights hold NaN or inf: {fmt.name} cannot store them")
    m = None
    if fmt.rtn_rule == "absmax":      # d = amax / qmax, q = round(x / d)
        d = np.abs(x).max(axis=1) / np.float32(fmt.qmax - fmt.zero)
        q = roundf(x * safe_inverse(d)[:, None]) + fmt.zero
    elif fmt.rtn_rule == "signed_max":  # d = max / -zero: the largest-magnitude weight gets code 0
        mx = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
        d = mx / np.float32(-fmt.zero)
        q = np.floor(x * safe_inverse(d)[:, None] + np.float32(fmt.zero + 0.5))
    else:                             # min_max: d = (max - min) / qmax, m = min
        lo, hi = x.min(axis=1), x.max(axis=1)
        d = (hi - lo) / np.float32(fmt.qmax)
        q = np.floor((x - lo[:, None]) * safe_inverse(d)[:, None] + np.float32(0.5))
        m = lo.reshape(bshape)
    q = np.clip(q, fmt.qmin, fmt.qmax).astype(np.int8).reshape(w.shape)
    return q, d.reshape(bshape), m
