"""Export a Hugging Face model folder to one GGUF file that llama.cpp runs with no other file.

Written in-process with the `gguf` package's GGUFWriter and tensor-name maps rather than by
shelling out to llama.cpp's convert script: that script is not installed with llama-cpp-python,
pulls its own dependencies, and cannot hand a single tensor to slimlm's quantizers. Here every
tensor passes through `tensor_writer`, so a quantizer can supply its own packed bytes.

What differs between families is data (`ARCHS`), not code: llama.cpp's architecture name and
the few places where llama.cpp's kernels expect weights laid out differently from transformers
(Llama's rotary row order, Gemma's "1 + weight" norms, Gemma's query scale).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from slimlm.compress.gguf_vocab import add_vocab, clean_name, load_tokenizer
from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class ArchSpec:
    arch: str  # llama.cpp's general.architecture
    rope_permute: bool = False  # llama.cpp rotates interleaved pairs; HF Llama rotates halves: reorder q/k rows
    norm_offset: float = 0.0  # HF norm computes x * (1 + w); llama.cpp computes x * w
    fold_query_scale: str | None = None  # weight that absorbs query_pre_attn_scalar (llama.cpp hard-codes the scale)
    big_model_layers: int | None = None  # layer count llama.cpp treats as the 27B (scale by n_embd/n_head)
    swa: str = "ignored"  # "layers": llama.cpp honours window + per-layer pattern; "ignored": it attends fully
    mla: bool = False  # DeepSeek's multi-head latent attention (low-rank q and kv, a rope part per head)


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", rope_permute=True),
    "mistral": ArchSpec("llama", rope_permute=True),
    "mixtral": ArchSpec("llama", rope_permute=True),  # llama.cpp's llama with ffn_*_exps expert tensors
    "qwen2": ArchSpec("qwen2"),
    "qwen2_moe": ArchSpec("qwen2moe"),  # routed experts stacked as Mixtral's, plus the shared expert and its gate
    "gemma2": ArchSpec("gemma2", norm_offset=1.0, fold_query_scale="self_attn.q_proj.weight",
                       big_model_layers=46, swa="layers"),
    "gemma3_text": ArchSpec("gemma3", norm_offset=1.0, fold_query_scale="self_attn.q_norm.weight",
                            big_model_layers=62, swa="layers"),
    "phi3": ArchSpec("phi3"),
    # llama.cpp's deepseek2: MLA with kv_b_proj written whole (its pre-split layout, still loaded),
    # sigmoid routing with the score-correction bias, shared experts, leading dense layers
    "deepseek_v3": ArchSpec("deepseek2", mla=True),
}
DTYPES = ("f32", "f16", "bf16")
TensorWriter = Callable[[str, str, np.ndarray], "tuple[np.ndarray, object] | None"]
_SKIP = ("rotary_emb.inv_freq", "self_attn.rotary_emb")


def supported() -> str:
    return ", ".join(ARCHS)


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SlimlmError(f"cannot read {folder / 'config.json'}: {exc}") from exc


def spec_for(config: dict) -> ArchSpec:
    model_type = config.get("model_type", "unknown")
    if model_type not in ARCHS:
        raise SlimlmError(f"GGUF export does not support model_type {model_type!r}; supported: {supported()}")
    return ARCHS[model_type]


def _rope(config: dict) -> tuple[dict, dict | None]:
    """(rope parameters of full-attention layers, of sliding layers or None), old or new config style."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    merged = dict(params)
    merged.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return merged, None


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def query_scale_fold(config: dict, spec: ArchSpec) -> float:
    """Factor to multiply queries by so llama.cpp's fixed attention scale equals transformers' one."""
    if spec.fold_query_scale is None:
        return 1.0
    hf_scale = config.get("query_pre_attn_scalar", head_dim(config)) ** -0.5
    if config["num_hidden_layers"] == spec.big_model_layers:
        llama_scale = (config["hidden_size"] / config["num_attention_heads"]) ** -0.5
    else:
        llama_scale = head_dim(config) ** -0.5
    return hf_scale / llama_scale


def _llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for Llama 3.1+'s "llama3" rope scaling."""
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _add_hparams(writer, config: dict, spec: ArchSpec, dtype: str,
                 file_type: str | None = None) -> dict[str, np.ndarray]:
    """Write the architecture keys; returns extra tensors llama.cpp needs (rope factors)."""
    import gguf

    n_head = config["num_attention_heads"]
    hd = head_dim(config)
    if spec.mla:  # per head: a key of nope + rope parts, a value of its own width; no grouped kv
        key_len, value_len = config["qk_nope_head_dim"] + config["qk_rope_head_dim"], config["v_head_dim"]
        n_kv, rope_dims = n_head, config["qk_rope_head_dim"]
    else:
        key_len = value_len = hd
        n_kv = config.get("num_key_value_heads") or n_head
    if file_type:  # a quantizer names the block type most tensors are in (e.g. "Q4_0")
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{file_type.upper()}"])
    else:
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(key_len)
    writer.add_value_length(value_len)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    if expert_count(config):  # Mixtral: intermediate_size above is one expert's
        writer.add_expert_count(expert_count(config))
        writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("moe_intermediate_size"):  # Qwen-MoE: the routed and the shared experts' widths
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    if spec.mla:
        _add_deepseek(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    rope, rope_swa = _rope(config)
    if not spec.mla:
        rope_dims = int(hd * rope.get("partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope_swa is not None:
        writer.add_rope_freq_base_swa(rope_swa["rope_theta"])
    extra: dict[str, np.ndarray] = {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "llama3" and spec.arch == "llama":
        extra["rope_freqs.weight"] = _llama3_rope_factors(rope, hd)
    elif kind == "yarn" and spec.mla:
        _add_yarn(writer, rope)
    elif kind != "default":
        raise SlimlmError(f"GGUF export does not support rope scaling {kind!r} for {config['model_type']}")
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if config.get(key):
            add(config[key])
    window = sliding_window(config)
    if spec.swa == "layers" and window:
        writer.add_sliding_window(window)
        layer_types = config.get("layer_types") or ["sliding_attention"] * config["num_hidden_layers"]
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    elif window:
        warnings.warn(f"llama.cpp's {spec.arch} ignores {config['model_type']}'s sliding window of {window} tokens: "
                      "outputs past that many tokens of context will differ from transformers", stacklevel=3)
    return extra


def _add_deepseek(writer, config: dict) -> None:
    """DeepSeek V3's attention ranks and routing, as llama.cpp's deepseek2 reads them."""
    import gguf

    if (config.get("n_group") or 1) > 1 and (config.get("topk_group") or 1) < config["n_group"]:
        raise SlimlmError("GGUF export does not support DeepSeek's group-limited routing (n_group > topk_group): "
                          "llama.cpp's deepseek2 routes over all experts")
    writer.add_q_lora_rank(config.get("q_lora_rank") or 0)  # 0: a full q_proj (llama.cpp reads the key anyway)
    writer.add_kv_lora_rank(config["kv_lora_rank"])
    writer.add_leading_dense_block_count(config.get("first_k_dense_replace", 0))
    writer.add_expert_shared_count(config.get("n_shared_experts") or 0)
    writer.add_expert_weights_scale(float(config.get("routed_scaling_factor", 1.0)))
    writer.add_expert_weights_norm(bool(config.get("norm_topk_prob", False)))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _add_yarn(writer, rope: dict) -> None:
    """DeepSeek's YaRN: the frequency ramp llama.cpp computes from factor, original context and
    beta bounds, and the attention scale transformers takes from mscale_all_dim, which llama.cpp's
    deepseek2 reads as the YaRN log multiplier (stored times 0.1, as its loader expects)."""
    import gguf

    if rope.get("mscale", 1.0) != rope.get("mscale_all_dim", rope.get("mscale", 1.0)):
        # transformers then scales cos/sin by their ratio; llama.cpp's deepseek2 gave other logits (measured)
        raise SlimlmError("GGUF export supports DeepSeek's YaRN only with mscale equal to mscale_all_dim (as "
                          f"DeepSeek V3 sets them); this config has {rope.get('mscale')} and {rope.get('mscale_all_dim')}")
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                     ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
        if rope.get(key) is not None:
            add(float(rope[key]))
    if rope.get("mscale_all_dim"):
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def sliding_window(config: dict) -> int | None:
    """The attention window the transformers model really uses (Qwen 2 keeps one it switches off)."""
    if not config.get("use_sliding_window", True):
        return None
    window = config.get("sliding_window")
    return window if window and window < config["max_position_embeddings"] else None


def _weights(folder: Path):
    """Yield (name, torch tensor) from the folder's safetensors files, one tensor at a time."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"{folder} has no .safetensors weights: re-save the model with save_pretrained")
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.((?:w[123]|gate_proj|up_proj|down_proj)\.weight)$")


def expert_count(config: dict) -> int:
    """Routed experts per layer (Mixtral's, Qwen-MoE's and DeepSeek's keys), 0 for a dense model."""
    return config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0


def expert_names(stacked: str, n_experts: int) -> list[str] | None:
    """The checkpoint names of the experts a stacked `...experts.KIND.weight` tensor holds (in order),
    or None for any other name: what a quantizer looks up per expert."""
    head, dot, kind = stacked.rpartition(".experts.")
    if not dot or "." not in kind or not n_experts:
        return None
    return [f"{head}.experts.{e}.{kind}" for e in range(n_experts)]


def stacked_name(expert: str) -> str | None:
    """The stacked tensor (`...experts.w1.weight`) a checkpoint expert (`...experts.3.w1.weight`)
    is written into, or None for any other name."""
    match = _EXPERT.match(expert)
    return f"{match.group(1)}.{match.group(3)}" if match else None


def _stack_experts(weights, n_experts: int):
    """Mixtral and Qwen-MoE checkpoints store each expert's projections apart; llama.cpp wants one
    [E, ...] tensor per kind and layer (`...experts.w1.weight`, `...experts.gate_proj.weight`, which
    gguf's name map knows). Yields every other
    tensor as it is and each stack once its last expert has been read."""
    import torch

    pending: dict[tuple[str, str], dict[int, object]] = {}
    for name, tensor in weights:
        match = _EXPERT.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, index, kind = match.groups()
        got = pending.setdefault((prefix, kind), {})
        got[int(index)] = tensor
        if len(got) == n_experts:
            yield f"{prefix}.{kind}", torch.stack([got[i] for i in range(n_experts)])
            del pending[(prefix, kind)]
    if pending:
        raise SlimlmError(f"incomplete experts in the checkpoint: {sorted(pending)[:2]}")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates (first half, second half) of each head; llama.cpp's llama rope rotates adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transform(name: str, w: np.ndarray, config: dict, spec: ArchSpec, q_fold: float) -> np.ndarray:
    if spec.norm_offset and name.endswith("norm.weight"):
        w = w + np.float32(spec.norm_offset)
    if spec.fold_query_scale and name.endswith(spec.fold_query_scale) and q_fold != 1.0:
        w = w * np.float32(q_fold)
    if spec.rope_permute and name.endswith("self_attn.q_proj.weight"):
        w = permute_rows(w, config["num_attention_heads"])
    elif spec.rope_permute and name.endswith("self_attn.k_proj.weight"):
        w = permute_rows(w, config.get("num_key_value_heads") or config["num_attention_heads"])
    return w


def layout_transform(model: str | Path):
    """`fn(name_hf, w) -> w` mapping a float32 tensor to llama.cpp's layout, as export_gguf writes it
    (what a `tensor_writer` sees). For quantizers that choose codes before the file is written."""
    config = read_config(_folder(model))
    spec = spec_for(config)
    q_fold = query_scale_fold(config, spec)
    return lambda name, w: _transform(name, w, config, spec, q_fold)


def _encode(w: np.ndarray, dtype: str):
    """(data, raw GGML type or None) for a float32 tensor; norms and biases stay f32 as in llama.cpp."""
    import gguf

    if dtype == "f32" or w.ndim < 2:
        return w.astype(np.float32), None
    if dtype == "f16":
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def export_gguf(model: str | Path, out: Path, dtype: str = "f16", force: bool = False,
                tensor_writer: TensorWriter | None = None, file_type: str | None = None,
                metadata: dict[str, str] | None = None) -> Path:
    """Write `model` (a Hugging Face folder or model reference) to the GGUF file `out`.

    `tensor_writer(name_hf, name_gguf, tensor)` sees each tensor as float32, already in llama.cpp's
    layout; it returns (data, GGMLQuantizationType) to write its own bytes, or None for `dtype`.
    `metadata` adds string keys (e.g. slimlm.tensor_types) to the file's key-value section.
    """
    import gguf

    folder = _folder(model)
    out = Path(out)
    if dtype not in DTYPES:
        raise SlimlmError(f"unsupported GGUF dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    config = read_config(folder)
    spec = spec_for(config)
    tokenizer = load_tokenizer(folder)
    tie = config.get("tie_word_embeddings", True)  # transformers' default when the key is absent
    q_fold = query_scale_fold(config, spec)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.arch.upper()], config["num_hidden_layers"])

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, spec.arch, use_temp_file=True)
    try:
        extra = _add_hparams(writer, config, spec, dtype, file_type)
        tokens = add_vocab(writer, folder, tokenizer, config["vocab_size"])
        writer.add_name(clean_name(folder.name, tokens))
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        seen = set()
        for name, tensor in _stack_experts(_weights(folder), expert_count(config)):
            if any(s in name for s in _SKIP) or (tie and name == "lm_head.weight"):
                continue
            lookup = name  # DeepSeek's routing bias, under the name gguf's map knows it by
            if name.endswith(".e_score_correction_bias"):
                lookup = name[: -len("_bias")] + ".bias"
            gguf_name = names.get_name(lookup, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise SlimlmError(f"{folder.name}: tensor {name} has no GGUF name for {spec.arch}; "
                                  "this checkpoint layout is not supported")
            w = _transform(name, tensor.float().numpy(), config, spec, q_fold)
            custom = tensor_writer(name, gguf_name, w) if tensor_writer else None
            data, raw = custom if custom is not None else _encode(w, dtype)
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
            seen.add(gguf_name)
        for gguf_name, w in extra.items():
            writer.add_tensor(gguf_name, w)
        if "output.weight" not in seen and not tie:
            raise SlimlmError(f"{folder.name}: no lm_head.weight although tie_word_embeddings is false")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def _folder(model: str | Path) -> Path:
    """A Hugging Face folder from a path or a slimlm model reference (GGUF is already GGUF)."""
    path = Path(model)
    if path.is_dir():
        return path
    from slimlm.models.reference import resolve

    ref = resolve(model)
    if ref.kind != "hf":
        raise SlimlmError(f"{ref.spec} is already a GGUF file: export takes a Hugging Face folder")
    return ref.path
