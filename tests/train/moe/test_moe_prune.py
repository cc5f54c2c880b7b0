"""Expert pruning: an expert that is provably never routed to is the one least-routed drops, and the
pruned model (loaded back by transformers) gives the original's logits; DeepSeek V3's correction bias
is sliced with the router; merge folds a twin expert into its twin and averages by usage; every
impossible request is one line on stderr."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import build_tiny_model, run_cli

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 128, 3, 77, 200]])


@pytest.fixture(scope="module")
def texts():
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:4]]


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _never_route_to_expert_3(model):
    """Residual dimension 0 holds +50 for every token through every layer (nothing writes to it), so
    after RMSNorm it is positive, and a router row of -1000 on it keeps expert 3 out of every top-2."""
    model.model.embed_tokens.weight[:, 0] = 50.0
    model.lm_head.weight[:, 0] = 0.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.experts.down_proj[:, 0] = 0.0
        layer.mlp.gate.weight[3] = 0.0
        layer.mlp.gate.weight[3, 0] = -1000.0


def _prune(model, out, texts, **kw):
    from slimlm.train.moe.prune import prune_experts

    return prune_experts(model, out, texts=texts, calib_tokens=512, seq_len=64, progress=False, **kw)


def test_least_routed_drops_the_unused_expert_and_keeps_the_logits(tiny_tokenizer_dir, tmp_path, texts):
    src = build_tiny_model("mixtral", tiny_tokenizer_dir, tmp_path / "src", edit=_never_route_to_expert_3)
    original = _load(src)
    with torch.no_grad():
        routed = original(IDS, output_router_logits=True).router_logits
    assert all(3 not in torch.topk(r, 2, -1).indices for r in routed)  # the construction holds
    result = _prune(src, tmp_path / "out", texts, keep=3)
    assert result.kept == {0: [0, 1, 2], 1: [0, 1, 2]} and result.dropped_share == {0: 0.0, 1: 0.0}
    pruned = _load(tmp_path / "out")
    assert pruned.config.num_local_experts == 3 and pruned.config.num_experts_per_tok == 2
    assert pruned.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 3
    assert torch.equal(pruned.model.layers[1].mlp.gate.weight, original.model.layers[1].mlp.gate.weight[:3])
    assert torch.allclose(_logits(pruned), _logits(original), atol=1e-4)
    with torch.no_grad():  # not vacuous: the experts kept do shape the logits
        original.model.layers[0].mlp.experts.down_proj[0] = 0.0
    assert not torch.allclose(_logits(pruned), _logits(original), atol=1e-2)
    assert json.loads((tmp_path / "out" / "slimlm.json").read_text())["operation"] == "moe prune"


def test_deepseek_correction_bias_is_sliced(tiny_tokenizer_dir, tmp_path, texts):
    def bias_out_expert_3(model):
        model.model.layers[1].mlp.gate.e_score_correction_bias[:] = torch.tensor([0.1, -0.2, 0.3, -1e4])

    src = build_tiny_model("deepseek_v3", tiny_tokenizer_dir, tmp_path / "src", edit=bias_out_expert_3)
    result = _prune(src, tmp_path / "out", texts, keep=3)
    assert result.kept == {1: [0, 1, 2]}
    original, pruned = _load(src), _load(tmp_path / "out")
    assert pruned.config.n_routed_experts == 3
    assert pruned.model.layers[1].mlp.gate.e_score_correction_bias.tolist() == pytest.approx([0.1, -0.2, 0.3])
    assert torch.allclose(_logits(pruned), _logits(original), atol=1e-4)


def test_merge_folds_a_twin_into_its_twin(tiny_tokenizer_dir, tmp_path, texts):
    """Top-1 routing, expert 3 a copy of expert 1 (router row too): ties go to one of the twins, the
    other is dropped and merged into it, and every token still gets the same expert's output."""
    def twins(model):
        for layer in model.model.layers:
            for tensor in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, layer.mlp.gate.weight):
                tensor[3] = tensor[1]

    src = build_tiny_model("mixtral", tiny_tokenizer_dir, tmp_path / "src", edit=twins, num_experts_per_tok=1)
    result = _prune(src, tmp_path / "out", texts, keep=3, method="merge")
    for layer, kept in result.kept.items():
        (dropped,) = {0, 1, 2, 3} - set(kept)
        assert {dropped, *result.merged[layer].values()} == {1, 3}, result.merged
    assert torch.allclose(_logits(_load(tmp_path / "out")), _logits(_load(src)), atol=1e-4)


def test_merge_is_a_usage_weighted_average(tiny_models):
    from slimlm.train.moe.blocks import moe_layers
    from slimlm.train.moe.prune import EXPERT_PRUNERS
    from slimlm.train.moe.stats import LayerStats

    model = _load(tiny_models("mixtral"))
    layer = moe_layers(model)[0]
    experts = layer.experts
    torch.manual_seed(0)
    with torch.no_grad():  # expert 3: a near copy of expert 1, so its output is most like 1's
        for tensor in (experts.gate_up_proj, experts.down_proj):
            tensor[3] = tensor[1] + 0.01 * torch.randn_like(tensor[1])
    before = {n: t.detach().clone() for n, t in [("gate_up", experts.gate_up_proj), ("down", experts.down_proj),
                                                   ("router", layer.router)]}
    stats = LayerStats(layer=0, share=[], router_prob=[0.25] * 4, entropy=0, max_entropy=0, balance=0,
                       coactivation=[], top_tokens=[], counts=[10, 30, 20, 10])
    into = EXPERT_PRUNERS.create("merge").fold(layer, [0, 1, 2], stats, torch.randn(64, 64))
    assert into == {3: 1}
    for name, tensor in [("gate_up", experts.gate_up_proj), ("down", experts.down_proj)]:
        old = before[name]
        assert torch.allclose(tensor[1], (30 * old[1] + 10 * old[3]) / 40, atol=1e-6)
        assert torch.equal(tensor[0], old[0]) and torch.equal(tensor[2], old[2])
    assert torch.equal(layer.router, before["router"])  # the kept expert's router row stays


def test_cli_ratio_writes_a_loadable_model(tiny_models, tmp_path, texts, capsys):
    import slimlm.cli  # noqa: F401 - registers every verb
    from slimlm.runs import list_runs

    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(texts))
    code, out, err = run_cli(capsys, "moe", "prune", tiny_models("mixtral"), "--ratio", 0.5, "--method", "merge",
                             "--data", data, "--tokens", 512, "--out", tmp_path / "half", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["experts_after"], result["top_k_after"]) == (2, 2) and result["params_after"] < result["params_before"]
    model = _load(tmp_path / "half")
    assert model.config.num_local_experts == 2 and torch.isfinite(_logits(model)).all()
    assert list_runs(command="moe prune")[0].artifact == str(tmp_path / "half")


@pytest.mark.parametrize("args, says", [
    (["--keep", 2, "--active", 3], ["--active 3", "largest --active for --keep 2 is 2"]),
    (["--keep", 4], ["not fewer than the model's 4 experts", "at most 3"]),
    (["--ratio", 1.5], ["--ratio 1.5"]),
    (["--keep", 2, "--ratio", 0.5], ["exactly one of --keep or --ratio"]),
    (["--keep", 2, "--method", "nope"], ["unknown method 'nope'", "least-routed"]),
])
def test_cli_bad_requests_are_one_line(tiny_models, tmp_path, capsys, args, says):
    import slimlm.cli  # noqa: F401

    code, out, err = run_cli(capsys, "moe", "prune", tiny_models("mixtral"), *args, "--out", tmp_path / "x")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert all(s in err for s in says), err
    assert not (tmp_path / "x").exists()


def test_cli_dense_model_and_existing_out(tiny_models, tmp_path, capsys):
    import slimlm.cli  # noqa: F401

    code, out, err = run_cli(capsys, "moe", "prune", tiny_models("llama"), "--keep", 2, "--out", tmp_path / "x")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "mixtral" in err and "deepseek_v3" in err, err
    (tmp_path / "taken").mkdir()
    code, out, err = run_cli(capsys, "moe", "prune", tiny_models("mixtral"), "--keep", 2, "--out", tmp_path / "taken")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "already exists" in err and "--force" in err


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_matrix_prune(family, tiny_models, tmp_path, texts):
    """An MoE family's prune is expert pruning (`slimlm moe prune`): half the routed experts go, and
    what is left is a smaller model of the same family that transformers loads and that generates."""
    from slimlm.train.moe.blocks import moe_layers

    src = tiny_models(family)
    before = _load(src)
    experts = moe_layers(before)[0].num_experts
    used = before.config.num_experts_per_tok
    result = _prune(src, tmp_path / "half", texts, keep=max(used, experts // 2))
    model = _load(tmp_path / "half")
    assert model.config.model_type == family
    assert all(layer.num_experts == max(used, experts // 2) for layer in moe_layers(model))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in before.parameters())
    out = model.generate(torch.tensor([[1, 40, 77]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == 6 and result is not None  # min_new_tokens: a random model may end the text early
