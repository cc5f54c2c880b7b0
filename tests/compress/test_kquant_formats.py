"""slimlm's K-quant files (`--format gguf:Q4_K_M` ...) against llama-quantize's of the same f32 GGUF:
every tensor has the same type and, with RTN (no importance matrix), the same bytes; llama.cpp loads
and runs them; methods that cannot write them say so in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from slimlm.compress.kquant_formats import mix_type, use_more_bits
from slimlm.errors import SlimlmError
from tests.conftest import build_tiny_model

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def models(tiny_models, tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """An 8-layer llama 256 wide (K-quant blocks fit; use_more_bits picks layers 0, 3, 6, 7) and
    the 64-wide tiny llama (every K type falls back)."""
    wide = build_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("wide8"), seed=3,
                            hidden_size=256, intermediate_size=512, num_hidden_layers=8)
    return {"llama-256x8": wide, "llama-64": tiny_models("llama")}


def _llama_quantize(f32: Path, out: Path, ftype: str, pure: bool = False, output_type=None) -> Path:
    """llama.cpp's quantizer with --pure / --output-tensor-type, which slimlm's helper does not expose."""
    import llama_cpp

    from slimlm.compress.llamacpp_quant import llamacpp_quantize, llamacpp_types

    if not pure:
        return llamacpp_quantize(f32, out, ftype, threads=1)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llamacpp_types()[ftype]
    params.nthread = 1
    params.pure = True
    params.output_tensor_type = int(output_type)
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) == 0
    return out


def _compare(ours: Path, theirs: Path) -> dict[str, str]:
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for name, t in b.items():
        assert a[name].tensor_type == t.tensor_type, (name, a[name].tensor_type.name, t.tensor_type.name)
        # bytes, not arrays: llama-quantize lists a [n, 1] tensor (Qwen-MoE's shared-expert gate) as [n]
        assert np.asarray(a[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    return {name: t.tensor_type.name for name, t in b.items()}


@pytest.mark.parametrize("model", ["llama-256x8", "llama-64"])
@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                                   "Q6_K"])
def test_mixes_equal_llama_quantize(models, model, ftype, tmp_path):
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.quantize import quantize

    f32 = export_gguf(models[model], tmp_path / "f32.gguf", dtype="f32")
    theirs = _llama_quantize(f32, tmp_path / "llama.gguf", ftype)
    result = quantize(models[model], tmp_path / "slimlm.gguf", format=f"gguf:{ftype}", check=False, record=False)
    types = _compare(Path(result.out), theirs)
    assert {k: v for k, v in result.tensor_types.items()} == {k: v for k, v in types.items() if v != "F32"}
    if model == "llama-256x8" and ftype == "Q4_K_M":  # the rule's layers, as llama.cpp chose them
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == \
            ["Q6_K" if use_more_bits(i, 8) else "Q4_K" for i in range(8)] == \
            ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
        assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.1.attn_q.weight"] == "Q4_K"
        assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    if model == "llama-256x8" and ftype == "Q3_K_M":  # attn_v Q5_K on the first two layers, Q4_K after
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q5_K"] * 2 + ["Q4_K"] * 6
        assert {types[f"blk.{i}.{t}.weight"] for i in range(8) for t in ("ffn_down", "attn_output")} == {"Q4_K"}
        assert types["blk.3.attn_q.weight"] == types["token_embd.weight"] == "Q3_K"
    if model == "llama-256x8" and ftype == "Q2_K":  # 2 heads per KV head: attn_v Q3_K, as ffn_down, attn_output
        assert {types[f"blk.{i}.{t}.weight"] for i in range(8) for t in ("attn_v", "ffn_down", "attn_output")} \
            == {"Q3_K"}
        assert types["blk.5.ffn_up.weight"] == types["token_embd.weight"] == "Q2_K"
    if model == "llama-64" and ftype in ("Q2_K", "Q3_K_M"):  # 64 wide: Q2_K/Q3_K fall back to Q4_0
        assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    lines = (tmp_path / "slimlm.tensor-types.txt").read_text().splitlines()
    assert dict(line.split("=") for line in lines) == {k: v.lower() for k, v in result.tensor_types.items()}


@pytest.mark.parametrize("ftype", ["Q3_K", "Q4_K", "Q5_K"])
def test_uniform_types_equal_llama_quantize_pure(models, ftype, tmp_path):
    """gguf:Q3_K / Q4_K / Q5_K: every weight in that type (llama-quantize --pure), the output head Q6_K."""
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.quantize import quantize

    folder = models["llama-256x8"]
    f32 = export_gguf(folder, tmp_path / "f32.gguf", dtype="f32")
    theirs = _llama_quantize(f32, tmp_path / "llama.gguf", f"{ftype}_S", pure=True,
                             output_type=GGMLQuantizationType.Q6_K)
    result = quantize(folder, tmp_path / "slimlm.gguf", format=f"gguf:{ftype}", check=False, record=False)
    types = _compare(Path(result.out), theirs)
    assert types.pop("output.weight") == "Q6_K"
    assert {t for t in types.values() if t != "F32"} == {ftype}


def test_q4_k_m_runs_in_llama_cpp_and_other_methods_refuse(models, tmp_path):
    import json

    from llama_cpp import Llama

    from slimlm.compress.quantize import quantize

    folder = models["llama-256x8"]
    result = quantize(folder, tmp_path / "m.gguf", format="gguf:Q4_K_M", record=False)
    assert result.format == "gguf:Q4_K_M" and 0 <= result.fidelity["top1_agreement"] <= 1
    reader = GGUFReader(result.out)
    field = reader.fields["slimlm.tensor_types"]
    assert json.loads(bytes(field.parts[field.data[0]]).decode()) == result.tensor_types
    llm = Llama(model_path=result.out, logits_all=True, n_ctx=32, verbose=False, n_gpu_layers=0)
    llm.eval([1, 5, 9, 13])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()
    with pytest.raises(SlimlmError, match="--method ternary does not write K-quant"):  # gptq, awq do (their tests)
        quantize(folder, tmp_path / "x.gguf", method="ternary", format="gguf:Q4_K_M", record=False)
    with pytest.raises(SlimlmError, match="drop --bits"):
        quantize(folder, tmp_path / "x.gguf", format="gguf:Q4_K_M", bits=4, record=False)
    assert not (tmp_path / "x.gguf").exists()


def test_mix_rule_fallback_and_layers():
    assert mix_type("Q4_K_M", "blk.7.ffn_down.weight", 8, 512) == "Q6_K"
    assert mix_type("Q4_K_M", "blk.1.ffn_down.weight", 8, 512) == "Q4_K"
    assert mix_type("Q4_K_M", "blk.0.attn_v.weight", 30, 576) == "Q8_0"  # Q6_K falls back
    assert mix_type("Q4_K_M", "blk.1.attn_q.weight", 30, 576) == "Q5_0"  # Q4_K falls back
    assert mix_type("Q5_K_S", "blk.1.attn_q.weight", 30, 576) == "Q5_1"
    assert mix_type("Q4_K_S", "blk.3.attn_v.weight", 30, 512) == "Q5_K"
    assert mix_type("Q4_K_S", "blk.4.attn_v.weight", 30, 512) == "Q4_K"
    assert mix_type("Q6_K", "blk.4.attn_v.weight", 30, 40) == "F16"
    assert mix_type("Q3_K_M", "blk.1.attn_v.weight", 30, 512) == "Q5_K"
    assert mix_type("Q3_K_M", "blk.2.attn_v.weight", 30, 512) == "Q4_K"
    assert mix_type("Q3_K_M", "blk.1.ffn_down.weight", 32, 512) == "Q5_K"  # below 32/16
    assert mix_type("Q3_K_M", "blk.2.ffn_down.weight", 32, 512) == "Q4_K"
    assert mix_type("Q3_K_L", "blk.9.attn_output.weight", 30, 512) == "Q5_K"
    assert mix_type("Q3_K_S", "blk.0.attn_v.weight", 30, 512) == "Q3_K"
    assert mix_type("Q3_K_M", "blk.3.attn_k.weight", 30, 576) == "Q4_0"  # Q3_K falls back
    assert mix_type("Q2_K", "blk.0.attn_v.weight", 30, 512, n_gqa=3) == "Q3_K"
    assert mix_type("Q2_K", "blk.0.attn_v.weight", 30, 512, n_gqa=4) == "Q4_K"
    assert mix_type("Q2_K", "blk.0.attn_q.weight", 30, 640) == "Q4_0"
    with pytest.raises(SlimlmError, match="unknown K-quant"):
        mix_type("Q2_K_S", "blk.0.attn_v.weight", 8, 256)


def test_q2_k_rule_with_grouped_kv_heads_equals_llama_quantize(tiny_tokenizer_dir, tmp_path):
    """Q2_K's attn_v is Q4_K where 4 or more attention heads share a KV head (Gemma 3 270M: 4),
    Q3_K below (SmolLM2: 3): the rule with n_gqa from the config gives llama-quantize's types."""
    from slimlm.compress.gguf_export import export_gguf

    folder = build_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "gqa4", seed=5, hidden_size=256,
                              intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=1)
    f32 = export_gguf(folder, tmp_path / "f32.gguf", dtype="f32")
    theirs = {t.name: t.tensor_type.name for t in GGUFReader(_llama_quantize(f32, tmp_path / "q2.gguf", "Q2_K")).tensors}
    body = {name: t for name, t in theirs.items() if name.startswith("blk.") and t != "F32"}
    assert {name: mix_type("Q2_K", name, 4, 512 if "ffn_down" in name else 256, n_gqa=4) for name in body} == body
    assert body["blk.0.attn_v.weight"] == "Q4_K" and body["blk.0.attn_q.weight"] == "Q2_K"


def test_q3_k_m_runs_in_llama_cpp(models, tmp_path):
    from llama_cpp import Llama

    from slimlm.compress.quantize import quantize

    result = quantize(models["llama-256x8"], tmp_path / "m.gguf", format="gguf:Q3_K_M", record=False)
    assert result.format == "gguf:Q3_K_M" and 0 <= result.fidelity["top1_agreement"] <= 1
    assert {t.tensor_type.name for t in GGUFReader(result.out).tensors} >= {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    llm = Llama(model_path=result.out, logits_all=True, n_ctx=32, verbose=False, n_gpu_layers=0)
    llm.eval([1, 5, 9, 13])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()


@pytest.fixture(scope="module")
def moe_models(tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """256-wide MoE models whose experts take K-quant blocks: a Mixtral with 8 experts (llama.cpp's
    8-expert attention rules apply) and a Qwen-MoE with 4 routed experts and a shared one."""
    return {
        "mixtral-8x": build_tiny_model("mixtral", tiny_tokenizer_dir, tmp_path_factory.mktemp("mixtral8"), seed=4,
                                       hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                                       num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": build_tiny_model("qwen2_moe", tiny_tokenizer_dir, tmp_path_factory.mktemp("qmoe"), seed=4,
                                      hidden_size=256, moe_intermediate_size=256,
                                      shared_expert_intermediate_size=256, num_hidden_layers=4, num_experts=4,
                                      num_experts_per_tok=2),
    }


@pytest.mark.parametrize("model", ["mixtral-8x", "qwen2_moe"])
@pytest.mark.parametrize("ftype", ["Q3_K_M", "Q4_K_M", "Q6_K"])
def test_moe_mixes_equal_llama_quantize(moe_models, model, ftype, tmp_path):
    """Stacked expert tensors get the type llama-quantize gives them and, expert by expert, its bytes;
    routers stay unquantized; the 8-expert model's attention gets llama.cpp's extra bits."""
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.quantize import quantize

    f32 = export_gguf(moe_models[model], tmp_path / "f32.gguf", dtype="f32")
    theirs = _llama_quantize(f32, tmp_path / "llama.gguf", ftype)
    result = quantize(moe_models[model], tmp_path / "slimlm.gguf", format=f"gguf:{ftype}", check=False, record=False)
    types = _compare(Path(result.out), theirs)
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert types["blk.2.ffn_up_exps.weight"] == {"Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q6_K": "Q6_K"}[ftype]
    assert result.tensor_types["blk.2.ffn_up_exps.weight"] == types["blk.2.ffn_up_exps.weight"]
    if model == "mixtral-8x" and ftype != "Q6_K":
        assert types["blk.1.attn_k.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
        assert types["blk.1.attn_output.weight"] == "Q5_K"


@pytest.mark.parametrize("ftype", ["Q4_0", "Q8_0"])
def test_moe_legacy_types_keep_llama_quantizes_attention_bump(moe_models, ftype, tmp_path):
    """A Q4_0 / Q8_0 file of an 8-expert model: llama-quantize stores attn_k and attn_v as Q8_0
    whatever the file type, and its routers f32; slimlm's file has the same types and, tensor for
    tensor, the same bytes (rounding to nearest, as llama.cpp's reference quantizers do)."""
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.quantize import quantize

    f32 = export_gguf(moe_models["mixtral-8x"], tmp_path / "f32.gguf", dtype="f32")
    theirs = _llama_quantize(f32, tmp_path / "llama.gguf", ftype)
    result = quantize(moe_models["mixtral-8x"], tmp_path / "slimlm.gguf", format=f"gguf:{ftype}", check=False,
                      record=False)
    types = _compare(Path(result.out), theirs)
    assert types["blk.1.attn_k.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["blk.1.attn_q.weight"] == types["blk.2.ffn_up_exps.weight"] == ftype
    assert abs(Path(result.out).stat().st_size - theirs.stat().st_size) < 1024  # metadata keys aside
    assert any("8-expert" in n for n in result.notes) == (ftype != "Q8_0")


def test_moe_target_size_types_each_expert_stack_as_one(moe_models, tmp_path):
    """--target-bpw on an MoE: every stacked expert tensor gets one type from the allocation (the
    types llama.cpp reads are the ones the result and the metadata report), the file meets its
    budget and runs in llama.cpp, and a larger budget spends more bytes on the experts."""
    from llama_cpp import Llama

    from slimlm.compress.quant_steps import tensor_shapes
    from slimlm.compress.quantize import quantize

    folder = moe_models["qwen2_moe"]
    params = sum(int(np.prod(s)) for s in tensor_shapes(folder).values())
    expert_bytes = {}
    for bpw in (4.5, 7.0):
        out = tmp_path / f"m{bpw}.gguf"
        result = quantize(folder, out, format="gguf", target_bpw=bpw, record=False, check=False)
        assert out.stat().st_size <= bpw * params / 8
        reader = GGUFReader(out)
        stacks = {t.name: t for t in reader.tensors if t.name.endswith("_exps.weight")}
        assert len(stacks) == 3 * 4  # gate, up and down of 4 layers
        for name, t in stacks.items():
            assert result.tensor_types[name] == t.tensor_type.name
        expert_bytes[bpw] = sum(int(t.n_bytes) for t in stacks.values())
        llm = Llama(model_path=str(out), n_ctx=32, verbose=False, n_gpu_layers=0, logits_all=True)
        llm.eval([1, 5, 9, 13])
        assert np.isfinite(np.array(llm.scores[:4])).all()
        llm.close()
    assert expert_bytes[7.0] > expert_bytes[4.5]
