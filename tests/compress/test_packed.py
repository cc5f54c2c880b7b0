"""Packed Hugging Face folders: the codes survive packing bit for bit, the loaded model computes
exactly what the fake-quantized fp32 model computes (on every family), it generates, and the
folder is as small as the bit count says."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimlm.compress.blocks import FORMATS, rtn
from slimlm.compress.packed import (
    bits_per_weight,
    for_width,
    int_format,
    int_rtn,
    pack_codes,
    packed_size,
    save_packed,
    ternary_format,
)
from slimlm.errors import SlimlmError
from slimlm.models.packed import unpack_codes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3_text", "phi3"]


@pytest.mark.parametrize("bits,levels", [(8, 256), (4, 16), (3, 8), (2, 4), (2, 3)])  # (2, 3): ternary
@pytest.mark.parametrize("cols", [64, 37, 1])
def test_pack_unpack_round_trip(bits, levels, cols):
    import torch

    q = np.random.default_rng(bits + cols).integers(0, levels, size=(5, cols)).astype(np.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, -(-cols * bits // 8) if bits != 3
                                                         else -(-cols // 4) - (-cols // 8))
    assert np.array_equal(unpack_codes(packed, bits, cols), q)
    assert torch.equal(unpack_codes(torch.from_numpy(packed), bits, cols), torch.from_numpy(q).int())
    if bits == 4 and cols == 64:  # the documented layout: code 2j in the low nibble of byte j
        assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)


def test_int_rtn_is_llama_cpp_rule_and_fits_gptq():
    from slimlm.compress.gptq import gptq_quantize

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for fmt, ref in [(int_format(4, 32, True), "Q4_0"), (int_format(4, 32, False), "Q4_1")]:
        q, d, m = int_rtn(fmt, w)
        rq, rd, rm = rtn(FORMATS[ref], w)
        assert np.array_equal(q, rq) and np.array_equal(d, rd) and (m is None) == (rm is None)
        # GPTQ takes the format as data: with H = I it returns round-to-nearest
        gq, gd, _ = gptq_quantize(fmt, w, np.eye(64))
        assert np.array_equal(gq, q) and np.allclose(gd, d)
    q, d, m = int_rtn(int_format(8, 0, False), w)  # 8-bit codes 0..255 need uint8
    assert q.dtype == np.uint8 and q.max() == 255 and q.min() == 0 and d.shape == (8, 1)
    gq = gptq_quantize(for_width(int_format(8, 0, False), 64), w, np.eye(64))[0]
    assert gq.dtype == np.uint8 and np.array_equal(gq, q)  # GPTQ returns codes 0..255 unsigned, unwrapped
    assert for_width(int_format(2, -1), 48).block_size == 48
    w = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)  # ternary: llama.cpp's TQ2_0 rule
    assert all(np.array_equal(a, b) for a, b in zip(int_rtn(ternary_format(256), w)[:2], rtn(FORMATS["TQ2_0"], w)))


def test_bits_per_weight():
    assert bits_per_weight(int_format(4, 32, True), 4096) == 4.5
    assert bits_per_weight(int_format(4, 32, False), 4096) == 5.0
    assert bits_per_weight(int_format(3, 128, True), 4096) == 3.125
    assert bits_per_weight(int_format(8, 0, True), 4096) == 8 + 16 / 4096
    assert bits_per_weight(ternary_format(256), 4096) == 2 + 16 / 256


def test_errors_name_the_fix(tiny_models, tmp_path):
    for bits in (5, 6, 7, 16):
        with pytest.raises(SlimlmError, match="bits 8, 4, 3, 2"):
            int_format(bits)
    w = np.ones((4, 64), np.float32)
    with pytest.raises(SlimlmError, match="not a multiple of the group size 48"):
        int_rtn(int_format(4, 48), w)
    folder = tiny_models("llama")
    name = "model.layers.0.mlp.down_proj.weight"  # 128 wide: group 48 does not divide it
    q = np.zeros((64, 128), np.uint8)
    with pytest.raises(SlimlmError, match="group size"):
        save_packed(folder, tmp_path / "bad", {name: (q, np.ones((64, 2)), None)}, int_format(4, 48))
    with pytest.raises(SlimlmError, match="codes must be integers 0..15"):
        save_packed(folder, tmp_path / "bad", {name: (q + 16, np.ones((64, 4)), None)}, int_format(4, 32))
    with pytest.raises(SlimlmError, match="mins"):
        save_packed(folder, tmp_path / "bad", {name: (q, np.ones((64, 4)), None)}, int_format(4, 32, False))
    assert not (tmp_path / "bad").exists()


def _choices(folder, fmt):
    from safetensors.numpy import load_file

    from slimlm.compress.quantize import quantizable

    tensors = load_file(folder / "model.safetensors")
    return tensors, {n: int_rtn(fmt, w) for n, w in tensors.items() if quantizable(n, w.shape)}


def _fake_quantized(folder, choices, zero):
    """The plain transformers model with every chosen weight replaced by d*(q-zero)+m (fp16 d, m)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fake = {}
    for name, (q, d, m) in choices.items():
        group = q.shape[1] // d.shape[1]
        w = np.repeat(d.astype(np.float16).astype(np.float32), group, 1) * (q.astype(np.float32) - zero)
        if m is not None:
            w = w + np.repeat(m.astype(np.float16).astype(np.float32), group, 1)
        fake[name] = torch.from_numpy(w)
    assert not model.load_state_dict(fake, strict=False).unexpected_keys
    return model


CASES = [(8, 0, True), (4, 32, True), (4, 16, False), (3, 32, False), (2, 64, True)]
# every case on llama; one per other family, rotating through the cases
MATRIX = [("llama", c) for c in CASES] + [(f, CASES[(i + 1) % len(CASES)]) for i, f in enumerate(FAMILIES[1:])]


@pytest.mark.parametrize("family,case", MATRIX, ids=[f"{f}-int{c[0]}g{c[1]}{'s' if c[2] else 'a'}"
                                                     for f, c in MATRIX])
def test_packed_model_computes_the_fake_quantized_model(family, case, tiny_models, tmp_path):
    import torch

    from slimlm.models.loading import load_torch
    from slimlm.models.packed import PackedLinear

    bits, group, symmetric = case
    fmt = int_format(bits, group, symmetric)
    folder = tiny_models(family)
    tensors, choices = _choices(folder, fmt)
    out = save_packed(folder, tmp_path / "packed", choices, fmt, {"method": "rtn"})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "slimlm" and qc["bits"] == bits and len(qc["modules"]) == len(choices)
    assert (out / "tokenizer.json").exists() and (out / "slimlm.json").exists()

    model, tokenizer = load_torch(str(out))
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len(choices)
    assert not set(choices) & set(model.state_dict())  # no dense copy of a quantized weight is kept
    reference = _fake_quantized(folder, choices, fmt.zero)
    ids = torch.randint(5, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    # on disk: the unquantized tensors as they were, the quantized ones at bits_per_weight
    kept = sum(w.nbytes for n, w in tensors.items() if n not in choices)
    expected = kept + sum(w.shape[0] * w.shape[1] * bits_per_weight(fmt, w.shape[1]) / 8
                          for n, w in tensors.items() if n in choices)
    assert expected <= packed_size(out) <= expected + 16_384  # + the safetensors header
    assert packed_size(out) < packed_size(folder)

    if family != "llama" or case == CASES[1]:
        with torch.no_grad():
            got = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
            want = reference.generate(ids[:1], max_new_tokens=5, do_sample=False)
        assert got.shape == (1, 17) and torch.equal(got, want)


def test_fp16_model_and_plain_transformers_load(tiny_models, tmp_path):
    """dtype=float16 dequantizes to fp16; plain from_pretrained only warns about "slimlm"."""
    import torch
    from transformers import AutoModelForCausalLM

    from slimlm.models.packed import load_packed

    folder = tiny_models("qwen2")  # q/k/v carry biases
    fmt = int_format(4, 32, True)
    _, choices = _choices(folder, fmt)
    out = save_packed(folder, tmp_path / "packed", choices, fmt)
    model = load_packed(out, dtype=torch.float16)
    assert model.dtype == torch.float16
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        half = model(ids).logits.float()
        full = load_packed(out)(ids).logits
    assert torch.allclose(half, full, atol=0.05 * full.abs().max().item())
    AutoModelForCausalLM.from_pretrained(out)  # does not choke on the unknown quant_method
    load_packed(out).save_pretrained(tmp_path / "again")  # a loaded model saves packed again
    with torch.no_grad():
        torch.testing.assert_close(load_packed(tmp_path / "again")(ids).logits, full)
    if torch.cuda.is_available():
        with torch.no_grad():
            cuda = load_packed(out, device="cuda")(ids.cuda()).logits.cpu()
        torch.testing.assert_close(cuda, full, rtol=1e-4, atol=1e-4)


def test_save_from_a_model_in_memory_with_tied_embeddings(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from slimlm.models.packed import load_packed

    folder = tiny_models("gemma2")  # tie_word_embeddings: lm_head is the embedding
    fmt = int_format(4, 0, False)
    _, choices = _choices(folder, fmt)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = save_packed(model, tmp_path / "packed", choices, fmt)
    loaded = load_packed(out)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, _fake_quantized(folder, choices, fmt.zero)(ids).logits,
                                   rtol=1e-5, atol=1e-5)
