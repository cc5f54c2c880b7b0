"""Load models into torch, and convert GGUF files into dense Hugging Face folders.

transformers does the real work (it reads GGUF, dequantizes it and maps tensor names per
architecture); slimlm adds the offline guarantees, clear errors, atomic writes and manifests.
GGUF files are converted once and cached, so the torch backend's later loads are plain
safetensors reads rather than a 30-second dequantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from slimlm.errors import SlimlmError, UnsupportedModel
from slimlm.models.families import family_of
from slimlm.models.packed import is_packed
from slimlm.models.reference import ModelRef, resolve


@contextmanager
def atomic_dir(out: Path, force: bool = False):
    """Yield a temporary folder beside `out`; it becomes `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def check_gguf(path: Path) -> None:
    """Reject corrupt or truncated GGUF files before transformers or llama.cpp trips on them."""
    from slimlm.models.gguf_tensors import read_tensors

    try:
        read_tensors(path)  # raises SlimlmError for a file cut short or without the GGUF magic
    except SlimlmError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is damaged
        raise SlimlmError(f"{path} is not a readable GGUF file ({type(exc).__name__}): re-copy or re-export it") from exc


def _gguf_to_torch(ref: ModelRef, dtype=None):
    """Dequantize a GGUF file through transformers; returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(ref.path)
    _quiet()
    folder, name = str(ref.path.parent), ref.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedModel(f"transformers cannot read {ref.path.name}: {str(exc).splitlines()[0]}; "
                               "use --backend llamacpp for this file") from exc
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them; the weights
    # are already dense tensors, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _drop_tokens_past_the_embedding(folder: Path, vocab_size: int) -> None:
    """Remove added tokens whose id has no embedding row. transformers' GGUF tokenizer conversion
    gives a "gpt2" vocabulary GPT-2's <|endoftext|> when the file has none, at an id past the
    model's vocabulary: the model could never read it, and the folder would not export back
    (gguf_vocab refuses a tokenizer larger than the model)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    added = data.get("added_tokens", [])
    keep = [t for t in added if int(t["id"]) < vocab_size]
    if len(keep) < len(added):
        data["added_tokens"] = keep
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2))


def convert(model: str | Path | ModelRef, out: str | Path, force: bool = False, record_run: bool = True) -> Path:
    """Write a dense Hugging Face folder (safetensors, config, tokenizer, chat template) from a GGUF file."""
    from slimlm.runs import record, write_manifest

    ref = resolve(model)
    if ref.kind != "gguf":
        raise SlimlmError(f"{ref.spec} is already a Hugging Face folder: convert takes a GGUF file")
    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    torch_model, tokenizer = _gguf_to_torch(ref)
    with atomic_dir(out, force=force) as tmp:
        torch_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_tokens_past_the_embedding(tmp, torch_model.config.vocab_size)
        write_manifest(tmp, parent=ref, operation="convert", params={"from": "gguf", "dtype": "float32"})
    if record_run:
        record("convert", model=ref, params={"out": str(out)}, artifact=out)
    return out


def dense_folder(ref: ModelRef) -> Path:
    """A Hugging Face folder for `ref`: itself, or the cached conversion of its GGUF file."""
    if ref.kind == "hf":
        return ref.path
    from slimlm.paths import cache_dir

    st = ref.path.stat()
    key = hashlib.sha256(f"{ref.path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "converted" / f"{ref.path.stem}-{key}"
    if not (target / "config.json").exists():
        convert(ref, target, force=True, record_run=False)
    return target


def load_torch(model: str | Path | ModelRef, dtype=None, device: str = "cpu", attn: str | None = None):
    """Load (model, tokenizer) for torch from any model reference; GGUF goes through the cache."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ref = resolve(model)
    folder = dense_folder(ref)
    _quiet()
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModel(f"cannot read {folder / 'config.json'}: {str(exc).splitlines()[0]}") from exc
    if family_of(config.model_type) is None:
        warnings.warn(f"{config.model_type} is not a family slimlm tests; results may vary", stacklevel=2)
    if is_packed(config):  # packed weights from `slimlm quantize --format hf` (models/packed.py)
        from slimlm.models.packed import load_packed

        return load_packed(folder, dtype, device, attn), AutoTokenizer.from_pretrained(folder, local_files_only=True)
    kwargs = {"dtype": dtype or torch.float32, "local_files_only": True}
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        torch_model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ValueError as exc:
        raise UnsupportedModel(f"cannot load {ref.spec}: {str(exc).splitlines()[0]}") from exc
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return torch_model.to(device).eval(), tokenizer


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SlimlmError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
