"""Upcycling a dense model into a Mixtral MoE, checked against the dense parent run by transformers:
the neuron split reproduces the parent when every expert is active at equal weight, the copy split
reproduces it as upcycled, the router starts at the cluster centroids and sends a token to the
experts whose neurons fire for it, and every impossible request is one line on stderr with nothing
written."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.train.moe.partition import assign_neurons, check_split
from slimlm.train.moe.splits import SplitSettings
from slimlm.train.moe.upcycle import upcycle, upcycle_model
from tests.conftest import llama_logits, run_cli

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 128, 3, 77, 200, 11, 9, 300]]) % 256


@pytest.fixture(scope="module")
def parent(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


def _all_experts_equal_weight(moe):
    """Every expert active with router weight 1/N: a zero router and top-k = N."""
    for layer in moe.model.layers:
        layer.mlp.gate.weight.data.zero_()
        layer.mlp.gate.top_k = layer.mlp.experts.num_experts
    return moe


@pytest.mark.parametrize("fraction,rounds", [(1.0, 2), (0.5, 1)])
def test_neuron_split_with_all_experts_active_is_the_parent(parent, windows, fraction, rounds):
    moe, neurons = upcycle_model(parent, "neurons", SplitSettings(4, 2, active_fraction=fraction), windows)
    assert moe.config.model_type == "mixtral"
    assert moe.config.intermediate_size == rounds * parent.config.intermediate_size // 4
    for experts in neurons:  # each neuron in exactly `rounds` experts, never twice in one
        counts = Counter(n for expert in experts for n in expert)
        assert set(counts) == set(range(parent.config.intermediate_size))
        assert set(counts.values()) == {rounds}
        assert all(len(set(e)) == len(e) for e in experts)
    with torch.no_grad():
        want = parent(IDS).logits
        sparse = moe(IDS).logits
        got = _all_experts_equal_weight(moe)(IDS).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (sparse - want).abs().max() > 1e-3  # top-2 of 4 is an approximation (the check can fail)


def test_copy_split_is_the_parent_as_upcycled(parent):
    moe, _ = upcycle_model(parent, "copy", SplitSettings(4, 2))
    assert moe.config.intermediate_size == parent.config.intermediate_size
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, parent(IDS).logits, atol=2e-5, rtol=1e-4)
    dropped, _ = upcycle_model(parent, "copy", SplitSettings(4, 2, drop=0.5))
    experts = dropped.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])  # Drop-Upcycling: each expert re-draws its own neurons


def test_router_starts_at_the_centroids_and_routes_to_firing_neurons(parent, windows):
    from slimlm.train.moe.partition import cluster_tokens, mlp_activity

    moe, neurons = upcycle_model(parent, "neurons", SplitSettings(4, 2, active_fraction=0.5), windows)
    captured = {}

    def keep(_module, _inputs, out):  # returns None: the forward pass goes on unchanged
        captured["x"] = out.reshape(-1, out.shape[-1])

    hook = parent.model.layers[0].post_attention_layernorm.register_forward_hook(keep)
    with torch.no_grad():
        parent(windows)
    hook.remove()
    x = captured["x"]
    labels, centroids = cluster_tokens(x, 4, seed=0)  # the same clustering, recomputed
    router = moe.model.layers[0].mlp.gate.weight.detach()
    unit = torch.nn.functional.normalize(router, dim=-1).double().numpy()
    np.testing.assert_allclose(unit, centroids, atol=1e-5)
    top1 = (x @ router.T).argmax(-1).numpy()
    agree = (top1 == labels).mean()
    assert agree > 0.9  # a router row per centroid sends a token to its nearest centroid
    mlp = parent.model.layers[0].mlp
    act = mlp_activity(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, mlp.act_fn)
    share = torch.stack([act[:, torch.as_tensor(n)].sum(-1) for n in neurons[0]], dim=-1) / act.sum(-1, keepdim=True)
    routed = share.gather(1, torch.as_tensor(top1)[:, None]).mean()
    assert routed > share.mean() * 1.1  # the chosen expert holds more of the token's activity than an average one


def test_assignment_is_balanced_and_prefers_high_scores():
    scores = np.zeros((8, 2))
    scores[:4, 0] = 1.0
    scores[4:, 1] = 1.0
    a, b = assign_neurons(scores, rounds=1)
    assert a.tolist() == [0, 1, 2, 3] and b.tolist() == [4, 5, 6, 7]
    both = assign_neurons(scores, rounds=2)
    assert [e.tolist() for e in both] == [list(range(8))] * 2
    assert check_split(1536, 8, 2, 1.0) == (768, 4)  # SmolLM2: 8 x 768 neurons, each neuron in 4 experts
    assert check_split(96, 4, 2, 1.0, shared=1) == (32, 2)


def test_upcycle_writes_a_loadable_mixtral_with_manifest(tiny_models, tmp_path, capsys):
    out = tmp_path / "moe"
    code, stdout, err = run_cli(capsys, "moe", "upcycle", tiny_models("llama"), "--experts", "4", "--active", "2",
                                "--out", out, "--calib-samples", "4", "--calib-seq-len", "32", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    manifest = json.loads((out / "slimlm.json").read_text())
    assert manifest["operation"] == "moe upcycle"
    assert manifest["params"]["split"] == "neurons" and manifest["params"]["experts"] == 4
    routed = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in moe.parameters())
    assert result["params_total"] == total
    assert result["params_active"] == total - routed + routed * 2 // 4
    dense = AutoModelForCausalLM.from_pretrained(tiny_models("llama"))
    assert result["params_active"] == sum(p.numel() for p in dense.parameters()) + sum(
        p.numel() for n, p in moe.named_parameters() if n.endswith("mlp.gate.weight"))  # parent + routers


@pytest.mark.parametrize("args,message", [
    (["--experts", "4", "--active", "5"], "--active 5 must be between 1 and --experts 4"),
    (["--experts", "5"], "use one of 2, 4, 8"),
    (["--experts", "4", "--active", "3"], "use one of 0.75, 1.5, 2.25, 3"),
    (["--shared-experts", "1"], "mixtral has no shared experts"),
    (["--split", "halves"], "unknown split 'halves'"),
])
def test_bad_upcycle_requests_are_one_line(tiny_models, tmp_path, capsys, args, message):
    out = tmp_path / "moe"
    code, _, err = run_cli(capsys, "moe", "upcycle", tiny_models("llama"), "--out", out,
                           "--calib-samples", "2", "--calib-seq-len", "16", *args)
    assert code != 0
    assert message in " ".join(err.split())
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_family_without_moe_counterpart_is_named(tiny_models, tmp_path, capsys):
    code, _, err = run_cli(capsys, "moe", "upcycle", tiny_models("gemma2"), "--out", tmp_path / "moe")
    assert code != 0
    assert "gemma2 has no MoE counterpart" in err and "llama, mistral" in err


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_upcycled_smollm2_runs_in_llamacpp_with_transformers_top1(smollm2_dense, tmp_path):
    """The built-in SmolLM2 as 8 experts with 2 active: as many active parameters as the parent
    plus its routers, and llama.cpp (an independent build) running slimlm's GGUF of it picks
    transformers' next token at every position."""
    from transformers import AutoTokenizer

    from slimlm.compress.gguf_export import export_gguf

    result = upcycle(smollm2_dense, tmp_path / "moe", 8, 2, "neurons", calib_samples=8, calib_seq_len=128,
                     record=False, progress=False)
    parent = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(smollm2_dense).parameters())
    routers = 30 * 8 * 576
    assert result.params_active == parent + routers  # within 0.1% of the parent
    tok = AutoTokenizer.from_pretrained(tmp_path / "moe")
    ids = tok("Lists are mutable sequences, typically used to store collections of homogeneous items. "
              "The for statement iterates over", return_tensors="pt").input_ids
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    with torch.no_grad():
        want = moe(ids).logits[0].numpy()
    del moe
    got = llama_logits(export_gguf(tmp_path / "moe", tmp_path / "moe.gguf", dtype="f32"), ids[0].tolist())
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


@pytest.fixture(scope="module")
def qwen_parent(tiny_tokenizer_dir, tmp_path_factory):
    from tests.conftest import build_tiny_model

    # 96 neurons: 1 shared + 2 routed active experts of 32 cost the parent's MLP (4 experts, rounds 2)
    return build_tiny_model("qwen2", tiny_tokenizer_dir, tmp_path_factory.mktemp("qwen") / "m", intermediate_size=96)


def test_qwen_parent_becomes_qwen_moe_with_a_shared_expert(qwen_parent, windows, tmp_path):
    from slimlm.compress.gguf_export import export_gguf

    parent = AutoModelForCausalLM.from_pretrained(qwen_parent, dtype=torch.float32).eval()
    moe, neurons = upcycle_model(parent, "neurons", SplitSettings(4, 2, shared=1), windows)
    assert moe.config.model_type == "qwen2_moe"
    assert (moe.config.moe_intermediate_size, moe.config.shared_expert_intermediate_size) == (32, 32)
    shared = set(range(96)) - {n for e in neurons[0] for n in e}
    assert len(shared) == 32  # the shared expert's neurons are in no routed expert
    with torch.no_grad():
        want = parent(IDS).logits
        copied, _ = upcycle_model(parent, "copy", SplitSettings(4, 2, shared=1))
        # exact as upcycled, but for the shared gate's 1e-6 offset from sigmoid(0) (llama.cpp's 0/0 at zero)
        torch.testing.assert_close(copied(IDS).logits, want, atol=1e-4, rtol=1e-3)
        moe.save_pretrained(tmp_path / "moe")
        sparse = moe(IDS).logits[0].numpy()
        got = _all_experts_equal_weight(moe)(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert np.abs(sparse - want[0].numpy()).max() > 1e-3  # (top-2 of 4 differs: the check can fail)
    # llama.cpp runs the upcycled Qwen-MoE as transformers does
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(qwen_parent).save_pretrained(tmp_path / "moe")
    from_llama = llama_logits(export_gguf(tmp_path / "moe", tmp_path / "moe.gguf", dtype="f32"), IDS[0].tolist())
    assert np.abs(from_llama - sparse).max() < 1e-3 * max(np.abs(sparse).max(), 1.0)


def test_qwen_moe_needs_a_shared_expert(qwen_parent, tmp_path, capsys):
    code, _, err = run_cli(capsys, "moe", "upcycle", qwen_parent, "--out", tmp_path / "moe", "--experts", "4")
    assert code != 0 and "qwen2_moe always has a shared expert" in err
    assert not (tmp_path / "moe").exists()
