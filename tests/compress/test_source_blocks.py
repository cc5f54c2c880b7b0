"""A GGUF parent's own blocks are kept where a typed file stores a weight in the parent's type:
checked byte for byte against the parent file and by llama.cpp's logits, which must be the
parent's exactly (a requantized Q4_K/Q6_K weight would move them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file

from slimlm.compress.quantize import quantize
from tests.conftest import build_tiny_model, llama_logits

IDS = [1, 7, 42, 99, 130, 5, 17, 250, 3, 64]


@pytest.fixture(scope="module")
def parent(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A 256-wide tiny llama quantized by llama.cpp's Q4_K_M rule (Q4_K, Q6_K and Q8_0 weights): a
    GGUF-only model such as the built-ins, whose dequantized weights are the reference."""
    folder = build_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("sb-dense"), seed=5,
                              hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    out = tmp_path_factory.mktemp("sb-parent") / "parent-q4_k_m.gguf"
    quantize(folder, out, format="gguf:Q4_K_M", record=False, check=False)
    return out


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in GGUFReader(path).tensors}


def _quantized(path) -> dict[str, tuple[str, bytes]]:
    return {n: v for n, v in _tensors(path).items() if v[0] not in ("F32", "F16")}


def test_every_parent_block_is_found_and_a_changed_weight_is_not(parent, tmp_path):
    from slimlm.compress.mixed_precision import gguf_names
    from slimlm.compress.quant_steps import tensor_shapes
    from slimlm.compress.source_blocks import source_blocks
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    folder = dense_folder(resolve(str(parent)))
    shapes = tensor_shapes(folder)
    names = gguf_names(folder, shapes)
    found = source_blocks(parent, folder, names, shapes)
    quantized = _quantized(parent)
    assert {names[n] for n in found} == set(quantized)
    assert {(b.type, b.data.tobytes()) for b in found.values()} == set(quantized.values())
    # with the types already chosen, only the tensors wanted in the parent's own type are checked and kept
    half = sorted(found)[::2]
    wanted = {n: (found[n].type if n in half else "Q8_0" if found[n].type != "Q8_0" else "Q6_K") for n in found}
    assert set(source_blocks(parent, folder, names, shapes, wanted=wanted)) == set(half)

    edited = tmp_path / "edited"  # the same folder with one weight moved off the parent's grid
    edited.mkdir()
    for f in folder.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    (file,) = edited.glob("*.safetensors")
    weights = load_file(file)
    victim = "model.layers.0.mlp.down_proj.weight"
    weights[victim] = weights[victim] + np.float32(1e-3)
    save_file(weights, file, metadata={"format": "pt"})
    assert set(source_blocks(parent, edited, names, shapes)) == set(found) - {victim}


def test_kquant_file_of_the_parents_type_is_the_parent(parent, tmp_path):
    """RTN and GPTQ both write the parent's own bytes for every weight whose type is the parent's;
    llama.cpp then computes the parent's logits exactly."""
    want = llama_logits(parent, IDS)
    for method in ("rtn", "gptq"):
        out = quantize(str(parent), tmp_path / f"{method}.gguf", format="gguf:Q4_K_M", method=method, record=False,
                       check=False, calib_samples=4, calib_seq_len=64)
        assert _quantized(out.out) == _quantized(parent), method
        assert any("kept as the GGUF parent stores them" in n for n in out.notes)
        np.testing.assert_array_equal(llama_logits(out.out, IDS), want)


def test_a_folder_converted_from_the_gguf_keeps_its_blocks_too(parent, tmp_path):
    """The converted folder's manifest names the GGUF it came from (what bench/quantize_curve.py
    and a user who ran `slimlm convert` quantize)."""
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    folder = dense_folder(resolve(str(parent)))
    out = quantize(folder, tmp_path / "from-folder.gguf", format="gguf:Q4_K_M", record=False, check=False)
    assert _quantized(out.out) == _quantized(parent)


def test_mixed_file_at_the_parents_size_keeps_the_parent(parent, tmp_path):
    """At the parent's size the allocation's cheapest choice in KL is the parent itself (kept blocks
    add none); a smaller budget requantizes some weights and so moves the logits."""
    budget = (parent.stat().st_size + 2**16) / 2**20  # room for slimlm's longer metadata
    same = quantize(str(parent), tmp_path / "same.gguf", format="gguf", target_size=budget, record=False,
                    check=False, calib_seq_len=64)
    assert _quantized(same.out) == _quantized(parent)
    np.testing.assert_array_equal(llama_logits(same.out, IDS), llama_logits(parent, IDS))

    small = quantize(str(parent), tmp_path / "small.gguf", format="gguf", target_size=0.8 * budget, record=False,
                     check=False, calib_seq_len=64)
    kept = {n for n, v in _quantized(small.out).items() if _quantized(parent).get(n) == v}
    assert 0 < len(kept) < len(_quantized(parent))
    meta = GGUFReader(small.out).fields["slimlm.tensor_types"]
    assert json.loads(bytes(meta.parts[meta.data[0]]).decode()) == small.tensor_types


def test_awq_rescales_every_weight_so_keeps_nothing(parent, tmp_path):
    out = quantize(str(parent), tmp_path / "awq.gguf", format="gguf:Q4_K_M", method="awq", record=False,
                   check=False, calib_samples=4, calib_seq_len=64)
    assert not any("kept as the GGUF parent" in n for n in out.notes)
    ours, theirs = _quantized(out.out), _quantized(parent)
    assert sum(ours[n] == theirs[n] for n in theirs) < len(theirs) // 2
