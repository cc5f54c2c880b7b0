"""A GGUF parent's own quantized blocks, kept where a typed file stores a weight in the parent's type.

Most small models reach users as GGUF files that are already quantized (the built-in Gemma 3 is
Q4_K_M). slimlm dequantizes such a parent to float32 to work on it, and that float32 model is the
reference every KL is measured against. Writing a weight back in the type the parent stored it in
can then be exact: the parent's bytes decode to precisely the reference weights. Rounding the
dequantized weights again does not always get there: llama.cpp's Q4_K and Q6_K quantizers search
scales, and the search started from a grid's own values can land on another grid, so
`llama-quantize --allow-requantize` to the parent's own type adds error a copy does not.

The parent is found from the model reference, or from the manifest of a folder converted from a
GGUF file (source_blocks checks every kept tensor's values against the folder, so a stale record
keeps nothing). So for typed files (K-quant mixes and `--target-size` mixes, mixed_precision.py) slimlm keeps the
parent's blocks of every weight whose chosen type is the parent's type, and the allocation counts
that choice as adding no KL. Only a method that writes the weights it was given may keep them: AWQ
rewrites the model (its scales move into the weights), so its files never keep the parent's blocks.

models/gguf_tensors.py gives each tensor's raw bytes and type without parsing the vocabulary; the
only work here is matching the parent's tensor names and shapes to the ones slimlm's exporter
writes, which follow the same llama.cpp conventions (a tensor whose name or shape differs is
simply not kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SourceBlock", "parent_gguf", "source_blocks"]


@dataclass(frozen=True)
class SourceBlock:
    """One weight as the parent GGUF stores it: its type name (Q4_K, Q8_0, ...), raw bytes and GGML type."""
    type: str
    data: np.ndarray
    qtype: object


def parent_gguf(ref, folder: Path) -> Path | None:
    """The GGUF file a model came from: the reference itself, or the file a folder was converted
    from (`slimlm convert`, and the cached conversion every verb makes, record it in the folder's
    manifest). None for a model that never was a GGUF file."""
    from slimlm.runs import read_manifest

    if ref.kind == "gguf":
        return ref.path
    manifest = read_manifest(folder) or {}
    parent = manifest.get("parent") or {}
    if manifest.get("operation") == "convert" and parent.get("kind") == "gguf" and Path(parent["path"]).is_file():
        return Path(parent["path"])
    return None


def source_blocks(path: Path | None, folder: Path, names: dict[str, str], shapes: dict[str, tuple],
                  wanted: dict[str, str] | None = None) -> dict[str, SourceBlock]:
    """{Hugging Face name: SourceBlock} for the quantized weights of the GGUF file `path` whose
    bytes decode to exactly what the exporter would write for them from `folder` (its dequantized
    copy): same GGUF name (`names`, {hf name: gguf name}), same shape, and the same values after the
    exporter's layout transform. Empty for a parent that is not a GGUF file (path None). The value
    check makes "kept means exact" a fact measured here, not an assumption about the converters.
    `wanted` ({hf name: type}, when the types are already chosen) limits the check to the tensors
    the parent stores in the wanted type: the others could not be kept anyway, and dequantizing
    every tensor costs seconds on a 2-core machine."""
    if path is None:
        return {}
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors import safe_open

    from slimlm.compress.gguf_export import layout_transform
    from slimlm.models.gguf_tensors import read_tensors

    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    by_gguf = {g: n for n, g in names.items()}
    candidates = {}
    for t in read_tensors(path):
        hf = by_gguf.get(t.name)
        if hf is None or t.tensor_type in plain or (wanted is not None and wanted.get(hf) != t.tensor_type.name):
            continue
        if tuple(int(x) for x in reversed(t.shape)) == tuple(shapes[hf]):  # GGUF lists the row width first
            candidates[hf] = SourceBlock(t.tensor_type.name, np.array(t.data), t.tensor_type)
    if not candidates:
        return {}
    transform = layout_transform(folder)
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for hf in set(f.keys()) & set(candidates):
                block = candidates[hf]
                w = transform(hf, f.get_tensor(hf).float().numpy())
                if np.array_equal(dequantize(block.data, block.qtype).reshape(w.shape), w):
                    found[hf] = block
    return found
