"""GPTQ inside llama.cpp's K-quant super-blocks (compress/gptq_kquant.py): with uncorrelated inputs it
writes llama.cpp's own RTN bytes (so the layout and the scale rule are llama.cpp's), with correlated
ones it lowers the layer's output error, and `--method gptq --format gguf:Q4_K_M` writes a file that
llama.cpp runs and whose tensors read back as exactly the values GPTQ chose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from slimlm.compress.gptq_kquant import gptq_encode, gptq_kquant
from slimlm.compress.kquant_formats import encode
from slimlm.errors import SlimlmError
from tests.compress.ggml_reference import ggml_quantize
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _correlated(rows=32, cols=512, n=4096, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    x = rng.normal(size=(n, cols)) @ (np.eye(cols) + rng.normal(size=(cols, cols)) * 0.3)
    return w, 2 * x.T @ x / n


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_diagonal_hessian_gives_llama_cpps_rtn_bytes(kind, act_order):
    """No correlation between inputs, no error to spread: the bytes are llama.cpp's quantizer's,
    llama-quantize --imatrix's with diag(H) as the importance matrix by default, its reference
    quantizer's with weighted=False."""
    from slimlm.compress.kquant_formats import dequantize_type

    w, _ = _correlated(rows=12, cols=768)
    w[2, :32] = 0.0     # an all-zero sub-block
    w[5, 256:512] = 0.0  # an all-zero super-block
    w[7] *= 1e-3         # small scales, where the fp16 and 6-bit roundings bite
    qtype = encode(kind, w)[1]
    theirs = ggml_quantize(w, qtype, BLOCK_BYTES[kind])
    rng = np.random.default_rng(7)
    for H in (np.eye(768), np.diag(np.linspace(0.2, 5.0, 768)), np.diag(np.exp(3 * rng.normal(size=768)))):
        data, got_type, values = gptq_encode(kind, w, H, act_order=act_order, weighted=False)
        assert got_type == qtype and np.array_equal(data, theirs)
        assert np.array_equal(values, dequantize_type(kind, w))
        data = gptq_encode(kind, w, H, act_order=act_order)[0]
        assert np.array_equal(data, ggml_quantize(w, qtype, BLOCK_BYTES[kind], imatrix=np.diag(H)))


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("kind,margin", [("Q4_K", 0.75), ("Q5_K", 0.75), ("Q6_K", 0.75)])
def test_gptq_lowers_output_error_on_correlated_inputs(kind, margin, act_order):
    """tr(dW H dW^T), the layer's output error on the calibration inputs, well below RTN's; the
    values GPTQ propagated with are exactly what the bytes dequantize to."""
    w, H = _correlated()

    def err(values):
        dw = w.astype(np.float64) - values
        return float(np.trace(dw @ H @ dw.T))

    data, qtype, values = gptq_encode(kind, w, H, act_order=act_order)
    assert np.array_equal(dequantize(data, qtype).reshape(w.shape), values)
    rtn_values = dequantize(encode(kind, w)[0], qtype).reshape(w.shape)
    assert err(values) < margin * err(rtn_values), (err(values), err(rtn_values))


def test_codes_in_range_and_bad_input():
    w, H = _correlated(rows=4, cols=256)
    q, sc, m, d, dmin = gptq_kquant("Q5_K", w, H)
    assert q.max() <= 31 and sc.max() <= 63 and m.max() <= 63 and sc.shape == m.shape == (4, 8)
    assert d.shape == dmin.shape == (4, 1) and d.dtype == np.float16
    q, sc, d = gptq_kquant("Q6_K", w, H)
    assert q.max() <= 63 and sc.shape == (4, 16) and sc.dtype == np.int8
    with pytest.raises(SlimlmError, match="multiple of 256"):
        gptq_kquant("Q4_K", w[:, :128], H[:128, :128])
    with pytest.raises(SlimlmError, match="not a K-quant"):
        gptq_kquant("Q4_0", w, H)
    with pytest.raises(SlimlmError, match="Hessian has shape"):
        gptq_kquant("Q4_K", w, np.eye(512))


@pytest.fixture(scope="module")
def folder(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A 4-layer llama 256 wide with an MLP 544 wide: Q4_K_M gives Q4_K and Q6_K (attn_v on layers 2
    and 3), and ffn_down (544 wide) falls back to Q5_0 and Q8_0."""
    return build_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("gk-llama"), seed=5,
                            hidden_size=256, intermediate_size=544, num_hidden_layers=4)


@pytest.mark.llamacpp
def test_q4_k_m_file_holds_gptqs_values_and_runs(folder, tmp_path, monkeypatch):
    from llama_cpp import Llama

    from slimlm.compress import gptq_kquant
    from slimlm.compress.mixed_precision import gguf_names
    from slimlm.compress.quant_steps import tensor_shapes
    from slimlm.compress.quantize import quantize

    chosen: dict[str, np.ndarray] = {}
    real = gptq_kquant.typed_coder

    def spy(types, **kw):
        coder = real(types, **kw)

        def record(name, w, H):
            kept, values = coder(name, w, H)
            chosen[name] = values
            return kept, values
        return record

    monkeypatch.setattr(gptq_kquant, "typed_coder", spy)
    common = dict(format="gguf:Q4_K_M", calib_samples=16, calib_seq_len=128, record=False)
    gptq = quantize(folder, tmp_path / "gptq.gguf", method="gptq", **common)
    rtn = quantize(folder, tmp_path / "rtn.gguf", method="rtn", **common)
    assert gptq.format == "gguf:Q4_K_M" and gptq.tensor_types == rtn.tensor_types
    assert {t for n, t in gptq.tensor_types.items() if n.startswith("blk.")} == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}

    names = gguf_names(folder, tensor_shapes(folder))
    ours = {t.name: t for t in GGUFReader(gptq.out).tensors}
    theirs = {t.name: t for t in GGUFReader(rtn.out).tensors}
    assert len(chosen) == 4 * 7
    differ = 0
    for name_hf, values in chosen.items():
        t = ours[names[name_hf]]
        assert t.tensor_type.name == gptq.tensor_types[t.name]
        stored = dequantize(np.asarray(t.data), t.tensor_type).reshape(values.shape)
        assert np.array_equal(stored, values), name_hf
        differ += not np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data))
    assert differ == len(chosen)  # GPTQ's codes, not RTN's, in every weight
    assert np.array_equal(np.asarray(ours["output.weight"].data), np.asarray(theirs["output.weight"].data))

    llm = Llama(model_path=gptq.out, logits_all=True, n_ctx=32, verbose=False, n_gpu_layers=0)
    llm.eval([1, 5, 9, 13])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()
    assert gptq.fidelity["kl_mean"] < rtn.fidelity["kl_mean"], (gptq.fidelity, rtn.fidelity)
