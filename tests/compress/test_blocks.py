"""Block formats against gguf.quants (the Python mirror of llama.cpp's ggml-quants.c): RTN must
give llama.cpp's bytes, and any codes GPTQ/AWQ choose must mean in llama.cpp what we say."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from slimlm.compress.blocks import FORMATS, dequantize_codes, get_format, pack, rtn, unpack
from slimlm.errors import SlimlmError

NAMES = list(FORMATS)


def _gaussian(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((4, 512)) * 0.02).astype(np.float32)
    idx = rng.integers(0, w.size, 12)
    w.flat[idx] = rng.standard_normal(12).astype(np.float32) * 1.5  # outliers, both signs
    return w


def _special() -> np.ndarray:
    """Blocks that trip careless quantizers: all zero, constant, exact half-step ties, one sign
    only, fp16-subnormal scales, large values, and an opposite extreme that Q4_0 must clip."""
    w = np.zeros((8, 512), dtype=np.float32)
    w[1] = 0.75
    ties = np.array([127, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5], dtype=np.float32)
    w[2, :256] = np.resize(ties, 256)
    w[2, 256:] = np.resize(np.array([-8, 0.5, -0.5, 1.5, -1.5, 7.5, 6.5, -7.5], dtype=np.float32), 256)
    w[3] = np.abs(_gaussian(1)[0]) + 0.01
    w[4] = -np.abs(_gaussian(2)[0])
    w[5] = _gaussian(3)[0] * 1e-4
    w[6] = _gaussian(4)[0] * 1000
    w[7] = np.resize(np.array([1.0, -0.99, 0.3, -0.2], dtype=np.float32), 512)
    return w


def _near_ties() -> np.ndarray:
    """Weights on half-steps of a step 0.1 (not exact in binary): codes then hinge on computing
    x * (1/d) + 0.5 in float32 as llama.cpp does, not x / d, nor np.round's ties-to-even."""
    rng = np.random.default_rng(0)
    rows = []
    for lo, hi, ends in [(0, 15, (0.0, 1.5)), (0, 31, (0.0, 3.1)), (-127, 127, (12.7, -1.0)),
                         (-8, 8, (-0.8, 0.0)), (-16, 16, (-1.6, 0.0)), (-1, 1, (1.0, -1.0))]:
        row = ((rng.integers(lo, hi, 512) + 0.5) * 0.1).astype(np.float32).reshape(-1, 32)
        row[:, 0], row[:, 1] = ends
        row[:, 2:4] = ((lo + 0.5) * 0.1, (hi - 0.5) * 0.1) if hi > 1 else (0.5, -0.5)
        rows.append(row.reshape(512))
    return np.stack(rows)


WEIGHTS = {"gaussian0": _gaussian(0), "gaussian7": _gaussian(7), "special": _special(), "ties": _near_ties()}


@pytest.mark.parametrize("name", NAMES)
def test_format_table_matches_ggml_sizes(name):
    fmt = FORMATS[name]
    assert (fmt.block_size, fmt.bytes_per_block) == GGML_QUANT_SIZES[fmt.qtype]
    assert fmt.qtype.name == name
    assert fmt.symmetric == (not name.endswith("_1"))


@pytest.mark.parametrize("wname", list(WEIGHTS))
@pytest.mark.parametrize("name", NAMES)
def test_rtn_bytes_match_llama_cpp(name, wname):
    w = WEIGHTS[wname]
    fmt = FORMATS[name]
    ours = pack(fmt, *rtn(fmt, w))
    theirs = gguf_quantize(w, fmt.qtype)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"first differing byte at {bad[0]} (row, byte)"


@pytest.mark.parametrize("name", NAMES)
def test_rtn_bytes_match_for_3d_tensors(name):
    fmt = FORMATS[name]
    w = _gaussian(5).reshape(2, 2, 512)
    assert np.array_equal(pack(fmt, *rtn(fmt, w)), gguf_quantize(w, fmt.qtype))


def _random_codes(fmt, seed: int, shape=(4, 512)):
    rng = np.random.default_rng(seed)
    q = rng.integers(fmt.qmin, fmt.qmax + 1, size=shape)
    bshape = (*shape[:-1], shape[-1] // fmt.block_size)
    d = (rng.standard_normal(bshape) * 10.0 ** rng.uniform(-6, 2, bshape)).astype(np.float32)
    m = None if fmt.symmetric else (rng.standard_normal(bshape) * 10.0 ** rng.uniform(-6, 2, bshape)).astype(np.float32)
    return q, d, m


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_any_codes_mean_in_llama_cpp_what_we_say(name, seed):
    fmt = FORMATS[name]
    q, d, m = _random_codes(fmt, seed)
    raw = pack(fmt, q, d, m)
    theirs = gguf_dequantize(raw, fmt.qtype)
    ours = dequantize_codes(fmt, q, d, m)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_codes_survive(name):
    """Every code at qmin, then every code at qmax: catches dropped high bits and sign errors."""
    fmt = FORMATS[name]
    for code in (fmt.qmin, fmt.qmax):
        q = np.full((2, 256), code)
        d = np.full((2, 256 // fmt.block_size), 0.5, dtype=np.float32)
        m = None if fmt.symmetric else np.full_like(d, -1.0)
        want = 0.5 * (code - fmt.zero) + (0.0 if m is None else -1.0)
        assert np.all(gguf_dequantize(pack(fmt, q, d, m), fmt.qtype) == want)


@pytest.mark.parametrize("name", NAMES)
def test_unpack_inverts_pack(name):
    fmt = FORMATS[name]
    q, d, m = _random_codes(fmt, 3)
    raw = pack(fmt, q, d, m)
    q2, d2, m2 = unpack(fmt, raw, q.shape)
    assert q2.dtype == np.int8 and np.array_equal(q2, q)
    assert np.array_equal(d2, d.astype(np.float16).astype(np.float32))
    if fmt.symmetric:
        assert m2 is None
    else:
        assert np.array_equal(m2, m.astype(np.float16).astype(np.float32))
    assert np.array_equal(pack(fmt, q2, d2, m2), raw)
    assert np.array_equal(unpack(fmt, raw.tobytes(), q.shape)[0], q)


@pytest.mark.parametrize("name", NAMES)
def test_unpack_reads_llama_cpp_bytes(name):
    fmt = FORMATS[name]
    w = _gaussian(11)
    raw = gguf_quantize(w, fmt.qtype)
    assert np.array_equal(dequantize_codes(fmt, *unpack(fmt, raw, w.shape)), gguf_dequantize(raw, fmt.qtype))


def test_layouts_by_hand():
    """Byte positions written out from llama.cpp's block structs, independently of gguf."""
    q = np.arange(32).reshape(1, 32)
    raw = pack("Q5_0", q, np.ones((1, 1), np.float32))[0]
    assert raw[:2].tobytes() == np.float16(1.0).tobytes() == b"\x00\x3c"
    assert int.from_bytes(raw[2:6].tobytes(), "little") == 0xFFFF0000  # 5th bits of q[16..31]
    assert raw[6] == (0 | (16 & 0xF) << 4) and raw[7] == (1 | (17 & 0xF) << 4)
    raw = pack("Q4_1", q % 16, np.full((1, 1), 2.0, np.float32), np.full((1, 1), -3.0, np.float32))[0]
    assert raw[:4].tobytes() == np.float16(2.0).tobytes() + np.float16(-3.0).tobytes()
    assert raw[4] == 0x00 and raw[5] == 0x11 and raw[19] == 0xFF
    raw = pack("Q8_0", np.array([[-128] + [5] * 31]), np.full((1, 1), -0.25, np.float32))[0]
    assert raw[2] == 0x80 and raw[3] == 5 and raw[:2].tobytes() == np.float16(-0.25).tobytes()
    t = np.zeros((1, 256), dtype=np.int64)
    t[0, 0], t[0, 32], t[0, 96], t[0, 128] = 2, 1, 2, 1  # TQ2_0: byte 32c+j, bits 2k
    raw = pack("TQ2_0", t, np.ones((1, 1), np.float32))[0]
    assert raw[0] == 2 | 1 << 2 | 2 << 6 and raw[32] == 1 and raw[64:].tobytes() == b"\x00\x3c"
    t = np.ones((1, 256), dtype=np.int64)
    t[0, 0] = 2  # TQ1_0: first trit of byte 0 (weight 81): ceil((121 + 81) * 256 / 243)
    raw = pack("TQ1_0", t, np.ones((1, 1), np.float32))[0]
    assert raw[0] == -(-(121 + 81) * 256 // 243) and raw[1] == -(-121 * 256 // 243)


def test_q4_0_zero_block_stores_negative_zero_scale():
    """llama.cpp computes d = max / -8, so an all-zero block stores d = -0.0 (bytes 00 80)."""
    raw = pack("Q4_0", *rtn("Q4_0", np.zeros((1, 32), np.float32)))[0]
    assert raw[:2].tobytes() == b"\x00\x80" and np.all(raw[2:] == 0x88)


@pytest.mark.parametrize("wname", list(WEIGHTS))
@pytest.mark.parametrize("name", NAMES)
def test_rtn_picks_the_nearest_code(name, wname):
    """With the float32 d it computed, no neighbouring code in range is closer to the weight (on
    exact half-steps either is nearest, and float32 rounding of x * (1/d) decides: allow that)."""
    fmt = FORMATS[name]
    w = WEIGHTS[wname]
    q, d, m = rtn(fmt, w)
    b = fmt.block_size
    dd = np.repeat(d, b, axis=-1).astype(np.float64)
    mm = 0.0 if m is None else np.repeat(m, b, axis=-1).astype(np.float64)
    err = np.abs(w - (dd * (q.astype(np.float64) - fmt.zero) + mm))
    tol = 1e-6 * np.abs(dd) * (np.abs(q.astype(np.float64) - fmt.zero) + fmt.zero + 1) + 1e-12
    for step in (-1, 1):
        other = q.astype(np.float64) + step
        ok = (other >= fmt.qmin) & (other <= fmt.qmax)
        err_other = np.abs(w - (dd * (other - fmt.zero) + mm))
        assert np.all(~ok | (err <= err_other + tol))


@pytest.mark.parametrize("wname", list(WEIGHTS))
@pytest.mark.parametrize("name", NAMES)
def test_rtn_error_is_bounded(name, wname):
    """|w - x| <= |d|/2 plus what fp16 storage of d and m adds; Q4_0/Q5_0 may clip the extreme
    opposite to the block's signed max (the grid is -8..7), by at most one step |d|."""
    fmt = FORMATS[name]
    w = WEIGHTS[wname]
    q, d, m = rtn(fmt, w)
    x = dequantize_codes(fmt, q, d, m)
    b = fmt.block_size
    dd = np.repeat(d, b, axis=-1).astype(np.float64)
    d16 = np.repeat(d.astype(np.float16), b, axis=-1).astype(np.float64)
    slack = np.abs(q.astype(np.float64) - fmt.zero) * np.abs(dd - d16) + 1e-6 * np.abs(w) + 1e-30
    if m is not None:
        slack += np.abs(np.repeat(m - m.astype(np.float16).astype(np.float32), b, axis=-1))
    err = np.abs(w.astype(np.float64) - x)
    half = 0.5 * np.abs(dd) * (1 + 1e-6)
    clipped = (fmt.rtn_rule == "signed_max") & (q == fmt.qmax) & (err > half + slack)
    assert np.all(err <= np.where(clipped, np.abs(dd) * (1 + 1e-6), half) + slack)
    if fmt.rtn_rule != "signed_max":
        assert not clipped.any()


def test_get_format_accepts_names_and_types():
    assert get_format("q4_0") is FORMATS["Q4_0"]
    assert get_format(GGMLQuantizationType.TQ2_0) is FORMATS["TQ2_0"]
    with pytest.raises(SlimlmError, match="unknown block format 'Q3_K'.*Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0"):
        get_format("Q3_K")


@pytest.mark.parametrize("name", NAMES)
def test_width_not_a_multiple_of_the_block(name):
    fmt = FORMATS[name]
    w = np.ones((2, fmt.block_size + 16), np.float32)
    msg = f"layer width {fmt.block_size + 16} is not a multiple of the {name} block size {fmt.block_size}"
    with pytest.raises(SlimlmError, match=msg):
        rtn(fmt, w)
    with pytest.raises(SlimlmError, match=msg):
        pack(fmt, np.zeros(w.shape, np.int64), np.ones((2, 1), np.float32), None if fmt.symmetric else np.ones((2, 1)))


@pytest.mark.parametrize("name, code", [("Q8_0", 128), ("Q4_0", 16), ("Q4_0", -1), ("Q4_1", 16),
                                        ("Q5_0", 32), ("Q5_1", -1), ("TQ1_0", 3), ("TQ2_0", -1)])
def test_codes_out_of_range(name, code):
    fmt = FORMATS[name]
    q, d, m = _random_codes(fmt, 0)
    q[1, 7] = code
    with pytest.raises(SlimlmError, match=rf"{fmt.qmin}\.\.{fmt.qmax}.*got {code} at index \(1, 7\)"):
        pack(fmt, q, d, m)
    with pytest.raises(SlimlmError, match="must lie in"):
        dequantize_codes(fmt, q, d, m)


def test_other_bad_inputs():
    q, d, m = _random_codes(FORMATS["Q4_1"], 0)
    with pytest.raises(SlimlmError, match="codes must be integers, got float32"):
        pack("Q4_1", q.astype(np.float32), d, m)
    with pytest.raises(SlimlmError, match=r"scales d have shape \(4, 15\), expected \(4, 16\)"):
        pack("Q4_1", q, d[:, 1:], m)
    with pytest.raises(SlimlmError, match="Q4_1 needs per-block mins m"):
        pack("Q4_1", q, d, None)
    with pytest.raises(SlimlmError, match="Q4_0 stores no per-block min"):
        pack("Q4_0", q, d, m)
    with pytest.raises(SlimlmError, match="fit fp16"):
        pack("Q4_0", q, np.full_like(d, 1e6), None)
    with pytest.raises(SlimlmError, match="fit fp16"):
        pack("Q4_1", q, d, np.full_like(m, np.nan))
    with pytest.raises(SlimlmError, match="NaN or inf"):
        rtn("Q8_0", np.full((1, 32), np.inf, np.float32))
    with pytest.raises(SlimlmError, match="floating-point weights"):
        rtn("Q8_0", np.ones((1, 32), np.int32))
    with pytest.raises(SlimlmError, match=r"must be 80 bytes \(4 blocks of 20\), got 79"):
        unpack("Q4_1", np.zeros(79, np.uint8), (2, 64))
