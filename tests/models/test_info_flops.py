"""`info`'s FLOPs per token against torch's own count of one token's forward pass (FlopCounterMode
counts every matrix multiply torch runs): for a dense model, a tied-embedding one, and an MoE whose
eager forward runs only the experts the token is routed to."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from slimlm.models.info import model_info
from tests.conftest import build_tiny_model


def _counted(folder) -> int:
    kwargs = {"experts_implementation": "eager"}  # grouped_mm's kernel is invisible to the counter
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.tensor([[7]]), use_cache=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("mixtral", False)])
def test_flops_per_token_is_what_torch_counts(family, tied, tiny_tokenizer_dir, tmp_path):
    folder = build_tiny_model(family, tiny_tokenizer_dir, tmp_path / "m", tie_word_embeddings=tied)
    info = model_info(str(folder))
    cfg = AutoModelForCausalLM.from_pretrained(folder).config
    # what info leaves out: attention of the one token over itself, 2 x 2 x heads x head_dim a layer
    attention = 4 * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * cfg.num_hidden_layers
    assert abs(_counted(folder) - info.flops_per_token) <= attention
    if family == "mixtral":  # fewer FLOPs than its weights: only 2 of 4 experts run
        assert info.flops_per_token < 2 * (info.params_total - cfg.vocab_size * cfg.hidden_size)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_gguf_and_folder_agree(family, tiny_models, tmp_path):
    from slimlm.compress.gguf_export import export_gguf

    folder = tiny_models(family)
    path = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    hf, gguf = model_info(str(folder)), model_info(str(path))
    assert (gguf.params_active, gguf.flops_per_token) == (hf.params_active, hf.flops_per_token)
