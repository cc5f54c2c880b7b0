"""GGUF -> dense Hugging Face folder, checked against the GGUF loaded by transformers itself."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.errors import SlimlmError
from slimlm.models.loading import convert
from slimlm.runs import lineage, read_manifest

pytestmark = pytest.mark.real_model


def test_converted_folder_gives_the_gguf_logits(smollm2_gguf, smollm2_dense):
    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dense, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dense)
    ids = tok("The Python tutorial introduces the reader informally to the language.", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_converted_folder_is_complete(smollm2_dense):
    names = {p.name for p in smollm2_dense.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "slimlm.json"} <= names
    tok = AutoTokenizer.from_pretrained(smollm2_dense)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    config = json.loads((smollm2_dense / "config.json").read_text())
    assert "quantization_config" not in config  # a plain dense model, loadable anywhere
    manifest = read_manifest(smollm2_dense)
    assert manifest["operation"] == "convert" and manifest["parent"]["kind"] == "gguf"
    assert "torch" in manifest["versions"]
    chain = lineage(smollm2_dense)
    assert [step["operation"] for step in chain] == ["convert", "source"]


def test_existing_output_is_refused_and_kept(smollm2_gguf, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SlimlmError, match="--force"):
        convert(smollm2_gguf, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_conversion_leaves_nothing(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[:30_000_000])
    with pytest.raises(SlimlmError):
        convert(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cut.gguf"]
