"""Q4_K and Q5_K against llama.cpp itself, as test_kquants.py does for Q6_K: the reference is the
quantizer inside the llama.cpp build llama-cpp-python ships (ggml's public `ggml_quantize_chunk`,
which runs `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` without an importance matrix), and
llama-quantize (`llama_model_quantize`) on a whole exported model. Bytes must be equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from slimlm.compress.kquants_q45 import (
    Q4_K_BYTES,
    Q5_K_BYTES,
    pack_q4_k,
    pack_q5_k,
    qkx_codes,
    quantize_q4_k,
    quantize_q5_k,
)
from slimlm.errors import SlimlmError
from tests.compress.ggml_reference import ggml_quantize
from tests.compress.test_kquants import WEIGHTS, wide_tiny_llama

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::UserWarning")]
Q4_K, Q5_K = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K
ENCODERS = {"Q4_K": (Q4_K, Q4_K_BYTES, quantize_q4_k), "Q5_K": (Q5_K, Q5_K_BYTES, quantize_q5_k)}


def _more_weights() -> dict[str, np.ndarray]:
    """Cases the mins bring in, beyond the Q6_K set: negative-only and negative-constant rows
    (max == min, so make_qkx2_quants returns early), a sub-block whose rounded scale is 0 beside a
    huge one, and mixed magnitudes across the eight sub-blocks of one super-block."""
    rng = np.random.default_rng(45)
    special = np.zeros((6, 256), dtype=np.float32)
    special[0] = -np.abs(rng.standard_normal(256)).astype(np.float32)  # one sign, negative
    special[1] = -0.75                                                  # negative constant
    special[2, :32] = 1e4                                               # one sub-block dwarfs the rest:
    special[2, 32:] = rng.standard_normal(224).astype(np.float32) * 1e-3  # their 6-bit scales round to 0
    special[3] = rng.standard_normal(256).astype(np.float32) * np.repeat(10.0 ** np.arange(-4, 4), 32)
    special[4, :128] = 3.0                                              # half constant, half zero
    special[5] = rng.standard_normal(256).astype(np.float32) * 1e-30     # float32-subnormal squares
    return {"special_mins": special, "uniform": rng.uniform(-1, 1, (32, 512)).astype(np.float32)}


CASES = {**WEIGHTS, **_more_weights()}


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


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_codes_round_trip_and_bad_input(kind):
    qtype, nbytes, encode = ENCODERS[kind]
    nmax, pack = (15, pack_q4_k) if kind == "Q4_K" else (31, pack_q5_k)
    w = CASES["gaussian_outliers"]
    q, sc, m, d, dmin = qkx_codes(w, nmax)
    assert q.shape == w.shape and sc.shape == m.shape == (64, 16) and d.shape == dmin.shape == (64, 2)
    assert q.max() <= nmax and sc.max() <= 63 and m.max() <= 63
    # what gguf reads back is d*sc*q - dmin*m, sub-block by sub-block
    dd = (d.astype(np.float32)[..., None] * sc.reshape(64, 2, 8)).reshape(64, 16, 1)
    mm = (dmin.astype(np.float32)[..., None] * m.reshape(64, 2, 8)).reshape(64, 16, 1)
    expect = (dd * q.reshape(64, 16, 32) - mm).reshape(w.shape)
    assert np.allclose(dequantize(pack(q, sc, m, d, dmin), qtype), expect, rtol=1e-6, atol=1e-7)
    assert np.abs(expect - w).max() < 0.1 * np.abs(w).max()
    assert not encode(np.zeros((2, 256), np.float32)).any()  # an all-zero block is all-zero bytes
    with pytest.raises(SlimlmError, match="multiple of 256"):
        encode(np.ones((2, 576), np.float32))
    with pytest.raises(SlimlmError, match=f"0..{nmax}"):
        pack(np.full((1, 256), nmax + 1), sc[:1, :8], m[:1, :8], d[:1, :1], dmin[:1, :1])
    with pytest.raises(SlimlmError, match="6-bit"):
        pack(q[:1, :256], np.full(8, 64), m[:1, :8], d[:1, :1], dmin[:1, :1])


@pytest.fixture(scope="module")
def wide_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return wide_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("wide-llama"))


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M"])
def test_equal_llama_quantize_on_a_model(wide_llama, tmp_path, ftype):
    """llama-quantize's Q4_K_M / Q5_K_M of an f32 export: every tensor it stored as Q4_K or Q5_K
    from f32 data has exactly the bytes slimlm's encoders write for the same floats."""
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.llamacpp_quant import llamacpp_quantize

    src = export_gguf(wide_llama, tmp_path / "f32.gguf", dtype="f32")
    out = llamacpp_quantize(src, tmp_path / f"{ftype}.gguf", ftype, threads=1)
    f32 = {t.name: t for t in GGUFReader(src).tensors}
    compared = {"Q4_K": [], "Q5_K": []}
    for t in GGUFReader(out).tensors:
        if t.tensor_type.name not in compared or f32[t.name].tensor_type != GGMLQuantizationType.F32:
            continue
        w = np.asarray(f32[t.name].data, dtype=np.float32)
        ours = ENCODERS[t.tensor_type.name][2](w)
        theirs = np.asarray(t.data).reshape(ours.shape)
        assert np.array_equal(ours, theirs), t.name
        compared[t.tensor_type.name].append(t.name)
    main = compared[ftype[:4]]
    assert "token_embd.weight" in main and len(main) >= 10, compared
