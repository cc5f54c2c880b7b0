"""AWQ as a model transformation: the fp32 model is unchanged, the scales move weights where
activations have outliers, and round-to-nearest on the transformed model loses less."""

from __future__ import annotations

import numpy as np
import pytest

from slimlm.compress.awq import apply_awq, search_scale
from slimlm.compress.blocks import dequantize_codes, rtn
from slimlm.errors import SlimlmError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CALIB = dict(samples=16, seq_len=128)
OUTLIERS = [3, 17, 40]


def _load(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


def _logits(folder, ids):
    import torch

    model, _ = _load(folder)
    with torch.no_grad():
        return model(input_ids=ids).logits[0].double()


def _held_out(tok, n=256):
    from slimlm.data import held_out_docs

    return tok("\n\n".join(held_out_docs()), return_tensors="pt")["input_ids"][:, :n]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_awq_keeps_the_fp32_model(tiny_models, tmp_path, family):
    import torch

    folder = tiny_models(family)
    report = apply_awq(folder, tmp_path / "awq", "Q4_0", **CALIB)
    assert {s["group"] for s in report["scaled"]} == {"attn", "mlp", "down"}
    assert all(s["error"] <= s["error_rtn"] for s in report["scaled"])
    assert (tmp_path / "awq" / "config.json").exists() and (tmp_path / "awq" / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".awq.tmp")]  # atomic: no leftovers
    _, tok = _load(folder)
    ids = _held_out(tok, 96)
    before, after = _logits(folder, ids), _logits(tmp_path / "awq", ids)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max())), \
        float((after - before).abs().max())
    # and the weights did change
    a, _ = _load(folder)
    b, _ = _load(tmp_path / "awq")
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if "norm" in k)
    with pytest.raises(SlimlmError, match="already exists"):
        apply_awq(folder, tmp_path / "awq", "Q4_0", **CALIB)


@pytest.fixture(scope="module")
def outlier_model(tiny_models, tmp_path_factory):
    """The tiny llama with a few huge input_layernorm channels: activation outliers, as real LLMs have."""
    import torch

    model, tok = _load(tiny_models("llama"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[OUTLIERS] *= 20
            layer.post_attention_layernorm.weight[OUTLIERS] *= 20
    out = tmp_path_factory.mktemp("outlier") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def outlier_awq(outlier_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("outlier-awq") / "awq"
    return out, apply_awq(outlier_model, out, "Q4_0", **CALIB)


def test_scales_move_the_outlier_channels(outlier_model, outlier_awq):
    import torch

    out, report = outlier_awq
    attn = [s for s in report["scaled"] if s["group"] == "attn"]
    assert len(attn) == 2 and all(s["alpha"] > 0 for s in attn), attn
    assert all(s["error"] < 0.9 * s["error_rtn"] for s in attn), attn
    a, _ = _load(outlier_model)
    b, _ = _load(out)
    w0 = a.model.layers[0].self_attn.q_proj.weight
    w1 = b.model.layers[0].self_attn.q_proj.weight
    ratio = (w1 / w0).mean(0)  # the per-column scale s
    assert torch.allclose(w1 / w0, ratio.expand_as(w0), rtol=1e-4)  # whole columns scaled
    others = [c for c in range(ratio.numel()) if c not in OUTLIERS]
    assert ratio[OUTLIERS].min() > 2 * ratio[others].max()  # the outlier channels get the large scales
    n0, n1 = a.model.layers[0].input_layernorm.weight, b.model.layers[0].input_layernorm.weight
    assert torch.allclose(n1 * ratio, n0, rtol=1e-5)


def _rtn_kl(folder, ids, ref):
    import torch

    model, _ = _load(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.copy_(torch.from_numpy(dequantize_codes("Q4_0", *rtn("Q4_0", p.numpy()))))
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


def test_rtn_on_awq_beats_plain_rtn(outlier_model, outlier_awq):
    import torch

    model, tok = _load(outlier_model)
    ids = _held_out(tok)  # python-docs topics calibration never saw
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    kl_rtn, kl_awq = _rtn_kl(outlier_model, ids, ref), _rtn_kl(outlier_awq[0], ids, ref)
    assert kl_awq < 0.8 * kl_rtn, (kl_awq, kl_rtn)


def test_search_scale_never_worse_than_rtn():
    import torch

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g)
    W = torch.randn(32, 64, generator=g)
    s, alpha, err, base = search_scale("Q4_0", X, X.abs().mean(0), [W], grid=10)
    assert err <= base
    if alpha == 0:
        assert torch.equal(s, torch.ones(64))
    # alpha = 0 is exactly RTN's error
    wq = torch.from_numpy(dequantize_codes("Q4_0", *rtn("Q4_0", W.numpy())))
    assert np.isclose(base, float((X @ (W - wq).T).double().pow(2).sum()), rtol=1e-6)
    with pytest.raises(SlimlmError, match="grid"):
        search_scale("Q4_0", X, X.abs().mean(0), [W], grid=0)


def test_short_calibration_text_is_an_error(tiny_models, tmp_path):
    with pytest.raises(SlimlmError, match="shorter than one sequence"):
        apply_awq(tiny_models("llama"), tmp_path / "awq", "Q4_0", calib_texts=["def f(): pass"], **CALIB)
    assert not (tmp_path / "awq").exists()


@pytest.fixture(scope="module")
def wide_llama(tiny_tokenizer_dir, tmp_path_factory):
    """A 4-layer llama 256 wide (Q4_K and Q6_K hold its attention), MLP 544 wide (ffn_down falls back)."""
    from tests.conftest import build_tiny_model

    return build_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("awq-wide"), seed=5,
                            hidden_size=256, intermediate_size=544, num_hidden_layers=4)


@pytest.mark.llamacpp
def test_q4_k_m_file_is_rtns_bytes_of_the_rescaled_model(wide_llama, tmp_path, monkeypatch):
    """--method awq --format gguf:Q4_K_M: written from an fp32-equivalent rescaled copy (scales
    searched for Q4_0, the proxy), every tensor exactly RTN's Q4_K_M bytes of that copy, norms
    included; llama.cpp runs it, and its KL is no worse than RTN's by more than a small margin."""
    import shutil

    import torch
    from gguf import GGUFReader
    from llama_cpp import Llama

    from slimlm.compress import awq
    from slimlm.compress.quantize import quantize

    kept = tmp_path / "rescaled"
    real, fmts = awq.apply_awq, []

    def keep(folder, out, fmt, *args, **kw):
        report = real(folder, out, fmt, *args, **kw)
        fmts.append(report["format"])
        shutil.copytree(out, kept)
        return report

    monkeypatch.setattr(awq, "apply_awq", keep)
    common = dict(format="gguf:Q4_K_M", calib="python-docs", calib_samples=16, calib_seq_len=128, record=False)
    ours = quantize(wide_llama, tmp_path / "awq.gguf", method="awq", **common)
    assert fmts == ["Q4_0"] and ours.format == "gguf:Q4_K_M" and ours.method == "awq"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".awq.gguf.awq-")]  # the rewrite is removed
    plain = quantize(wide_llama, tmp_path / "rtn.gguf", method="rtn", **common)
    again = quantize(kept, tmp_path / "rtn-of-rescaled.gguf", method="rtn", check=False, **common)
    assert ours.tensor_types == plain.tensor_types == again.tensor_types

    _, tok = _load(wide_llama)
    ids = _held_out(tok, 96)
    before, after = _logits(wide_llama, ids), _logits(kept, ids)  # the rewrite is the same fp32 model
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))

    tensors = {t.name: t for t in GGUFReader(ours.out).tensors}
    rtn_of_rescaled = {t.name: t for t in GGUFReader(again.out).tensors}
    rtn_of_input = {t.name: t for t in GGUFReader(plain.out).tensors}
    assert tensors.keys() == rtn_of_rescaled.keys() == rtn_of_input.keys()
    for name, t in tensors.items():
        assert t.tensor_type == rtn_of_rescaled[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(rtn_of_rescaled[name].data)), name
    norms = [n for n in tensors if n.endswith("_norm.weight") and n.startswith("blk.")]
    assert len(norms) == 8
    assert all(not np.array_equal(np.asarray(tensors[n].data), np.asarray(rtn_of_input[n].data)) for n in norms)

    llm = Llama(model_path=ours.out, logits_all=True, n_ctx=32, verbose=False, n_gpu_layers=0)
    llm.eval([1, 5, 9, 13])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()
    print("KL awq", ours.fidelity["kl_mean"], "rtn", plain.fidelity["kl_mean"])
    assert ours.fidelity["kl_mean"] <= 1.1 * plain.fidelity["kl_mean"], (ours.fidelity, plain.fidelity)


def test_mixed_file_takes_rtns_types_and_meets_its_budget(wide_llama, tmp_path):
    """--method awq --target-bpw: the types are the allocation's on the input (as RTN picks them),
    the file meets the budget, and its norms carry AWQ's scales."""
    from gguf import GGUFReader

    from slimlm.compress.quantize import quantize

    common = dict(format="gguf", target_bpw=5.2, calib_samples=16, calib_seq_len=128, check=False, record=False)
    plain = quantize(wide_llama, tmp_path / "rtn.gguf", **common)
    ours = quantize(wide_llama, tmp_path / "awq.gguf", method="awq", **common)
    assert ours.format == "gguf:mixed" and ours.tensor_types == plain.tensor_types
    assert ours.size_after == plain.size_after <= 5.2 * ours.params_total / 8
    assert any(n.startswith("AWQ scales searched for Q") for n in ours.notes), ours.notes
    a = {t.name: np.asarray(t.data) for t in GGUFReader(ours.out).tensors}
    b = {t.name: np.asarray(t.data) for t in GGUFReader(plain.out).tensors}
    assert not np.array_equal(a["blk.0.attn_norm.weight"], b["blk.0.attn_norm.weight"])
