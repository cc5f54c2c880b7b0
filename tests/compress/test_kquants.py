"""Q6_K against llama.cpp itself: the gguf package has no K-quant quantizer, so the reference is
the quantizer inside the llama.cpp build llama-cpp-python ships (ggml's public
`ggml_quantize_chunk`, which runs `quantize_row_q6_K_ref` for Q6_K without an importance matrix),
and llama-quantize (`llama_model_quantize`) on a whole exported model. Bytes must be equal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from slimlm.compress.kquants import Q6_K_BYTES, dequantize_q6_k_codes, pack_q6_k, q6_k_codes, quantize_q6_k
from slimlm.errors import SlimlmError
from tests.compress.ggml_reference import ggml_quantize
from tests.conftest import build_tiny_model

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::UserWarning")]
Q6_K = GGMLQuantizationType.Q6_K


def _ggml_q6_k(w: np.ndarray) -> np.ndarray:
    """llama.cpp's own Q6_K bytes for w (rows of a multiple of 256), from its shared library."""
    return ggml_quantize(w, Q6_K, Q6_K_BYTES)


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(16)
    gauss = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    gauss.flat[rng.integers(0, gauss.size, 60)] *= rng.choice([-80, 80], 60)  # outliers, both signs
    special = np.zeros((8, 256), dtype=np.float32)  # row 0 all zero
    special[1, :16] = 1e-3                          # one live sub-block, fifteen zero ones
    special[2, 100] = -5.0                          # a lone spike: other sub-blocks' int8 scales round to 0
    special[2, :100] = rng.standard_normal(100).astype(np.float32) * 1e-3
    special[3] = 0.75                               # constant
    special[4] = np.resize(np.array([0.5, -0.5, 1.5, -1.5, 2.5, 31.5, -32.0, 0.0], np.float32), 256)  # ties
    special[5] = rng.standard_normal(256).astype(np.float32) * 1e-7  # fp16-subnormal d
    special[6] = np.abs(rng.standard_normal(256)).astype(np.float32)  # one sign only
    special[7, ::16] = 1e-20                        # below GROUP_MAX_EPS's square: weights x^2 underflow
    return {"gaussian_outliers": gauss, "special": special,
            "student_t": rng.standard_t(2, (128, 768)).astype(np.float32),
            "integers": rng.integers(-40, 40, (16, 256)).astype(np.float32),
            "large": (rng.standard_normal((16, 1024)) * 1e3).astype(np.float32)}


WEIGHTS = _weights()


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_q6_k_bytes_equal_llama_cpp(name):
    w = WEIGHTS[name]
    ours, theirs = quantize_q6_k(w), _ggml_q6_k(w)
    assert ours.shape == theirs.shape == (w.shape[0], w.shape[1] // 256 * Q6_K_BYTES)
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"{len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"
    assert np.array_equal(dequantize(ours, Q6_K), dequantize(theirs, Q6_K))


def test_codes_mean_what_gguf_reads_and_bad_input():
    w = WEIGHTS["gaussian_outliers"]
    q, sc, d = q6_k_codes(w)
    assert q.shape == w.shape and sc.shape == (64, 32) and d.shape == (64, 2)
    assert np.array_equal(dequantize(pack_q6_k(q, sc, d), Q6_K), dequantize_q6_k_codes(q, sc, d))
    assert np.abs(dequantize_q6_k_codes(q, sc, d) - w).max() < 0.05 * np.abs(w).max()
    assert not quantize_q6_k(np.zeros((2, 256), np.float32)).any()  # an all-zero block is all-zero bytes
    with pytest.raises(SlimlmError, match="multiple of 256"):
        quantize_q6_k(np.ones((2, 576), np.float32))
    with pytest.raises(SlimlmError, match="0..63"):
        pack_q6_k(np.full((1, 256), 64), sc[:1, :16], d[:1, :1])


def wide_tiny_llama(tokenizer_dir: Path, out: Path) -> Path:
    """A tiny llama 256 wide (the tiny fixtures are 64 wide; Q6_K needs multiples of 256), with an
    all-zero embedding row and outlier weights, untied: token_embd and output both exist."""
    import torch

    def outliers(model) -> None:
        for p in model.parameters():
            if p.dim() > 1:
                p.view(-1)[torch.randint(0, p.numel(), (8,))] *= 40
        model.model.embed_tokens.weight[3] = 0

    return build_tiny_model("llama", tokenizer_dir, out, seed=16, edit=outliers, hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="module")
def wide_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return wide_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("wide-llama"))


def test_q6_k_equals_llama_quantize_on_a_model(wide_llama, tmp_path):
    """llama-quantize's Q6_K of an f32 export: every tensor it stored as Q6_K from f32 data has
    exactly the bytes slimlm's encoder writes for the same floats."""
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.llamacpp_quant import llamacpp_quantize

    src = export_gguf(wide_llama, tmp_path / "f32.gguf", dtype="f32")
    out = llamacpp_quantize(src, tmp_path / "q6_k.gguf", "Q6_K", threads=1)
    f32 = {t.name: t for t in GGUFReader(src).tensors}
    compared = []
    for t in GGUFReader(out).tensors:
        if t.tensor_type != Q6_K or f32[t.name].tensor_type != GGMLQuantizationType.F32:
            continue
        w = np.asarray(f32[t.name].data, dtype=np.float32)
        ours = quantize_q6_k(w)
        theirs = np.asarray(t.data).reshape(ours.shape)
        assert np.array_equal(ours, theirs), t.name
        assert np.array_equal(dequantize(ours, Q6_K), dequantize(theirs, Q6_K)), t.name
        compared.append(t.name)
    assert "token_embd.weight" in compared and "output.weight" in compared and len(compared) >= 10, compared


def test_cli_q6_k_embeddings_load_and_run(wide_llama, tiny_models, tmp_path, capfd):
    from llama_cpp import Llama

    from tests.conftest import run_cli

    args = ("--format", "gguf:Q4_0", "--no-check", "--json")
    code, out, err = run_cli(capfd, "quantize", wide_llama, *args, "--embeddings", "Q6_K", "--out", tmp_path / "a.gguf")
    assert code == 0, err
    code, _, err = run_cli(capfd, "quantize", wide_llama, *args, "--embeddings", "Q8_0", "--out", tmp_path / "b.gguf")
    assert code == 0, err
    reader = GGUFReader(tmp_path / "a.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == kinds["output.weight"] == "Q6_K" and kinds["blk.0.ffn_up.weight"] == "Q4_0"
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    from safetensors.numpy import load_file

    w = load_file(wide_llama / "model.safetensors")["model.embed_tokens.weight"].astype(np.float32)
    assert np.array_equal(np.asarray(embd.data).reshape(-1), _ggml_q6_k(w).reshape(-1))
    assert json.loads(out)["size_after"] < (tmp_path / "b.gguf").stat().st_size  # Q6_K is smaller than Q8_0
    llm = Llama(model_path=str(tmp_path / "a.gguf"), n_ctx=64, verbose=False, n_gpu_layers=0)
    tokens = []
    for tok in llm.generate([1, 40, 77, 120], temp=0.0):
        tokens.append(tok)
        if len(tokens) == 4:
            break
    llm.close()
    assert len(tokens) == 4

    # the tiny fixtures are 64 wide: Q6_K cannot hold that, so it falls back to Q8_0 as llama-quantize does
    code, out, err = run_cli(capfd, "quantize", tiny_models("llama"), *args[:2], "--no-check",
                             "--embeddings", "Q6_K", "--out", tmp_path / "c.gguf")
    assert code == 0, err
    assert "not a multiple of 256" in out + err and "Q8_0" in out + err
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "c.gguf").tensors}
    assert kinds["token_embd.weight"] == kinds["output.weight"] == "Q8_0"
    code, out, err = run_cli(capfd, "quantize", tiny_models("llama"), *args, "--embeddings", "Q5_K",
                             "--out", tmp_path / "d.gguf")
    assert code != 0 and "f16, Q8_0, Q6_K" in out + err and not (tmp_path / "d.gguf").exists()
