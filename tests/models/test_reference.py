"""Model references: built-ins, folders, GGUF files, and the errors for everything else."""

from __future__ import annotations

import shutil

import pytest

from slimlm.errors import ModelNotFound, SlimlmError
from slimlm.models.loading import check_gguf
from slimlm.models.reference import BUILTINS, is_gguf, resolve


def test_builtin_smollm2_is_a_real_gguf():
    ref = resolve("smollm2-135m-instruct")
    assert ref.kind == "gguf" and ref.builtin == "smollm2-135m-instruct"
    assert is_gguf(ref.path) and ref.path.stat().st_size > 50_000_000


@pytest.mark.real_model
def test_builtin_gemma3_is_assembled_once_with_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE_DIR", str(tmp_path))
    ref = resolve("gemma3-270m")
    assert ref.path.parent == tmp_path / "models" and is_gguf(ref.path)
    mtime = ref.path.stat().st_mtime_ns
    assert resolve("gemma3-270m").path.stat().st_mtime_ns == mtime  # not assembled again
    assert not list(tmp_path.rglob("*.partial"))


def test_folder_and_file_and_folder_with_one_gguf(tiny_models, smollm2_gguf, tmp_path):
    assert resolve(str(tiny_models("llama"))).kind == "hf"
    assert resolve(str(smollm2_gguf)).kind == "gguf"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").symlink_to(smollm2_gguf)
    assert resolve(str(tmp_path / "m")).kind == "gguf"


@pytest.mark.parametrize("spec, fragment", [
    ("/no/such/model", "no such model"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "hf download"),
    ("not-a-builtin", "built-in name"),
])
def test_unresolvable_references_explain_the_fix(spec, fragment):
    with pytest.raises(ModelNotFound) as err:
        resolve(spec)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_folder_without_config_or_gguf(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelNotFound, match="not a GGUF file"):
        resolve(str(bad))


def test_truncated_gguf_is_detected(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(20_000_000))
    with pytest.raises(SlimlmError, match="truncated|not a readable"):
        check_gguf(cut)


def test_corrupt_gguf_header_is_detected(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(SlimlmError, match="not a readable GGUF"):
        check_gguf(bad)


def test_builtins_name_their_packages():
    assert set(BUILTINS) == {"smollm2-135m-instruct", "gemma3-270m"}
    assert all(b.package for b in BUILTINS.values())


def test_hub_id_in_local_cache_resolves(tiny_models, tmp_path, monkeypatch):
    """A hub id whose files are already in the local HF cache is used, offline."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    shutil.copytree(tiny_models("llama"), snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    ref = resolve("acme/tiny")
    assert ref.kind == "hf" and (ref.path / "config.json").exists()
