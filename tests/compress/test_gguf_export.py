"""GGUF export: llama.cpp must load the file alone and compute what transformers computes.

Each family's tiny random model is exported and evaluated by llama.cpp on the same token ids as
the torch model; the logits must agree. Metadata and tensor names are read back with GGUFReader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from slimlm.compress.gguf_export import ARCHS, export_gguf
from slimlm.errors import SlimlmError
from tests.conftest import llama_logits

FAMILIES = list(ARCHS)
pytestmark = pytest.mark.filterwarnings("ignore:llama.cpp.s llama ignores:UserWarning")
IDS = [1, 40, 77, 120, 200, 33, 91, 250, 300, 17, 5, 64, 3, 150, 299, 8]


def _torch_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _fields(path: Path) -> tuple[dict, list[str]]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, [t.name for t in reader.tensors]


@pytest.fixture(scope="module")
def torch_logits(tiny_models):
    cache: dict[str, np.ndarray] = {}

    def get(family: str) -> np.ndarray:
        if family not in cache:
            cache[family] = _torch_logits(tiny_models(family), IDS)
        return cache[family]

    return get


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_gguf_export(family, tiny_models, torch_logits, tmp_path):
    out = export_gguf(tiny_models(family), tmp_path / "m.gguf", dtype="f32")
    ref, got = torch_logits(family), llama_logits(out, IDS)
    assert got.shape == ref.shape
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 1e-3 * max(scale, 1.0), (family, np.abs(got - ref).max(), scale)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_agrees(family, dtype, tiny_models, torch_logits, tmp_path):
    out = export_gguf(tiny_models(family), tmp_path / "m.gguf", dtype=dtype)
    ref, got = torch_logits(family), llama_logits(out, IDS)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_and_tensor_names(family, tiny_models, tmp_path):
    import gguf

    folder = tiny_models(family)
    config = json.loads((folder / "config.json").read_text())
    spec = ARCHS[family]
    out = export_gguf(folder, tmp_path / "m.gguf", dtype="f16")
    fields, names = _fields(out)
    arch = spec.arch
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert fields[f"{arch}.embedding_length"] == config["hidden_size"]
    assert fields[f"{arch}.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert fields["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    valid = {name_map.get_name(n) for n in name_map.mapping} | {"rope_freqs"}
    assert all(n.rsplit(".", 1)[0] in valid for n in names), names
    assert "token_embd.weight" in names and "blk.1.attn_norm.weight" in names


def test_table_agrees_with_families():
    from slimlm.models.families import FAMILIES as KNOWN

    for model_type, spec in ARCHS.items():
        assert KNOWN[model_type].gguf_arch == spec.arch


@pytest.mark.llamacpp
def test_tensor_writer_hook_supplies_bytes(tiny_models, torch_logits, tmp_path):
    """A quantizer's hook gets float32 tensors in llama.cpp layout and its bytes are what llama.cpp runs."""
    from gguf import GGMLQuantizationType, quants

    seen = []

    def q8(name_hf, name_gguf, tensor):
        seen.append((name_hf, name_gguf))
        if tensor.ndim == 2 and tensor.shape[1] % 32 == 0:
            return quants.quantize(tensor, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
        return None

    out = export_gguf(tiny_models("llama"), tmp_path / "q8.gguf", dtype="f32", tensor_writer=q8)
    assert ("model.embed_tokens.weight", "token_embd.weight") in seen
    from gguf import GGUFReader

    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    got, ref = llama_logits(out, IDS), torch_logits("llama")
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_unsupported_architecture_is_refused_early(tiny_models, tmp_path):
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_models("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimlmError, match="supported: llama, mistral, mixtral, qwen2"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert list(tmp_path.glob(".x.gguf.tmp-*")) == []


def test_existing_output_needs_force(tiny_models, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(SlimlmError, match="already exists"):
        export_gguf(tiny_models("llama"), out, dtype="f32")
    assert out.read_bytes() == b"keep me"
    export_gguf(tiny_models("llama"), out, dtype="f32", force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_unsupported_dtype(tiny_models, tmp_path):
    with pytest.raises(SlimlmError, match="f32, f16, bf16"):
        export_gguf(tiny_models("llama"), tmp_path / "m.gguf", dtype="q4_k")


def test_failed_export_leaves_nothing(tiny_models, tmp_path):
    def boom(name_hf, name_gguf, tensor):
        raise RuntimeError("quantizer failed")

    with pytest.raises(RuntimeError):
        export_gguf(tiny_models("llama"), tmp_path / "m.gguf", tensor_writer=boom)
    assert list(tmp_path.iterdir()) == []


def test_non_byte_level_tokenizer_is_refused(tiny_models, tmp_path):
    """A SentencePiece-style (Metaspace) BPE would be written wrongly as "gpt2": refuse it."""
    folder = tmp_path / "spm"
    shutil.copytree(tiny_models("llama"), folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    tok["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(SlimlmError, match="byte-level BPE"):
        export_gguf(folder, tmp_path / "x.gguf")


def test_broken_tokenizer_is_a_clear_error(tiny_models, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_models("llama"), folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(SlimlmError, match="cannot load the tokenizer"):
        export_gguf(folder, tmp_path / "x.gguf")


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_smollm2_f16_generates_like_torch(smollm2_dense, tmp_path):
    """The built-in SmolLM2, round-tripped GGUF -> HF folder -> our GGUF, still answers like torch."""
    import llama_cpp  # required: fails, never skips, when missing
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = export_gguf(smollm2_dense, tmp_path / "smollm2-f16.gguf", dtype="f16")
    tok = AutoTokenizer.from_pretrained(smollm2_dense)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dense, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=512, verbose=False, n_gpu_layers=0)
    try:
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == 16 or token == llm.token_eos():
                break
        assert len(got) >= 5 and got == ref[: len(got)], (tok.decode(got), tok.decode(ref))
        # Next-token choices on a plain text, teacher-forced, agree position by position.
        text = "The quick brown fox jumps over the lazy dog because it wanted to see the river."
        text_ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False) == text_ids
        llm.reset()
        llm.eval(text_ids)
        gguf_next = np.array(llm.scores[: len(text_ids)]).argmax(-1)
        with torch.no_grad():
            torch_next = model(torch.tensor([text_ids])).logits[0].argmax(-1).numpy()
        assert (gguf_next == torch_next).mean() >= 0.9
    finally:
        llm.close()
    from gguf import GGUFReader

    fields = {k: f.contents() for k, f in GGUFReader(out).fields.items() if not k.startswith("tokenizer.ggml.t")}
    assert fields["llama.block_count"] == 30 and "tokenizer.chat_template" in fields


def test_ignored_sliding_window_warns(tiny_models, tmp_path):
    """llama.cpp's llama architecture has no sliding window: Mistral's is dropped, loudly."""
    with pytest.warns(UserWarning, match="sliding window of 64 tokens"):
        export_gguf(tiny_models("mistral"), tmp_path / "mistral.gguf", dtype="f32")
    fields, _ = _fields(export_gguf(tiny_models("gemma2"), tmp_path / "gemma2.gguf", dtype="f32"))
    assert fields["gemma2.attention.sliding_window"] == 64
    assert list(fields["gemma2.attention.sliding_window_pattern"]) == [True, False]


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_sliding_window_honoured_past_the_window(family, tiny_models, tmp_path):
    """Beyond 64 tokens the sliding layers must forget what the full layers still see."""
    ids = [int(x) for x in np.random.default_rng(0).integers(5, 380, 100)]
    out = export_gguf(tiny_models(family), tmp_path / "m.gguf", dtype="f32")
    ref, got = _torch_logits(tiny_models(family), ids), llama_logits(out, ids, n_ctx=128)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_tokenizes_like_transformers(family, tiny_models, tmp_path):
    """Vocabulary, merges, special tokens and template are enough for llama.cpp on its own."""
    import llama_cpp  # required: fails, never skips, when missing
    from transformers import AutoTokenizer
    folder = tiny_models(family)
    out = export_gguf(folder, tmp_path / "m.gguf", dtype="f16")
    tok = AutoTokenizer.from_pretrained(folder)
    text = "def f(x):\n    return x + 1  # the  value, 12345 times!"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True, tokenize=False)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, n_gpu_layers=0, vocab_only=True)
    try:
        assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok(chat, add_special_tokens=False)["input_ids"]
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        assert llm.token_eos() == tok.eos_token_id and llm.token_bos() == tok.bos_token_id
    finally:
        llm.close()


def _spm_style_folder(tiny_models, tmp_path) -> Path:
    """A tiny Gemma 3 whose tokenizer is Gemma's kind: BPE with byte fallback and "\u2581" spaces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import _corpus

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials + byte_tokens)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")
    folder = tmp_path / "spm-gemma3"
    shutil.copytree(tiny_models("gemma3_text"), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    fast.save_pretrained(folder)
    return folder


@pytest.mark.llamacpp
def test_sentencepiece_style_vocab_tokenizes_like_transformers(tiny_models, tmp_path):
    """Byte-fallback BPE is written as llama.cpp's "llama" tokenizer: same ids, bytes included."""
    import llama_cpp  # required: fails, never skips, when missing
    from transformers import AutoTokenizer
    folder = _spm_style_folder(tiny_models, tmp_path)
    out = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    fields, _ = _fields(out)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    tok = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, n_gpu_layers=0, vocab_only=True)
    try:
        for text in ["def f(x):\n    return x + 1  # the  value", "Unicode falls back to bytes: \u00fc \u4f60\u597d \U0001f642",
                     "  leading spaces and trailing ones  "]:
            assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False)["input_ids"], text
    finally:
        llm.close()


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_gemma3_round_trip_tokenizes_and_predicts_like_torch(tmp_path):
    """The built-in Gemma 3 270M, GGUF -> HF folder -> our GGUF: the original file's token ids and
    torch's next-token choices."""
    import llama_cpp  # required: fails, never skips, when missing
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.models.loading import convert
    from slimlm.models.reference import resolve
    original = resolve("gemma3-270m").path
    dense = convert(original, tmp_path / "dense")
    out = export_gguf(dense, tmp_path / "gemma3-f16.gguf", dtype="f16")
    tok = AutoTokenizer.from_pretrained(dense)
    text = "The Python tutorial:  def f(x):\n\treturn x ** 2  # \u00fcnic\u00f6de \u4f60\u597d"
    source = llama_cpp.Llama(model_path=str(original), vocab_only=True, verbose=False)
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=128, verbose=False, n_gpu_layers=0)
    try:
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode()) == ids == source.tokenize(text.encode())
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)]).argmax(-1)
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
        assert (got == ref).mean() >= 0.9
    finally:
        llm.close()
        source.close()


@pytest.mark.llamacpp
def test_deepseek_routing_bias_reaches_llama_cpp(tiny_models, tmp_path):
    """DeepSeek V3 chooses experts by sigmoid score plus a per-expert correction bias and weighs
    them without it. With a bias that moves transformers' logits, llama.cpp's logits from slimlm's
    file still equal transformers' (the bias is written as exp_probs_b, gating as sigmoid)."""
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_models("deepseek_v3")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    biased = tmp_path / "biased"
    with torch.no_grad():
        before = model(torch.tensor([IDS])).logits[0].numpy()
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                n = gate.e_score_correction_bias.numel()
                gate.e_score_correction_bias.copy_(torch.linspace(-0.6, 0.6, n))
        after = model(torch.tensor([IDS])).logits[0].numpy()
    model.save_pretrained(biased)
    for f in src.iterdir():
        if f.is_file() and not (biased / f.name).exists():  # the tokenizer files
            shutil.copy(f, biased / f.name)
    assert np.abs(after - before).max() > 0.1  # the bias changes which experts run
    fields, names = _fields(export_gguf(biased, tmp_path / "m.gguf", dtype="f32"))
    assert "blk.1.exp_probs_b.bias" in names
    got = llama_logits(tmp_path / "m.gguf", IDS)
    assert np.abs(got - after).max() < 1e-3 * max(np.abs(after).max(), 1.0)


@pytest.mark.parametrize("change,message", [
    ({"n_group": 2, "topk_group": 1}, "group-limited"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                          "mscale": 1.0, "mscale_all_dim": 0.707, "rope_theta": 10000.0}}, "mscale")],
    ids=["groups", "mscale"])
def test_deepseek_layouts_llama_cpp_computes_otherwise_are_refused(tiny_models, tmp_path, change, message):
    """Group-limited routing (llama.cpp's deepseek2 routes over all experts) and YaRN with mscale
    unequal to mscale_all_dim (llama.cpp's logits then differed by 4-6.5): one clear error, no file."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_models("deepseek_v3"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change, "rope_scaling": change.get("rope_parameters")}))
    with pytest.raises(SlimlmError, match=message):
        export_gguf(folder, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists() and not list(tmp_path.glob(".g.gguf*"))


@pytest.mark.llamacpp
@pytest.mark.parametrize("factor,mscale", [(4.0, 1.0), (40.0, 0.707)])
def test_deepseek_yarn_matches_transformers_past_the_original_context(tiny_models, tmp_path, factor, mscale):
    """DeepSeek V3's YaRN (as its real configs set it: factor 40, beta 32/1, mscale_all_dim):
    llama.cpp's logits from slimlm's file equal transformers' on 96 tokens, 64 of them past the
    original context of 32, where the scaling moves transformers' logits."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "yarn"
    shutil.copytree(tiny_models("deepseek_v3"), folder)
    config = json.loads((folder / "config.json").read_text())
    rope = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 32, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": rope, "rope_parameters": rope,
                                                    "max_position_embeddings": 128}))
    ids = IDS * 6

    def logits(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    ref, plain = logits(folder), logits(tiny_models("deepseek_v3"))
    assert np.abs(ref - plain).max() > 0.1  # the scaling matters here
    got = llama_logits(export_gguf(folder, tmp_path / "m.gguf", dtype="f32"), ids, n_ctx=128)
    assert np.abs(got - ref).max() < 1e-3 * max(np.abs(ref).max(), 1.0)
