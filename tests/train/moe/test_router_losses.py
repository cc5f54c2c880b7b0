"""The router losses against direct computations (transformers' load_balancing_loss_func and a loop
over tokens), the wrapper adding exactly their weighted values to the training loss, and `moe train`
end to end: an upcycled model trained towards its parent, with only the routers when asked."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from slimlm.train.moe.losses import RouterLosses, load_balancing_loss, router_z_loss
from tests.conftest import run_cli

LOGITS = torch.randn(50, 6, generator=torch.Generator().manual_seed(3)) * 2


def test_load_balancing_is_switch_transformers_formula():
    # transformers counts f per token (its f sums to top_k); ours per assignment (sums to 1)
    want = load_balancing_loss_func((LOGITS,), num_experts=6, top_k=2) / 2
    torch.testing.assert_close(load_balancing_loss(LOGITS, 2), want)
    counts, probs = [0] * 6, [0.0] * 6  # and the paper's sums, one token at a time
    for row in LOGITS.tolist():
        p = [math.exp(v) for v in row]
        p = [v / sum(p) for v in p]
        for e in sorted(range(6), key=lambda i: -p[i])[:2]:
            counts[e] += 1
        probs = [a + b for a, b in zip(probs, p)]
    direct = 6 * sum(c / (50 * 2) * q / 50 for c, q in zip(counts, probs))
    assert load_balancing_loss(LOGITS, 2).item() == pytest.approx(direct, rel=1e-5)


def test_balanced_and_collapsed_extremes():
    even = torch.zeros(4, 4)
    even[torch.arange(4), torch.arange(4)] = 30.0  # token i goes to expert i, with certainty
    assert load_balancing_loss(even, 1).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 30.0
    assert load_balancing_loss(collapsed, 1).item() == pytest.approx(4.0, abs=1e-5)


def test_z_loss_and_mask():
    direct = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS.tolist()) / 50
    assert router_z_loss(LOGITS).item() == pytest.approx(direct, rel=1e-5)
    mask = torch.zeros(50)
    mask[:10] = 1
    assert router_z_loss(LOGITS, mask).item() == pytest.approx(router_z_loss(LOGITS[:10]).item(), rel=1e-6)
    torch.testing.assert_close(load_balancing_loss(LOGITS, 2, mask), load_balancing_loss(LOGITS[:10], 2))


def test_wrapper_adds_the_weighted_router_losses(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models("mixtral"), dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def base(m, b):
        return m(input_ids=b["input_ids"]).logits.square().mean(), 32

    wrapped = RouterLosses(base, model, aux_weight=0.3, z_weight=0.05)
    loss, tokens = wrapped(model, batch)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)  # transformers' own router logits, one per layer
    aux = sum(load_balancing_loss(r, 2) for r in out.router_logits) / len(out.router_logits)
    z = sum(router_z_loss(r) for r in out.router_logits) / len(out.router_logits)
    want = out.logits.square().mean() + 0.3 * aux + 0.05 * z
    assert tokens == 32
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_moe_train_recovers_towards_the_parent(tiny_models, tmp_path, capsys):
    parent = tiny_models("llama")
    moe = tmp_path / "moe"
    code, _, err = run_cli(capsys, "moe", "upcycle", parent, "--experts", "4", "--active", "2", "--out", moe,
                           "--calib-samples", "4", "--calib-seq-len", "32")
    assert code == 0, err
    text = tmp_path / "train.txt"
    from pydoc_data.topics import topics

    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    before = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    code, stdout, err = run_cli(capsys, "moe", "train", moe, "--data", text, "--out", tmp_path / "router",
                                "--train", "router", "--max-steps", "3", "--seq-len", "64", "--lr", "1e-2",
                                "--eval-every", "0", "--save-every", "0", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["teacher"] == str(parent)  # the manifest's parent, found without --teacher
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "router", dtype=torch.float32)
    changed = {n for (n, a), b in zip(before.named_parameters(), after.parameters()) if not torch.equal(a, b)}
    assert changed and all(n.endswith("mlp.gate.weight") for n in changed)  # only routers trained
    assert result["trainable_params"] == sum(before.get_parameter(n).numel() for n in changed)
    settings = json.loads((tmp_path / "router" / "distill.json").read_text())
    assert settings["moe_parts"] == "router" and settings["moe_aux_weight"] == 0.01


def test_moe_train_refuses_a_dense_model_and_unknown_parts(tiny_models, tmp_path, capsys):
    code, _, err = run_cli(capsys, "moe", "train", tiny_models("llama"), "--data", "python-docs", "--teacher",
                           tiny_models("llama"), "--out", tmp_path / "o", "--max-steps", "1")
    assert code != 0 and "not a mixture-of-experts family" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(capsys, "moe", "train", tiny_models("mixtral"), "--data", "python-docs", "--teacher",
                           tiny_models("llama"), "--train", "heads", "--out", tmp_path / "o2")
    assert code != 0 and "unknown --train 'heads'" in err
