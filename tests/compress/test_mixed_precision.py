"""Per-tensor mixed precision (`--format gguf --target-size MIB | --target-bpw B`): the allocation is
the knapsack optimum and meets its budget, the sensitivity proxy ranks tensors as direct measurement
does, the written file holds the chosen types (tensors and metadata) and runs in llama.cpp, a second
budget reuses the cached sensitivities, GPTQ writes its codes into the same types, and bad budgets
fail in one line before any long work."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from slimlm.compress import sensitivity
from slimlm.compress.mixed_precision import allocate, candidate_types
from slimlm.errors import SlimlmError
from tests.conftest import build_tiny_model, run_cli

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.parametrize("seed", range(8))
def test_allocation_is_the_brute_force_optimum_within_budget(seed):
    rng = np.random.default_rng(seed)
    options = {}
    for i in range(6):
        sizes = np.sort(rng.integers(50, 400, size=4))
        costs = np.sort(rng.random(4))[::-1] * rng.random()  # more bytes, less cost (mostly)
        options[f"t{i}"] = {f"T{k}": (int(b), float(c)) for k, (b, c) in enumerate(zip(sizes, costs))}
    floor = sum(min(b for b, _ in o.values()) for o in options.values())
    top = sum(max(b for b, _ in o.values()) for o in options.values())
    for budget in np.linspace(floor, top, 7).astype(int):
        best = min((sum(options[n][t][1] for n, t in zip(options, combo)), combo)
                   for combo in itertools.product(*[list(o) for o in options.values()])
                   if sum(options[n][t][0] for n, t in zip(options, combo)) <= budget)
        chosen = allocate(options, int(budget))
        assert sum(options[n][t][0] for n, t in chosen.items()) <= budget
        assert np.isclose(sum(options[n][t][1] for n, t in chosen.items()), best[0])
        coarse = allocate(options, int(budget), steps=7)  # coarse steps: maybe worse, never over
        assert sum(options[n][t][0] for n, t in coarse.items()) <= budget
    with pytest.raises(SlimlmError, match="below"):
        allocate(options, floor - 1)


def test_candidates_follow_llama_cpp_fallback():
    assert candidate_types(1536) == ["Q3_K", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"]
    assert candidate_types(576) == ["Q4_0", "Q5_0", "Q5_1", "Q8_0", "F16"]


@pytest.fixture(scope="module")
def wide(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A 4-layer llama 256 wide, untied: 28 weights with K-quant candidates."""
    return build_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("mp-wide"), seed=11,
                            hidden_size=256, intermediate_size=512, num_hidden_layers=4)


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_sensitivity_ranks_tensors_like_direct_measurement(wide):
    """The proxy's KL at Q5_K and Q8_0 (scaled from the measured lowest type by weighted error)
    against the KL of quantizing each tensor alone at that type, measured directly."""
    from slimlm.compress.quant_steps import quantizable, tensor_shapes
    from slimlm.data import calibration_docs

    shapes = tensor_shapes(wide)
    names = [n for n, s in shapes.items() if quantizable(n, s)]
    texts = calibration_docs()
    found = sensitivity.measure(wide, texts, {n: candidate_types(shapes[n][-1]) for n in names}, tokens=128)
    assert len(names) == 28 and all(found["kl_low"][n][0] in ("Q3_K", "Q4_0") for n in names)
    for kind in ("Q5_K", "Q8_0"):
        direct = sensitivity.kl_direct(wide, texts, [(n, kind) for n in names], tokens=128)
        proxy = [found["scores"][n][kind] for n in names]
        assert _spearman(proxy, direct) >= 0.8, (kind, proxy, direct)


def test_an_expert_stacks_kl_is_that_of_quantizing_all_its_experts(tiny_models):
    """An MoE unit (a layer's down projections of every expert, one GGUF tensor): its KL at the
    lowest type equals the KL of a plain full forward with each expert's slice of transformers'
    fused parameter replaced by its rounded values, and its error is summed over the experts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.compress.kquant_formats import dequantize_type
    from slimlm.compress.quant_steps import tensor_shapes
    from slimlm.data import calibration_docs

    folder = tiny_models("mixtral")
    members = sorted(n for n in tensor_shapes(folder) if ".layers.1." in n and n.endswith(".w2.weight"))
    unit = members[0].replace(".experts.0.", ".experts.")
    assert len(members) >= 2 and unit not in members
    texts = calibration_docs()
    found = sensitivity.measure(folder, texts, {unit: ["Q4_0", "Q8_0"]}, tokens=64, stacks={unit: members})
    low, kl = found["kl_low"][unit]
    assert low == "Q4_0" and kl > 0 and found["err"][unit]["Q4_0"] > found["err"][unit]["Q8_0"] > 0

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("\n\n".join(texts)[: 64 * 12], add_special_tokens=False)["input_ids"][:64]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        down = model.model.layers[1].mlp.experts.down_proj
        for e in range(down.shape[0]):
            down.data[e] = torch.from_numpy(dequantize_type(low, down.data[e].numpy().copy()))
        got = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    direct = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert kl == pytest.approx(direct, rel=1e-3, abs=1e-9)


def _types_in(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    reader = GGUFReader(path)
    field = reader.fields["slimlm.tensor_types"]
    meta = json.loads(bytes(field.parts[field.data[0]]).decode())
    return {t.name: t.tensor_type.name for t in reader.tensors if t.tensor_type.name != "F32"}, meta


def test_mixed_file_holds_the_chosen_types_runs_and_reuses_the_cache(wide, tmp_path, monkeypatch, capfd):
    from llama_cpp import Llama

    from slimlm.compress.quantize import quantize

    calls = []
    real = sensitivity.measure
    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    low = quantize(wide, tmp_path / "low.gguf", format="gguf", target_bpw=5.2, calib_seq_len=128, record=False)
    assert calls == [1] and low.format == "gguf:mixed"
    assert low.size_after <= int(5.2 * low.params_total / 8)
    tensors, meta = _types_in(Path(low.out))
    assert tensors == meta == low.tensor_types
    assert len(set(t for n, t in tensors.items() if n.startswith("blk."))) >= 2  # a real mix
    lines = (tmp_path / "low.tensor-types.txt").read_text().splitlines()
    assert dict(line.split("=") for line in lines) == {k: v.lower() for k, v in low.tensor_types.items()}
    assert "kl_mean" in low.fidelity
    llm = Llama(model_path=low.out, logits_all=True, n_ctx=32, verbose=False, n_gpu_layers=0)
    llm.eval([1, 5, 9, 13])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()

    budget = (low.size_after + 3 * 2**17) / 2**20  # a second budget: cached sensitivities, only allocation + write
    high = quantize(wide, tmp_path / "high.gguf", format="gguf", target_size=budget, calib_seq_len=128,
                    record=False, check=False)
    assert calls == [1] and any("from the cache" in n for n in high.notes)
    assert low.size_after < high.size_after <= int(budget * 2**20)
    assert _types_in(Path(high.out))[0] == high.tensor_types
    bits = {"Q3_K": 3.4375, "Q4_0": 4.5, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "F16": 16}
    assert sum(bits[t] for n, t in high.tensor_types.items() if n.startswith("blk.")) > \
        sum(bits[t] for n, t in low.tensor_types.items() if n.startswith("blk."))

    code, out, err = run_cli(capfd, "quantize", wide, "--format", "gguf", "--target-bpw", "6", "--calib-seq-len", "128",
                             "--no-check", "--out", tmp_path / "cli.gguf")  # the report names the mix
    assert code == 0 and calls == [1], err
    assert "tensor types" in out and "from the cache" in out


def test_bad_budgets_fail_in_one_line_before_any_work(wide, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: pytest.fail("measured before checking the budget"))
    out = tmp_path / "x.gguf"
    cases = [(["--format", "gguf", "--target-size", "0.05"], "smallest this model reaches"),
             (["--format", "gguf", "--target-bpw", "2"], "smallest this model reaches"),
             (["--format", "gguf", "--target-size", "5", "--target-bpw", "5"], "not both"),
             (["--format", "gguf:Q4_K_M", "--target-size", "5"], "use --format gguf, not gguf:Q4_K_M"),
             (["--format", "gguf:Q4_0", "--target-bpw", "5"], "use --format gguf, not gguf:Q4_0"),
             (["--format", "gguf", "--target-size", "5", "--method", "ternary"], "--method ternary does not")]
    for args, message in cases:
        code, _, err = run_cli(capfd, "quantize", wide, "--out", out, *args)
        assert code == 1 and err.strip().count("\n") == 0 and err.startswith("error:") and message in err, (args, err)
        assert not out.exists()


def test_gptq_mixed_file_meets_its_budget_with_importance_weighted_types(wide, tmp_path, monkeypatch):
    """--method gptq --target-bpw: the allocation's sensitivities quantize every linear weight by
    the importance-matrix rules GPTQ fits its scales by (rtn's by the reference rules); the file
    meets the budget and records its types, GPTQ's bytes are written in every type it codes, and the
    token embedding / output head (allocated too) are RTN's bytes in the types chosen."""
    from slimlm.compress.gptq_kquant import CODED_TYPES
    from slimlm.compress.kquant_formats import encode
    from slimlm.compress.quant_steps import tensor_shapes
    from slimlm.compress.quantize import quantize

    common = dict(format="gguf", target_bpw=5.2, calib_seq_len=128, calib_samples=16, record=False)
    seen = {}
    real = sensitivity.measure

    def spy(folder, texts, candidates, tokens=256, weighted=frozenset(), stacks=None):
        seen["weighted"], seen["candidates"] = weighted, candidates
        return real(folder, texts, candidates, tokens, weighted, stacks)

    monkeypatch.setattr(sensitivity, "measure", spy)
    monkeypatch.setattr(sensitivity, "cache_path", lambda key: tmp_path / "sensitivity" / f"{key}.json")  # measured here
    rtn = quantize(wide, tmp_path / "rtn.gguf", check=False, **common)
    assert seen["weighted"] == frozenset()
    gptq = quantize(wide, tmp_path / "gptq.gguf", method="gptq", **common)
    linears = [n for n in seen["candidates"] if ".layers." in n]
    assert len(linears) == 28 and seen["weighted"] == frozenset(linears)
    assert gptq.format == "gguf:mixed" and gptq.method == "gptq"
    assert max(gptq.size_after, rtn.size_after) <= int(5.2 * gptq.params_total / 8)
    tensors, meta = _types_in(Path(gptq.out))
    assert tensors == meta == gptq.tensor_types
    assert len(set(t for n, t in tensors.items() if n.startswith("blk."))) >= 2
    ours = {t.name: np.asarray(t.data) for t in GGUFReader(gptq.out).tensors}
    theirs = {t.name: np.asarray(t.data) for t in GGUFReader(rtn.out).tensors}
    same_type = [n for n, t in tensors.items() if n.startswith("blk.") and t in CODED_TYPES
                 and rtn.tensor_types.get(n) == t]
    assert same_type and all(not np.array_equal(ours[n], theirs[n]) for n in same_type)  # GPTQ's codes
    from safetensors.numpy import load_file

    dense = load_file(str(Path(wide) / "model.safetensors"))
    assert tensor_shapes(wide)["lm_head.weight"] == dense["lm_head.weight"].shape
    head = encode(tensors["output.weight"], dense["lm_head.weight"].astype(np.float32))[0]
    assert np.array_equal(ours["output.weight"].reshape(-1).view(np.uint8), head.reshape(-1).view(np.uint8))
    assert 0 <= gptq.fidelity["top1_agreement"] <= 1
    lines = (tmp_path / "gptq.tensor-types.txt").read_text().splitlines()
    assert dict(line.split("=") for line in lines) == {k: v.lower() for k, v in gptq.tensor_types.items()}


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "phi3"])
def test_mixed_file_on_other_families(family, tiny_models, tmp_path):
    """The partial reruns of the sensitivity pass (per-layer inputs, Gemma's soft-capping, Phi-3's
    fused qkv) and the writer work beyond llama: a 64-wide tiny model of each family."""
    from llama_cpp import Llama

    from slimlm.compress.quant_steps import quantizable, tensor_shapes
    from slimlm.compress.quantize import quantize
    from slimlm.data import calibration_docs

    shapes = tensor_shapes(tiny_models(family))
    names = [n for n, s in shapes.items() if quantizable(n, s)]
    # a rerun from a layer's recorded input with f16-rounded weights reproduces the full forward
    assert max(sensitivity.kl_direct(tiny_models(family), calibration_docs(), [(names[0], "F16"), (names[-1], "F16")],
                                     tokens=64)) < 1e-5
    result = quantize(tiny_models(family), tmp_path / "m.gguf", format="gguf", target_bpw=10, calib_seq_len=64,
                      record=False, check=False)
    assert result.size_after <= int(10 * result.params_total / 8)
    tensors, meta = _types_in(Path(result.out))
    assert tensors == meta == result.tensor_types
    llm = Llama(model_path=result.out, logits_all=True, n_ctx=32, verbose=False, n_gpu_layers=0)
    llm.eval([1, 5, 9, 13])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()


def test_token_embedding_and_output_head_join_the_allocation(wide, tmp_path):
    """--embeddings auto: the token embedding and output head are allocated with the rest (their KL
    measured by a full forward, which with f16-rounded weights reproduces the reference), a tight
    budget gives them no more bits than a loose one; an explicit --embeddings keeps its type."""
    from slimlm.compress.quantize import quantize
    from slimlm.data import calibration_docs

    heads = ("model.embed_tokens.weight", "lm_head.weight")
    model, ids = sensitivity._load(wide, calibration_docs(), 64)
    runner = sensitivity._Runner(model, ids, [])
    params = dict(model.named_parameters())
    for h in heads:  # the full forward with the weights unchanged is the reference, exactly
        assert runner.kl(h, params[h].detach().numpy().copy()) == 0.0
    f16 = sensitivity.kl_direct(wide, calibration_docs(), [(h, "F16") for h in heads], tokens=64)
    low_kl = sensitivity.kl_direct(wide, calibration_docs(), [(h, "Q3_K") for h in heads], tokens=64)
    assert max(f16) < 1e-3 and min(low_kl) > 100 * max(f16), (f16, low_kl)

    bits = {"Q3_K": 3.4375, "Q4_0": 4.5, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "F16": 16}
    common = dict(format="gguf", calib_seq_len=128, record=False, check=False)
    low = quantize(wide, tmp_path / "low.gguf", target_bpw=4.5, **common)
    high = quantize(wide, tmp_path / "high.gguf", target_bpw=8.0, **common)
    fixed = quantize(wide, tmp_path / "fixed.gguf", target_bpw=8.0, embeddings="Q6_K", **common)
    gguf_heads = ("token_embd.weight", "output.weight")
    for r in (low, high, fixed):
        assert r.size_after <= int((4.5 if r is low else 8.0) * r.params_total / 8)
        assert _types_in(Path(r.out))[0] == r.tensor_types
    assert all(low.tensor_types[h] in candidate_types(256) for h in gguf_heads)
    assert sum(bits[low.tensor_types[h]] for h in gguf_heads) < sum(bits[high.tensor_types[h]] for h in gguf_heads)
    assert any("token_embd.weight" in n for n in low.notes)  # the allocation names the heads' types
    assert all(fixed.tensor_types[h] == "Q6_K" for h in gguf_heads)
