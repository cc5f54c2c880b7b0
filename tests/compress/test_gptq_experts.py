"""GPTQ on an MoE: each routed expert's Hessian comes from the tokens its router sends it, checked
against a direct computation from the checkpoint's own expert weights; GPTQ's codes then lower
each expert's output error on those tokens below round-to-nearest's, in both the one-pass and the
layer-by-layer variant, and the file runs in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from slimlm.compress.gptq_experts import checkpoint_keys
from slimlm.compress.quant_methods.gptq import GPTQ

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 8, "def add(a, b):\n    return a + b\n" * 8,
         "Rivers carry water from the mountains to the sea. " * 8]


def _checkpoint(folder) -> dict[str, np.ndarray]:
    with safe_open(next(folder.glob("*.safetensors")), framework="numpy") as st:
        return {k: st.get_tensor(k).astype(np.float64) for k in st.keys()}


def _direct_hessians(folder, layer: int) -> dict[str, np.ndarray]:
    """H = 2/N sum x x^T per expert projection, from the MoE block's input captured by a hook,
    the router's top-k recomputed from its weight, and act(x W1^T) * (x W3^T) from the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.compress.calibration import calibration_windows, run_calibration

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    block = model.model.layers[layer].mlp
    seen = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    run_calibration(model, calibration_windows(tokenizer, TEXTS, 4, 32), 4, "", False)
    handle.remove()
    x = torch.cat(seen).double().numpy()
    ck = _checkpoint(folder)
    prefix = f"model.layers.{layer}.block_sparse_moe"
    logits = x @ ck[f"{prefix}.gate.weight"].T
    top = np.argsort(-logits, axis=1)[:, : model.config.num_experts_per_tok]
    out = {}
    for e in range(model.config.num_local_experts):
        xe = x[(top == e).any(axis=1)]
        if not len(xe):
            continue
        w1, w3 = ck[f"{prefix}.experts.{e}.w1.weight"], ck[f"{prefix}.experts.{e}.w3.weight"]
        g = xe @ w1.T
        h = g / (1 + np.exp(-g)) * (xe @ w3.T)  # SiLU, Mixtral's activation
        for role, inp in (("w1", xe), ("w3", xe), ("w2", h)):
            out[f"{prefix}.experts.{e}.{role}"] = 2.0 / len(inp) * inp.T @ inp
    return out


def test_each_experts_hessian_sums_over_the_tokens_routed_to_it(tiny_models):
    folder = tiny_models("mixtral")
    gptq = GPTQ().prepare(folder, TEXTS, samples=4, seq_len=32, progress=False)
    direct = _direct_hessians(folder, layer=1)
    assert len(direct) >= 6  # several experts reached
    for key, want in direct.items():
        # float32 inside the model against float64 here: equal to 1e-5 of the matrix's scale
        np.testing.assert_allclose(gptq.hessians[key].numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max(),
                                   err_msg=key)
    routed = [k for k in checkpoint_keys(_checkpoint(folder)).values() if ".layers.1." in k]
    assert set(direct) == {k for k in routed if k in gptq.hessians}  # no H for an expert nobody reached


def _output_error(w: np.ndarray, q: np.ndarray, H: np.ndarray) -> float:
    d = (w - q).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, H, d))


@pytest.mark.parametrize("sequential", [False, True])
def test_gptq_codes_beat_round_to_nearest_on_each_experts_tokens(tiny_models, tmp_path, sequential):
    """The file's experts (dequantized from the GGUF by gguf-py) against round-to-nearest's, on the
    error GPTQ minimizes: tr(dW H dW^T) with each expert's own Hessian (one pass, full precision)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from slimlm.compress.quantize import quantize
    from tests.conftest import llama_logits

    folder = tiny_models("mixtral")
    files = {m: quantize(str(folder), tmp_path / f"{m}.gguf", method=m, format="gguf:Q4_0",
                         calib_samples=4, calib_seq_len=32, sequential=sequential, check=False, record=False)
             for m in ("rtn", "gptq")}
    assert not any("Hessian" in n for n in files["gptq"].notes)
    H = GPTQ().prepare(folder, None, samples=4, seq_len=32, progress=False).hessians
    ck = _checkpoint(folder)
    better = worse = 0
    stacked = {m: {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(f.out).tensors}
               for m, f in files.items()}
    for layer in range(2):
        for kind, gguf_kind in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            name = f"blk.{layer}.ffn_{gguf_kind}_exps.weight"
            for e in range(4):
                key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{kind}"
                if key not in H:
                    continue
                w = ck[key + ".weight"]
                errs = {m: _output_error(w, stacked[m][name][e], H[key].numpy()) for m in stacked}
                better += errs["gptq"] < errs["rtn"]
                worse += errs["gptq"] >= errs["rtn"]
    assert better >= 0.9 * (better + worse) and better >= 12, (better, worse)
    assert np.isfinite(llama_logits(files["gptq"].out, [1, 7, 42, 99])).all()
