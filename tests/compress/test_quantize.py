"""RTN quantization into llama.cpp's block formats: the GGUF holds exactly the codes slimlm chose,
llama.cpp runs the file, and the quality cost is measured (and ordered as bits say it should)."""

from __future__ import annotations

import numpy as np
import pytest

from slimlm.compress.blocks import dequantize_codes, get_format, rtn
from slimlm.compress.gguf_export import ARCHS
from slimlm.compress.quantize import quantize
from slimlm.errors import SlimlmError

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::UserWarning")]


def _hf_weight(folder, name):
    from safetensors.numpy import load_file

    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        if name in tensors:
            return tensors[name].astype(np.float32)
    raise KeyError(name)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_gguf_blocks_dequantize_to_the_chosen_values(fmt, tiny_models, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    folder = tiny_models("qwen2")  # qwen2 rows are written as they are (no rotary permutation)
    out = quantize(str(folder), tmp_path / "m.gguf", format=f"gguf:{fmt}", check=False, record=False,
                   embeddings="f16")
    reader = GGUFReader(out.out)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type == get_format(fmt).qtype
    w = _hf_weight(folder, "model.layers.0.mlp.down_proj.weight")
    expected = dequantize_codes(fmt, *rtn(fmt, w))
    stored = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(w.shape)
    assert np.array_equal(stored, expected)
    assert np.abs(stored - w).max() < np.abs(w).max() / 4  # and close to the original weights
    # with --embeddings f16, embeddings and norms stay unquantized
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"


def test_quality_cost_is_measured_and_ordered_by_bits(tiny_models, tmp_path):
    folder = str(tiny_models("llama"))
    q8 = quantize(folder, tmp_path / "q8.gguf", format="gguf:Q8_0", record=False)
    q4 = quantize(folder, tmp_path / "q4.gguf", format="gguf:Q4_0", record=False)
    assert "error" not in q8.fidelity, q8.fidelity
    assert q8.fidelity["top1_agreement"] > 0.8  # random tiny models have many near-ties
    assert q8.fidelity["kl_mean"] < q4.fidelity["kl_mean"]
    assert q4.size_after < q8.size_after
    assert (tmp_path / "q4.slimlm.json").exists()  # manifest beside the file, for `slimlm lineage`


def test_quantized_file_generates_in_llama_cpp(tiny_models, tmp_path):
    from slimlm.models.backends import GenerationParams, open_backend

    out = quantize(str(tiny_models("llama")), tmp_path / "q.gguf", format="gguf:Q4_1", check=False, record=False)
    engine = open_backend(out.out, "llamacpp", n_ctx=128)
    completion = engine.generate("def", GenerationParams(max_tokens=8), raw=True)
    assert completion.timings.generated_tokens > 0
    assert engine.precision().startswith("Q4_1")
    engine.close()


def test_bad_input_fails_before_any_work(tiny_models, tmp_path):
    folder = str(tiny_models("llama"))
    target = tmp_path / "x.gguf"
    cases = [({"format": "gguf:TQ2_0"}, "not a multiple"),  # tiny widths are below the 256 block
             ({"format": "gguf:Q9_9"}, "unknown block format"),
             ({"format": "hf:Q4_0"}, "unsupported output format"),
             ({"method": "magic"}, "unknown method")]
    for kwargs, message in cases:
        with pytest.raises(SlimlmError, match=message):
            quantize(folder, target, check=False, record=False, **kwargs)
        assert not target.exists() and not list(tmp_path.glob(".x.gguf*"))
    target.write_text("keep me")
    with pytest.raises(SlimlmError, match="already exists"):
        quantize(folder, target, check=False, record=False)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("family", list(ARCHS))
def test_matrix_quantize(family, tiny_models, tmp_path):
    """Q8_0 of each family's tiny model runs in llama.cpp and picks torch's next tokens."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    folder = tiny_models(family)
    out = quantize(str(folder), tmp_path / "q8.gguf", format="gguf:Q8_0", check=False, record=False)
    assert out.params_quantized > 0
    ids = [1, 40, 77, 120, 200, 33, 91, 250, 300, 17, 5, 64]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=out.out, logits_all=True, n_ctx=64, verbose=False, n_gpu_layers=0)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    llm.close()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_cli_quantize_and_export(tiny_models, tmp_path, capfd):
    import json

    from tests.conftest import run_cli

    folder = tiny_models("llama")
    code, out, err = run_cli(capfd, "quantize", folder, "--format", "gguf:Q8_0", "--out", tmp_path / "q.gguf", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["format"] == "gguf:Q8_0" and result["size_after"] == (tmp_path / "q.gguf").stat().st_size
    assert 0 <= result["fidelity"]["top1_agreement"] <= 1
    code, out, err = run_cli(capfd, "export", folder, "--format", "gguf:f16", "--out", tmp_path / "f.gguf")
    assert code == 0 and (tmp_path / "f.gguf").exists(), err
    from slimlm.runs import list_runs

    run = list_runs(limit=1, command="export")[0]  # the library records the export, as it does a quantize
    assert run.params["format"] == "gguf:f16" and run.metrics["size_bytes"] == (tmp_path / "f.gguf").stat().st_size
    for args, message in ((["quantize", folder, "--format", "gguf:Q3_X", "--out", tmp_path / "x.gguf"], "Q3_X"),
                          (["export", folder, "--format", "gguf:q4_0", "--out", tmp_path / "y.gguf"], "gguf:q4_0")):
        code, out, err = run_cli(capfd, *args)
        assert code == 1 and err.strip().count("\n") == 0 and err.startswith("error:") and message in err, err


def test_gptq_file_costs_less_quality_than_rtn(tiny_models, tmp_path):
    """GPTQ's codes (chosen from calibration text) go through the same packing and llama.cpp runs
    them; on held-out text they stay closer to the original than round-to-nearest at Q4_0."""
    folder = str(tiny_models("llama"))
    kwargs = dict(format="gguf:Q4_0", record=False, calib_samples=8, calib_seq_len=64)
    gptq = quantize(folder, tmp_path / "gptq.gguf", method="gptq", **kwargs)
    plain = quantize(folder, tmp_path / "rtn.gguf", method="rtn", **kwargs)
    assert "error" not in gptq.fidelity, gptq.fidelity
    assert gptq.fidelity["kl_mean"] < plain.fidelity["kl_mean"]
    assert gptq.size_after == plain.size_after  # same format, same bytes per block


def test_llamacpp_method_is_the_peers_own_quantizer(tiny_models, tmp_path):
    from gguf import GGUFReader

    folder = str(tiny_models("llama"))
    result = quantize(folder, tmp_path / "lc.gguf", method="llamacpp", format="gguf:Q8_0", record=False)
    kinds = {t.tensor_type.name for t in GGUFReader(result.out).tensors}
    assert "Q8_0" in kinds and result.fidelity["top1_agreement"] > 0.8
    with pytest.raises(SlimlmError, match="llama.cpp offers no type"):
        quantize(folder, tmp_path / "x.gguf", method="llamacpp", format="gguf:Q4_K_Z", record=False)
    assert not (tmp_path / "x.gguf").exists()


def test_awq_method_writes_a_runnable_file_and_cleans_up(tiny_models, tmp_path):
    folder = str(tiny_models("qwen2"))
    result = quantize(folder, tmp_path / "awq.gguf", method="awq", format="gguf:Q4_0", record=False,
                      calib_samples=8, calib_seq_len=64)
    assert "error" not in result.fidelity, result.fidelity
    assert result.notes and result.notes[0].startswith("AWQ scaled")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_calibration_from_a_jsonl_field_and_its_errors(tiny_models, tmp_path):
    """GPTQ calibrates on a user's JSONL field (sequential by default) and the manifest says so;
    too little text, a missing field or a missing file fail before any model is loaded."""
    import json

    from slimlm.data import python_docs

    folder = str(tiny_models("llama"))
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in python_docs()[:40]))
    result = quantize(folder, tmp_path / "g.gguf", method="gptq", format="gguf:Q4_0", record=False,
                      calib=str(data), calib_field="body", calib_samples=4, calib_seq_len=64, check=False)
    manifest = json.loads((tmp_path / "g.slimlm.json").read_text())
    assert manifest["params"]["calib"] == str(data) and manifest["params"]["calib_field"] == "body"
    assert manifest["params"]["sequential"] is True and result.params_quantized > 0
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass")
    for kwargs, message in ((dict(calib=str(short)), "shorter than one sequence"),
                            (dict(calib=str(data), calib_field="text"), "text"),
                            (dict(calib=str(tmp_path / "none.jsonl")), "unknown text source")):
        with pytest.raises(SlimlmError, match=message):
            quantize(folder, tmp_path / "x.gguf", method="gptq", record=False, calib_seq_len=64, **kwargs)
        assert not (tmp_path / "x.gguf").exists()


def test_q8_0_embeddings_are_smaller_and_still_run(tiny_models, tmp_path):
    from gguf import GGUFReader

    folder = str(tiny_models("llama"))
    f16 = quantize(folder, tmp_path / "a.gguf", format="gguf:Q4_0", record=False, embeddings="f16")
    q8 = quantize(folder, tmp_path / "b.gguf", format="gguf:Q4_0", record=False, embeddings="Q8_0")
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(q8.out).tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and q8.size_after < f16.size_after
    # Q8_0's error is small next to the 4-bit body's: the KL barely moves
    assert "error" not in q8.fidelity and q8.fidelity["kl_mean"] < 1.2 * f16.fidelity["kl_mean"]
    with pytest.raises(SlimlmError, match="f16, Q8_0, Q6_K"):
        quantize(folder, tmp_path / "c.gguf", record=False, embeddings="Q4_0")


@pytest.mark.parametrize("method,bits,group,symmetric", [("rtn", 4, 64, True), ("gptq", 3, 32, False),
                                                         ("ternary", None, 32, True), ("rtn", 8, 0, True),
                                                         ("awq", 4, 32, True)])
def test_packed_hf_output_loads_and_generates(method, bits, group, symmetric, tiny_models, tmp_path):
    """`--format hf` writes packed codes that slimlm's torch backend reads back: the stored weights
    are the codes' values (checked against a direct dequantization), and the model generates."""
    import json

    import torch
    from safetensors import safe_open

    from slimlm.models.backends import GenerationParams, open_backend
    from slimlm.models.loading import load_torch
    from slimlm.models.packed import unpack_codes

    folder = tiny_models("llama")
    out = tmp_path / "packed"
    result = quantize(str(folder), out, method=method, format="hf", bits=bits, group_size=group,
                      symmetric=symmetric, record=False, calib_samples=4, calib_seq_len=64)
    assert "error" not in result.fidelity, result.fidelity
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    manifest = json.loads((out / "slimlm.json").read_text())
    assert manifest["params"]["method"] == method and manifest["params"]["group_size"] in (group, 0)
    assert result.size_after < result.size_before
    model, tokenizer = load_torch(out)
    name = "model.layers.1.mlp.down_proj"
    with safe_open(out / "model.safetensors", framework="pt") as st:
        packed, scales = st.get_tensor(f"{name}.qweight"), st.get_tensor(f"{name}.scales").float()
        mins = st.get_tensor(f"{name}.mins").float() if f"{name}.mins" in st.keys() else None
    cols = model.get_submodule(name).in_features
    rows = model.get_submodule(name).out_features
    assert packed.dtype == torch.uint8 and packed.numel() <= rows * (cols * config["bits"] // 8 + 2)  # packed, not fp32
    q = unpack_codes(packed, config["bits"], cols).float()
    g = cols // scales.shape[1]
    w = scales.repeat_interleave(g, 1) * (q - config["zero"]) + (0 if mins is None else mins.repeat_interleave(g, 1))
    with torch.no_grad():
        assert torch.allclose(model.get_submodule(name).dequantize().float(), w, atol=1e-6)
    engine = open_backend(str(out), "torch", dtype="float32")
    text = engine.generate("def f(x):", GenerationParams(max_tokens=4), raw=True).text
    engine.close()
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]  # the same greedy decode, by transformers
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    new_ids = [t for t in greedy[0, ids.shape[1]:].tolist() if t != tokenizer.eos_token_id]
    assert text and text == tokenizer.decode(new_ids, skip_special_tokens=True)
    if method == "ternary":
        assert set(q.unique().tolist()) <= {0.0, 1.0, 2.0}


def test_format_and_method_mismatches_fail_up_front(tiny_models, tmp_path):
    folder = str(tiny_models("llama"))
    cases = [(dict(format="hf", bits=5), "bit width 5"),
             (dict(format="hf", group_size=48), "group size 48"),
             (dict(method="ternary", format="gguf:Q4_0"), "TQ1_0 or TQ2_0"),
             (dict(format="gguf:Q4_0", bits=8), "4-bit codes, not 8"),
             (dict(format="gguf:Q4_0", group_size=64), "fixes the group size"),
             (dict(format="gguf", bits=3), "no 3-bit llama.cpp block format"),
             (dict(method="awq", format="hf", group_size=0), "per-channel")]
    for kwargs, message in cases:
        with pytest.raises(SlimlmError, match=message):
            quantize(folder, tmp_path / "x", record=False, **kwargs)
        assert not (tmp_path / "x").exists()


def test_moe_experts_are_quantized_expert_by_expert(tiny_models, tmp_path):
    """A Mixtral's stacked expert tensors hold, expert after expert, the bytes gguf-py's own Q8_0
    quantizer gives each checkpoint expert; routers stay unquantized (as llama-quantize leaves them)."""
    from gguf import GGMLQuantizationType, GGUFReader, quants
    from safetensors import safe_open

    folder = tiny_models("mixtral")
    out = quantize(str(folder), tmp_path / "q8.gguf", format="gguf:Q8_0", check=False, record=False)
    tensors = {t.name: t for t in GGUFReader(out.out).tensors}
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type not in (GGMLQuantizationType.Q8_0,)
    stacked = tensors["blk.1.ffn_down_exps.weight"]
    assert stacked.tensor_type == GGMLQuantizationType.Q8_0
    with safe_open(next(folder.glob("*.safetensors")), framework="numpy") as st:
        experts = [st.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight").astype(np.float32)
                   for e in range(4)]
    want = np.stack([quants.quantize(w, GGMLQuantizationType.Q8_0) for w in experts])
    assert np.array_equal(np.asarray(stacked.data).reshape(want.shape), want)
    routed = sum(w.size for w in experts) * 3 * 2  # w1, w2, w3 in both layers
    assert out.params_quantized > routed


@pytest.mark.parametrize("kwargs", [dict(format="gguf", target_bpw=8.5),
                                    dict(format="gguf:Q8_0", method="gptq", calib_samples=8, calib_seq_len=64)],
                         ids=["target-bpw", "gptq"])
def test_deepseek_mixed_and_gptq_files_run_in_llama_cpp(kwargs, tiny_models, tmp_path):
    """DeepSeek V3 (MLA, a routing bias, shared experts) through a per-tensor mix and GPTQ: the
    file meets its budget and llama.cpp picks transformers' next tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from slimlm.compress.quant_steps import tensor_shapes
    from tests.conftest import llama_logits

    folder = tiny_models("deepseek_v3")
    out = quantize(str(folder), tmp_path / "m.gguf", check=False, record=False, **kwargs)
    if "target_bpw" in kwargs:
        params = sum(int(np.prod(s)) for s in tensor_shapes(folder).values())
        assert out.size_after <= kwargs["target_bpw"] * params / 8
    ids = [1, 40, 77, 120, 200, 33, 91, 250, 300, 17, 5, 64]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(out.out, ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
