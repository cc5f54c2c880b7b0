"""AWQ on an MoE's routed experts (compress/awq_experts.py): the fp32 model is unchanged, every
MoE block is scaled (input scale for the block, a down scale per expert), and an expert's error
is measured on the tokens its router sends it, checked against a computation from the router's
own choices."""

from __future__ import annotations

import pytest

from slimlm.compress.awq import apply_awq
from slimlm.compress.blocks import dequantize_codes, rtn

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CALIB = dict(samples=8, seq_len=64)


def _model(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_moe_blocks_are_scaled_and_the_fp32_model_is_unchanged(tiny_models, tmp_path, family):
    import torch

    from slimlm.data import held_out_docs

    folder = tiny_models(family)
    report = apply_awq(folder, tmp_path / "awq", "Q4_0", **CALIB)
    model, tok = _model(folder)
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]  # DeepSeek: not layer 0
    n_experts = model.model.layers[moe[0]].mlp.experts.gate_up_proj.shape[0]
    scaled = report["scaled"]
    assert sorted(s["layer"] for s in scaled if s["group"] == "experts") == moe
    downs = [s for s in scaled if s["group"] == "expert-down"]
    assert 0 < len(downs) <= len(moe) * n_experts
    assert all(s["error"] <= s["error_rtn"] for s in scaled)
    assert not [s for s in report["skipped"] if s["group"] in ("mlp", "experts")]
    assert any(s["alpha"] > 0 for s in scaled if s["group"] in ("experts", "expert-down"))
    ids = tok("\n\n".join(held_out_docs()), return_tensors="pt")["input_ids"][:, :96]
    after, _ = _model(tmp_path / "awq")
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.double(), after(input_ids=ids).logits.double()
    assert torch.allclose(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max())), float((b - a).abs().max())
    moved = after.model.layers[moe[0]].mlp.experts.gate_up_proj
    assert not torch.equal(moved, model.model.layers[moe[0]].mlp.experts.gate_up_proj)


def test_an_experts_error_is_measured_on_its_routed_tokens(tiny_models, tmp_path):
    """The block's RTN error as reported equals the sum over experts of ||X_e (W_e - RTN(W_e))^T||^2,
    X_e the calibration rows whose top-k (read from the router's own output) holds expert e."""
    import torch

    from slimlm.compress.calibration import calibration_model, calibration_windows

    folder = tiny_models("mixtral")
    report = apply_awq(folder, tmp_path / "awq", "Q4_0", **CALIB)
    reported = next(s["error_rtn"] for s in report["scaled"] if s["group"] == "experts" and s["layer"] == 1)
    with calibration_model(folder, None) as (model, tokenizer, texts):
        windows = calibration_windows(tokenizer, texts, CALIB["samples"], CALIB["seq_len"])
        block = model.model.layers[1].mlp
        seen = {}
        block.gate.register_forward_hook(lambda m, args, out: seen.setdefault("x", []).append(args[0]))
        block.gate.register_forward_hook(lambda m, args, out: seen.setdefault("top", []).append(out[2]))
        with torch.no_grad():
            for at in range(0, len(windows), 4):
                model(input_ids=windows[at:at + 4], use_cache=False)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["x"]]).double()
        top = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["top"]])
        expected = 0.0
        for e, w in enumerate(block.experts.gate_up_proj.detach()):
            wq = torch.from_numpy(dequantize_codes("Q4_0", *rtn("Q4_0", w.numpy()))).double()
            xe = x[(top == e).any(-1)]
            expected += float((xe @ (w.double() - wq).T).pow(2).sum())
    assert reported == pytest.approx(expected, rel=1e-4)


@pytest.mark.llamacpp
def test_awq_moe_gguf_runs_in_llama_cpp_with_rescaled_experts(tiny_models, tmp_path):
    """`quantize --method awq` on an MoE writes a GGUF file llama.cpp runs, whose stacked experts
    are not RTN's bytes (AWQ rescaled them before rounding)."""
    import numpy as np
    from gguf import GGUFReader
    from llama_cpp import Llama

    from slimlm.compress.quantize import quantize

    folder = tiny_models("mixtral")
    files = {m: quantize(str(folder), tmp_path / f"{m}.gguf", format="gguf:Q4_0", method=m, check=False,
                         record=False, calib_samples=8, calib_seq_len=64).out for m in ("rtn", "awq")}
    stacks = [{t.name: np.asarray(t.data).tobytes() for t in GGUFReader(f).tensors if "_exps" in t.name}
              for f in files.values()]
    assert stacks[0].keys() == stacks[1].keys() and len(stacks[0]) == 6
    assert any(stacks[0][k] != stacks[1][k] for k in stacks[0])
    llm = Llama(model_path=str(files["awq"]), n_ctx=32, verbose=False, n_gpu_layers=0, logits_all=True)
    llm.eval([1, 5, 9, 13])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()
