"""The model families slimlm supports, as data.

Each family is a transformers `model_type` with what slimlm needs to know about it: how it
names its MoE settings (for active-parameter counts), which llama.cpp architecture it maps to,
and a tiny random-weight config that tests (and users checking a pipeline end to end) build
without downloading anything. Adding a family is adding an entry here, never new code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Shared by every tiny config: 2 layers, width 64, 4 query heads over 2 KV heads (grouped).
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' config.model_type
    label: str  # what people call it
    examples: str  # released models of this family
    gguf_arch: str | None  # llama.cpp's general.architecture for it, None if llama.cpp lacks it
    tiny_config: dict = field(default_factory=dict)
    experts_key: str | None = None  # config key: routed experts per MoE layer
    experts_used_key: str | None = None  # config key: experts each token is routed to

    @property
    def is_moe(self) -> bool:
        return self.experts_key is not None


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("llama", "Llama", "Llama 3.2 1B/3B, SmolLM2, Yi", "llama", dict(_TINY)),
        Family("mistral", "Mistral", "Mistral 7B, Ministral 8B", "llama", dict(_TINY, sliding_window=64)),
        Family("mixtral", "Mixtral (MoE)", "Mixtral 8x7B", "llama",
               dict(_TINY, num_local_experts=4, num_experts_per_tok=2),
               experts_key="num_local_experts", experts_used_key="num_experts_per_tok"),
        Family("qwen2", "Qwen 2.5", "Qwen2.5 0.5B-14B", "qwen2", dict(_TINY)),
        Family("qwen2_moe", "Qwen MoE (shared experts)", "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B", "qwen2moe",
               dict(_TINY, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                    num_experts_per_tok=2),
               experts_key="num_experts", experts_used_key="num_experts_per_tok"),
        Family("phi3", "Phi-3/3.5/4", "Phi-3-mini, Phi-3.5-mini, Phi-4-mini", "phi3",
               dict(_TINY, pad_token_id=0)),
        Family("gemma2", "Gemma 2", "Gemma 2 2B/9B", "gemma2",
               dict(_TINY, head_dim=16, sliding_window=64, tie_word_embeddings=True)),
        Family("gemma3_text", "Gemma 3", "Gemma 3 270M/1B", "gemma3",
               dict(_TINY, head_dim=16, sliding_window=64, tie_word_embeddings=True,
                    layer_types=["sliding_attention", "full_attention"])),
        Family("deepseek_v3", "DeepSeek V3 (MoE, MLA)", "DeepSeek-V3, Moonlight", "deepseek2",
               dict(_TINY, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                    q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                    v_head_dim=16, head_dim=8, num_key_value_heads=4, rope_interleave=True),
               experts_key="n_routed_experts", experts_used_key="num_experts_per_tok"),
    ]
}


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A transformers config for a tiny random model of the family (no download)."""
    from transformers import AutoConfig

    fam = FAMILIES[model_type]
    kwargs = dict(fam.tiny_config, vocab_size=vocab_size, **overrides)
    return AutoConfig.for_model(model_type, **kwargs)
