"""Q2_K, Q3_K and IQ4_NL against llama.cpp itself, as test_kquants.py does for Q6_K: the reference
is ggml's public `ggml_quantize_chunk` in the llama.cpp build llama-cpp-python ships (for these
types, without an importance matrix: `quantize_row_q2_K_ref`, `quantize_row_q3_K_ref` and
`quantize_iq4_nl`'s search over 15 scales). Bytes must be equal."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from slimlm.compress.iq4_nl import (
    IQ4_NL,
    KVALUES_IQ4NL,
    dequantize_iq4_nl_codes,
    iq4_nl_codes,
    pack_iq4_nl,
    quantize_iq4_nl,
)
from slimlm.compress.kquants_q23 import (
    Q2_K_BYTES,
    Q3_K_BYTES,
    dequantize_q2_k_codes,
    dequantize_q3_k_codes,
    pack_q2_k,
    pack_q3_k,
    q2_k_codes,
    q3_k_codes,
    quantize_q2_k,
    quantize_q3_k,
)
from slimlm.errors import SlimlmError
from tests.compress.ggml_reference import ggml_quantize
from tests.compress.test_kquants_q45 import CASES as KQUANT_CASES

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::UserWarning")]
Q2_K, Q3_K = GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K
ENCODERS = {"Q2_K": (Q2_K, Q2_K_BYTES, quantize_q2_k), "Q3_K": (Q3_K, Q3_K_BYTES, quantize_q3_k)}


def _low_bit_weights() -> dict[str, np.ndarray]:
    """Beyond the Q4_K/Q5_K set: heavy tails at every scale (a few values own each sub-block),
    values on the 2- and 3-bit grids themselves (ties in every rounding), and magnitudes whose
    squares (make_q3_quants' weights) are float32-subnormal."""
    rng = np.random.default_rng(23)
    return {"heavy_tails": (rng.standard_normal((128, 512)) * np.exp(3 * rng.standard_normal((128, 512))))
            .astype(np.float32),
            "grid": rng.integers(-4, 4, (64, 512)).astype(np.float32) / 2,
            "tiny": (rng.standard_normal((16, 256)) * 1e-20).astype(np.float32),
            "cauchy": rng.standard_t(1, (64, 768)).astype(np.float32)}


CASES = {**KQUANT_CASES, **_low_bit_weights()}


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("name", list(CASES))
def test_bytes_equal_llama_cpp(name, kind):
    qtype, nbytes, encode = ENCODERS[kind]
    w = CASES[name]
    ours, theirs = encode(w), ggml_quantize(w, qtype, nbytes)
    assert ours.shape == theirs.shape == (w.shape[0], w.shape[1] // 256 * nbytes)
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"{len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"
    assert np.array_equal(dequantize(ours, qtype), dequantize(theirs, qtype))


def test_q2_k_codes_round_trip_and_bad_input():
    w = CASES["gaussian_outliers"]
    q, sc, m, d, dmin = q2_k_codes(w)
    assert q.shape == w.shape and sc.shape == m.shape == (64, 32) and d.shape == dmin.shape == (64, 2)
    assert q.max() <= 3 and sc.max() <= 15 and m.max() <= 15
    expect = dequantize_q2_k_codes(q, sc, m, d, dmin)
    assert np.allclose(dequantize(pack_q2_k(q, sc, m, d, dmin), Q2_K), expect, rtol=1e-6, atol=1e-7)
    typical = np.abs(w) < 5 * w.std()  # 2 bits: only the bulk of the weights is close
    assert np.median(np.abs(expect - w)[typical]) < 0.5 * np.median(np.abs(w))
    assert not quantize_q2_k(np.zeros((2, 256), np.float32)).any()  # an all-zero block is all-zero bytes
    with pytest.raises(SlimlmError, match="multiple of 256"):
        quantize_q2_k(np.ones((2, 576), np.float32))
    with pytest.raises(SlimlmError, match="0..3"):
        pack_q2_k(np.full((1, 256), 4), sc[:1, :16], m[:1, :16], d[:1, :1], dmin[:1, :1])
    with pytest.raises(SlimlmError, match="4-bit"):
        pack_q2_k(q[:1, :256], np.full(16, 16), m[:1, :16], d[:1, :1], dmin[:1, :1])


def test_q3_k_codes_round_trip_and_bad_input():
    w = CASES["gaussian_outliers"]
    q, sc, d = q3_k_codes(w)
    assert q.shape == w.shape and sc.shape == (64, 32) and d.shape == (64, 2)
    assert q.max() <= 7 and sc.min() >= -32 and sc.max() <= 31
    expect = dequantize_q3_k_codes(q, sc, d)
    assert np.array_equal(dequantize(pack_q3_k(q, sc, d), Q3_K).reshape(w.shape), expect)
    assert np.abs(expect - w).max() < 0.2 * np.abs(w).max()
    assert not quantize_q3_k(np.zeros((2, 256), np.float32)).any()
    with pytest.raises(SlimlmError, match="multiple of 256"):
        quantize_q3_k(np.ones((2, 640), np.float32))
    with pytest.raises(SlimlmError, match="0..7"):
        pack_q3_k(np.full((1, 256), 8), sc[:1, :16], d[:1, :1])
    with pytest.raises(SlimlmError, match="-32..31"):
        pack_q3_k(q[:1, :256], np.full(16, 32), d[:1, :1])


@pytest.mark.parametrize("name", [*CASES, "width_576"])
def test_iq4_nl_bytes_equal_llama_cpp(name):
    """IQ4_NL's 32-weight blocks are independent, so a 576-wide tensor is quantized by ggml as
    rows of 256 of the same floats and the bytes compared in the tensor's own shape."""
    w = CASES[name] if name in CASES else \
        (np.random.default_rng(576).standard_t(3, (16, 576)) * 0.05).astype(np.float32)
    ours = quantize_iq4_nl(w)
    theirs = ggml_quantize(w.reshape(-1, 256), IQ4_NL, 8 * 18).reshape(ours.shape)
    assert ours.shape == (w.shape[0], w.shape[1] // 32 * 18)
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"{len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"
    assert np.array_equal(dequantize(ours, IQ4_NL), dequantize(theirs, IQ4_NL))


def test_iq4_nl_nearest_entry_table_equals_best_index_int8():
    """The table lookup against best_index_int8's float32 comparison, on the floats next to every
    midpoint between codebook entries (where the two could disagree) and on a dense sweep."""
    from slimlm.compress.iq4_nl import _CODE_OF, _table_index

    v = KVALUES_IQ4NL.astype(np.float32)
    mids = (v[:-1] + v[1:]) / 2
    near, below, above = [mids], mids, mids
    for _ in range(3):
        below, above = np.nextafter(below, np.float32(-np.inf)), np.nextafter(above, np.float32(np.inf))
        near += [below, above]
    x = np.concatenate([*near, np.linspace(-140, 140, 100_001, dtype=np.float32), v]).astype(np.float32)
    mu = np.clip(np.searchsorted(v, x, side="right"), 1, 15)
    expect = np.where((x - v[mu - 1]) < (v[mu] - x), mu - 1, mu)
    expect = np.where(x <= v[0], 0, np.where(x >= v[15], 15, expect))
    assert np.array_equal(_CODE_OF[_table_index(x)], expect)


def test_iq4_nl_codes_round_trip_and_bad_input():
    w = CASES["gaussian_outliers"]
    q, d = iq4_nl_codes(w)
    assert q.shape == w.shape and d.shape == (64, 16) and q.max() <= 15
    expect = dequantize_iq4_nl_codes(q, d)
    assert np.array_equal(dequantize(pack_iq4_nl(q, d), IQ4_NL).reshape(w.shape), expect)
    assert np.abs(expect - w).max() < 0.1 * np.abs(w).max()
    zero = quantize_iq4_nl(np.zeros((1, 32), np.float32))  # d 0, every code the entry nearest 0 (1, index 8)
    assert zero.tolist() == [[0, 0] + [0x88] * 16]
    with pytest.raises(SlimlmError, match="multiple of 32"):
        quantize_iq4_nl(np.ones((2, 40), np.float32))
    with pytest.raises(SlimlmError, match="0..15"):
        pack_iq4_nl(np.full((1, 32), 16), d[:1, :1])
