"""Every seed family, as a tiny random model: load, generate, save/reload, info.

Each check compares slimlm with an independent computation: transformers' own greedy
`generate` for the decode loop and KV cache, the model's own parameters for `info`, and the
logits of the saved-and-reloaded model for round trips. Test names test_matrix_<capability>
feed the README compatibility matrix.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.models.backends import GenerationParams
from slimlm.models.backends.torch_backend import TorchBackend
from slimlm.models.families import FAMILIES
from slimlm.models.info import model_info
from slimlm.models.reference import resolve
from tests.conftest import CHATML

FAMILY_IDS = list(FAMILIES)
PROMPT = "Lists are mutable sequences, typically used to store collections of items."


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_matrix_load(family, tiny_models):
    backend = TorchBackend(resolve(tiny_models(family)), dtype="float32")
    assert backend.model.config.model_type == family
    assert backend.chat_template == CHATML  # the template the fixture wrote, read back through the backend


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_matrix_generate(family, tiny_models):
    """slimlm's decode loop (own KV-cache handling) gives transformers' greedy tokens exactly."""
    folder = tiny_models(family)
    backend = TorchBackend(resolve(folder), dtype="float32")
    ids = backend.tokenize(PROMPT)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    backend.stop_ids = set()  # compare the full 12 tokens, even if one is an end token
    text = backend.generate(PROMPT, GenerationParams(max_tokens=12), raw=True).text
    assert backend.last_timings.generated_tokens == 12
    assert text == backend.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_matrix_save_reload(family, tiny_models, tmp_path):
    folder = tiny_models(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32).eval()
    x = torch.arange(3, 40).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, again(x).logits)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_matrix_info(family, tiny_models):
    folder = tiny_models(family)
    info = model_info(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # Every stored tensor (parameters and persistent buffers such as DeepSeek's router bias),
    # tied weights once.
    unique = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    total = sum(unique.values())
    assert info.architecture == family
    assert info.params_total == total
    fam = FAMILIES[family]
    if fam.is_moe:
        cfg = model.config
        experts, used = getattr(cfg, fam.experts_key), getattr(cfg, fam.experts_used_key)
        routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or n.endswith(".experts"))
        assert routed > 0
        assert info.params_active == total - routed + routed * used // experts
        assert info.params_active < info.params_total
    else:
        assert info.params_active == info.params_total
    assert info.chat_template is True
    assert info.size_bytes > 0
