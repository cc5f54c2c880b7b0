"""Pre-packed oneDNN linear layers (models/backends/onednn.py) and the plan that picks them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.models.backends import onednn
from slimlm.models.backends.precision import PrecisionPlan, _onednn_dtypes

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")


def _direct(x, layer):
    """x W^T + b in float64: the independent answer."""
    return x.double() @ layer.weight.double().T + layer.bias.double()


@needs_onednn
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 7])
def test_packed_linear_equals_the_formula(dtype, tol, rows):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160).to(dtype)
    x = torch.randn(2, rows, 96).to(dtype)
    with torch.no_grad():
        plain = layer(x)
        onednn.pack_linears(layer)
        packed = layer(x)
    assert type(layer) is onednn.OneDnnLinear and isinstance(layer, nn.Linear)
    expected = _direct(x, layer)
    scale = expected.abs().max()
    assert packed.dtype == dtype and packed.shape == plain.shape
    assert (packed.double() - expected).abs().max() / scale < tol
    assert (packed.double() - plain.double()).abs().max() / scale < tol


@needs_onednn
def test_a_weight_changed_in_place_is_repacked():
    layer = nn.Linear(32, 48)
    onednn.pack_linears(layer)
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # what merging an adapter does
        after = layer(x)
    assert torch.allclose(after - layer.bias, 2 * (before - layer.bias), atol=1e-5)
    assert torch.allclose(after, _direct(x, layer).float(), atol=1e-4)


@needs_onednn
def test_training_takes_the_plain_path_with_gradients():
    layer = nn.Linear(16, 8)
    onednn.pack_linears(layer)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()  # the packed op has no backward; this must not use it
    assert torch.allclose(layer.weight.grad, x.detach().sum(0).expand(8, 16), atol=1e-5)
    assert torch.allclose(x.grad, layer.weight.detach().sum(0).expand(4, 16), atol=1e-5)


@needs_onednn
def test_packing_a_model_keeps_ties_state_and_logits(tiny_models):
    from transformers import AutoModelForCausalLM

    path = tiny_models("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    keys = set(model.state_dict())
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.inference_mode():
        reference = model(ids).logits
        packed = onednn.pack_linears(model)
        logits = model(ids).logits
    linears = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    assert packed == linears > 0
    assert set(model.state_dict()) == keys
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert torch.allclose(logits, reference, atol=1e-4, rtol=1e-4)


def test_the_plan_packs_a_dtype_only_where_onednn_was_measured_faster():
    bf16, fp32 = torch.bfloat16, torch.float32

    def probe(name, matvec_gain, matmul_gain):
        return {f"matvec_{name}": matvec_gain, f"matvec_{name}_onednn": 1.0,
                f"matmul_{name}": matmul_gain, f"matmul_{name}_onednn": 1.0}

    split = PrecisionPlan(fp32, bf16, "test")
    same = PrecisionPlan(bf16, bf16, "test")
    # decode in bf16 gains 2.5x, prefill in fp32 gains nothing: pack bf16 only
    assert _onednn_dtypes(split, {**probe("bfloat16", 2.5, 1.0), **probe("float32", 1.0, 1.0)}) == (bf16,)
    # fp32 used for prefill: its matmul gain counts, its matvec gain does not
    assert _onednn_dtypes(split, {**probe("bfloat16", 1.0, 1.0), **probe("float32", 3.0, 1.0)}) == ()
    assert _onednn_dtypes(split, {**probe("bfloat16", 1.0, 1.0), **probe("float32", 1.0, 2.0)}) == (fp32,)
    # a dtype used for both needs a clear gain in one and no real loss in the other
    assert _onednn_dtypes(same, probe("bfloat16", 2.5, 1.08)) == (bf16,)
    assert _onednn_dtypes(same, probe("bfloat16", 2.5, 0.8)) == ()
    # no oneDNN timings (torch without it): nothing packed
    assert _onednn_dtypes(same, {"matvec_bfloat16": 1.0, "matmul_bfloat16": 1.0}) == ()
