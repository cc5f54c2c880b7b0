"""Q4_K, Q5_K and Q6_K with an importance matrix against llama.cpp itself: ggml's
`ggml_quantize_chunk(type, ..., imatrix)`, the path llama-quantize --imatrix takes
(`quantize_row_q4_K_impl` and friends). Bytes must be equal, for importance vectors that are flat,
spread over orders of magnitude, and zero on some columns (dead inputs)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from slimlm.compress.kquants import Q6_K_BYTES, pack_q6_k, q6_k_codes
from slimlm.compress.kquants_imatrix import qkx_codes_weighted, quantize_q4_k_weighted, quantize_q5_k_weighted
from slimlm.compress.kquants_q45 import Q4_K_BYTES, Q5_K_BYTES
from slimlm.errors import SlimlmError
from tests.compress.ggml_reference import ggml_quantize
from tests.compress.test_kquants_q45 import CASES

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::UserWarning")]
Q4_K, Q5_K, Q6_K = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K
ENCODERS = {"Q4_K": (Q4_K, Q4_K_BYTES, quantize_q4_k_weighted),
            "Q5_K": (Q5_K, Q5_K_BYTES, quantize_q5_k_weighted),
            "Q6_K": (Q6_K, Q6_K_BYTES, lambda w, qw: pack_q6_k(*q6_k_codes(w, qw)))}


def _importance(cols: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(cols)
    if kind == "flat":
        return np.ones(cols, np.float32)
    qw = np.exp(3 * rng.standard_normal(cols)).astype(np.float32)  # activations' squares: heavy-tailed
    if kind == "dead":
        qw[rng.random(cols) < 0.2] = 0
    return qw


@pytest.mark.parametrize("importance", ["flat", "spread", "dead"])
@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("name", list(CASES))
def test_bytes_equal_llama_quantize_with_imatrix(name, kind, importance):
    qtype, nbytes, encode = ENCODERS[kind]
    w = CASES[name]
    if w.ndim != 2:
        w = w.reshape(-1, w.shape[-1])
    qw = _importance(w.shape[1], importance)
    ours, theirs = encode(w, qw), ggml_quantize(w, qtype, nbytes, imatrix=qw)
    assert ours.shape == theirs.shape
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"{len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"


def test_importance_changes_the_bytes_and_lowers_the_weighted_error():
    """The weighted rule is not the reference in disguise: on columns of very unequal importance it
    writes other bytes, and its importance-weighted squared error is lower than the reference's."""
    from gguf.quants import dequantize

    from slimlm.compress.kquants_q45 import quantize_q4_k

    w = CASES["gaussian_outliers"]
    w = w.reshape(-1, w.shape[-1])
    qw = _importance(w.shape[1], "spread")
    weighted, plain = quantize_q4_k_weighted(w, qw), quantize_q4_k(w)
    assert not np.array_equal(weighted, plain)
    err = {k: float((qw * (dequantize(b, Q4_K).reshape(w.shape) - w) ** 2).sum())
           for k, b in (("weighted", weighted), ("plain", plain))}
    assert err["weighted"] < 0.9 * err["plain"], err


def test_bad_importance_is_refused():
    w = CASES["gaussian_outliers"].reshape(-1, 256)
    with pytest.raises(SlimlmError, match="256 columns"):
        qkx_codes_weighted(w, np.ones(128), 15)
    with pytest.raises(SlimlmError, match="negative, NaN or inf"):
        qkx_codes_weighted(w, -np.ones(256), 15)
    with pytest.raises(SlimlmError, match="multiple of 256"):
        qkx_codes_weighted(np.ones((2, 100), np.float32), np.ones(100), 31)


BLOCK_TYPES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}


@pytest.mark.parametrize("importance", ["flat", "spread", "dead"])
@pytest.mark.parametrize("kind", list(BLOCK_TYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_block_types_equal_llama_quantize_with_imatrix(name, kind, importance):
    """The 32-weight block types a 576- or 640-wide model falls back to, with an importance matrix."""
    from slimlm.compress.blocks_imatrix import quantize_block_weighted

    w = CASES[name]
    w = w.reshape(-1, w.shape[-1])
    qw = _importance(w.shape[1], importance)
    ours = quantize_block_weighted(kind, w, qw)
    theirs = ggml_quantize(w, GGMLQuantizationType[kind], BLOCK_TYPES[kind], imatrix=qw, block=32)
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"{len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"


def test_block_rule_is_not_the_reference_and_refuses_what_it_cannot_do():
    from slimlm.compress.blocks import pack, rtn
    from slimlm.compress.blocks_imatrix import block_codes_weighted, quantize_block_weighted

    w = CASES["gaussian_outliers"].reshape(-1, 256)
    qw = _importance(256, "spread")
    assert not np.array_equal(quantize_block_weighted("Q5_1", w, qw), pack("Q5_1", *rtn("Q5_1", w)))
    with pytest.raises(SlimlmError, match="no importance-matrix rule for Q8_0"):
        block_codes_weighted("Q8_0", w, qw)
    with pytest.raises(SlimlmError, match="multiple of 32"):
        block_codes_weighted("Q4_0", np.ones((2, 40), np.float32), np.ones(40))


def test_a_4_bit_grid_is_stored_losslessly_in_q5_1_by_the_importance_rule_only():
    """Why the allocation must measure a type by the rule that writes it: weights dequantized from
    Q4_1 (as the built-in SmolLM2 is) fit Q5_1 exactly under llama-quantize's importance-matrix
    rule (its search finds half the Q4_1 scale), while the reference min/max rule loses them;
    encode_weighted is the dispatch the sensitivity pass uses."""
    from slimlm.compress.blocks import dequantize_codes, rtn
    from slimlm.compress.kquant_formats import dequantize_type

    rng = np.random.default_rng(41)
    w = dequantize_codes("Q4_1", *rtn("Q4_1", (rng.standard_normal((8, 576)) * 0.05).astype(np.float32)))
    imp = np.exp(rng.standard_normal(576)).astype(np.float32)
    assert np.array_equal(dequantize_type("Q5_1", w, imp), w)
    assert np.abs(dequantize_type("Q5_1", w) - w).max() > 1e-4
    assert dequantize_type("Q8_0", w, imp).shape == w.shape  # no imatrix rule: the reference one
