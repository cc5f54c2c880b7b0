"""`moe_stats` against transformers' own router outputs: the shares, entropy, balance and
co-activation recomputed here from `model(..., output_router_logits=True).router_logits`, the balance
against transformers' `load_balancing_loss_func`, DeepSeek V3's biased choice, the report files and
the CLI."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from tests.conftest import run_cli

SEQ, WINDOWS = 64, 4


@pytest.fixture(scope="module")
def texts():
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:6]]


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def _stats(model, tok, texts, **kw):
    from slimlm.train.moe.stats import moe_stats

    return moe_stats(model, texts, max_tokens=SEQ * WINDOWS, seq_len=SEQ, tokenizer=tok, batch_size=3,
                     record=False, progress=False, **kw)


def _reference(model, tok, texts):
    """The same windows through the model in one batch; transformers' router logits per MoE layer."""
    from slimlm.compress.calibration import calibration_windows

    windows = calibration_windows(tok, texts, WINDOWS, SEQ)
    with torch.no_grad():
        out = model(windows, output_router_logits=True, use_cache=False)
    return windows.reshape(-1), out.router_logits


def test_mixtral_numbers_match_transformers_router_logits(tiny_models, texts):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model, tok = _load(tiny_models("mixtral"))
    stats = _stats(model, tok, texts)
    ids, router_logits = _reference(model, tok, texts)
    e, k = 4, 2
    assert (stats.experts, stats.top_k, stats.scoring, stats.tokens) == (e, k, "softmax", SEQ * WINDOWS)
    assert [lay.layer for lay in stats.layers] == [0, 1]
    for lay, logits in zip(stats.layers, router_logits):
        probs = torch.softmax(logits.double(), -1)
        chosen = torch.topk(probs, k, -1).indices.tolist()
        counts = Counter(i for row in chosen for i in row)
        share = [counts[i] / (len(chosen) * k) for i in range(e)]
        mean_prob = probs.mean(0).tolist()
        assert lay.share == pytest.approx(share, abs=1e-9) and sum(lay.share) == pytest.approx(1.0)
        assert lay.router_prob == pytest.approx(mean_prob, abs=1e-5)
        entropy = float(-(probs * probs.log()).sum(-1).mean())
        assert lay.entropy == pytest.approx(entropy, abs=1e-5) and lay.max_entropy == pytest.approx(math.log(e))
        balance = e * sum(f * p for f, p in zip(share, mean_prob))
        assert lay.balance == pytest.approx(balance, rel=1e-5)
        # transformers counts top-k assignments per token (they sum to k), so its loss is k times ours
        hf = float(load_balancing_loss_func((logits,), num_experts=e, top_k=k))
        assert lay.balance * k == pytest.approx(hf, rel=1e-4)
        both = [[sum(i in row and j in row for row in chosen) / len(chosen) for j in range(e)] for i in range(e)]
        assert torch.allclose(torch.tensor(lay.coactivation), torch.tensor(both), atol=1e-9)
    # top tokens of layer 0: the first is the token of highest lift (ties: more often routed there)
    chosen = torch.topk(router_logits[0], k, -1).indices.tolist()
    seen = Counter(ids.tolist())
    for expert, tops in enumerate(stats.layers[0].top_tokens):
        got = Counter(t for t, row in zip(ids.tolist(), chosen) if expert in row)
        n_e = sum(got.values())
        lift = {t: (c / n_e) / (seen[t] / len(ids)) for t, c in got.items() if seen[t] >= 3}
        best = max(lift.values())
        top_count = max(got[t] for t, v in lift.items() if v > best * (1 - 1e-9))
        best_texts = {tok.decode([t]) for t, v in lift.items() if v > best * (1 - 1e-9) and got[t] == top_count}
        assert 0 < len(tops) <= 8 and tops[0] in best_texts


def test_deepseek_uses_the_gates_own_biased_choice(tiny_models, texts):
    """DeepSeek V3 picks from sigmoid scores plus e_score_correction_bias: a large bias on expert 0
    puts it in every token's top-k although the logits alone would not; probabilities are the
    normalised sigmoid scores; the dense first layer is not an MoE layer."""
    model, tok = _load(tiny_models("deepseek_v3"))
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[0] = 100.0
    stats = _stats(model, tok, texts)
    (lay,) = stats.layers
    assert lay.layer == 1 and stats.scoring == "sigmoid"
    assert lay.share[0] == pytest.approx(0.5) and lay.coactivation[0][0] == pytest.approx(1.0)
    _, (logits,) = _reference(model, tok, texts)
    plain = torch.topk(logits, 2, -1).indices
    assert float((plain == 0).any(-1).double().mean()) < 0.9  # the logits alone would not pick it every time
    scores = torch.sigmoid(logits.double())
    probs = scores / scores.sum(-1, keepdim=True)
    assert lay.router_prob == pytest.approx(probs.mean(0).tolist(), abs=1e-5)
    assert lay.entropy == pytest.approx(float(-(probs * probs.log()).sum(-1).mean()), abs=1e-5)


def test_write_plots_and_cli(tiny_models, texts, tmp_path, capsys):
    import slimlm.cli  # noqa: F401 - registers every verb

    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(texts))
    code, out, err = run_cli(capsys, "moe", "stats", tiny_models("mixtral"), "--data", data, "--tokens", 256,
                             "--seq-len", 64, "--out", tmp_path / "report", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == 256 and len(result["layers"]) == 2 and "inputs" not in result
    files = {p.name: p for p in (tmp_path / "report").iterdir()}
    assert set(files) == {"share_heatmap.png", "share_by_layer.png", "stats.json", "stats.html"}
    assert files["share_heatmap.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = files["stats.html"].read_text()
    assert "src='share_heatmap.png'" in page and "src='share_by_layer.png'" in page and "<table>" in page
    assert json.loads(files["stats.json"].read_text())["layers"] == result["layers"]
    code, out, err = run_cli(capsys, "moe", "stats", tiny_models("mixtral"), "--data", data, "--tokens", 256,
                             "--seq-len", 64)
    assert code == 0 and "balance" in out and "share max" in out


def test_cli_dense_model_is_one_line_error(tiny_models, capsys):
    import slimlm.cli  # noqa: F401

    code, out, err = run_cli(capsys, "moe", "stats", tiny_models("llama"), "--tokens", 64)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "llama" in err and "mixtral" in err and "deepseek_v3" in err
