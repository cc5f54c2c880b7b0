"""Quantized Hugging Face folders that stay small on disk and in memory: packed codes, not fp32.

A GGUF file serves llama.cpp and Ollama; people who run torch want a Hugging Face folder. Writing
the quantized weights back as fp32 ("fake quantization") loses the point, since the folder is as
large as before, so here each quantized `X.weight` becomes three tensors in `model.safetensors`:

    X.qweight  uint8 [rows, bytes]   the integer codes, bit-packed along each row
    X.scales   fp16  [rows, groups]  d, one per group of `group_size` input columns
    X.mins     fp16  [rows, groups]  m, asymmetric formats only

and the weight is read as `x = d * (q - zero) + m`, the convention of blocks.py, so the codes and
scales any method chooses (RTN, GPTQ, ternary) are stored unchanged. Packing: bits 8, 4 and 2
(and ternary, 3 levels in 2 bits) put 8/bits codes in a byte, code i of the byte at bit bits*i
(little end first). 3 bits are stored as two planes, kept simple rather than dense across byte
boundaries: the low 2 bits of every code (4 per byte), then the high bit (8 per byte), so a row of
n codes takes ceil(n/4) + ceil(n/8) bytes, still 3 bits a weight. Rows are padded with code 0.

`config.json` records it under the standard `quantization_config` key with `quant_method: "slimlm"`:
transformers only warns about a method it does not know (tested), and `load_torch` sees the key and
calls `models.packed.load_packed`, which builds the model without allocating its weights, swaps each
quantized nn.Linear for a `PackedLinear` (which dequantizes in forward, so the fp32 weight lives only
during the matmul) and loads the packed tensors. Plain `from_pretrained` cannot read these weights.
This module is the writing side; the reading side, and the bit layout both share (PLANES), is
slimlm/models/packed.py, since models/ imports nothing from compress/.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from slimlm.compress.blocks import BlockFormat, safe_inverse
from slimlm.errors import SlimlmError
from slimlm.models.packed import PLANES

__all__ = ["int_format", "ternary_format", "for_width", "int_rtn", "pack_codes", "save_packed", "packed_size",
           "bits_per_weight", "SUPPORTED_BITS"]

SUPPORTED_BITS = (8, 4, 3, 2)


def _layout(bits: int, symmetric: bool, group: int) -> tuple[tuple[str, int], ...]:
    # per group: fp16 d (and m); the codes' bytes are fractional for odd groups, so this is
    # only used for display, bits_per_weight() computes the exact figure
    return (("d", 2),) + ((("m", 2),) if not symmetric else ()) + (("qs", group * bits // 8),)


def _group(group_size: int) -> int:
    if group_size in (0, -1):
        return 0  # per channel: resolved per layer by for_width
    if int(group_size) < 0:
        raise SlimlmError(f"group size must be positive, or 0/-1 for per-channel; got {group_size}")
    return int(group_size)


def int_format(bits: int, group_size: int = 128, symmetric: bool = True) -> BlockFormat:
    """A generic integer format as data. group_size 0 or -1: one group per row (per channel).
    Symmetric: codes 0..2^b-1 around zero 2^(b-1), d = max/-2^(b-1) (like Q4_0); asymmetric:
    codes 0..2^b-1, d = (max-min)/(2^b-1), m = min (like Q4_1)."""
    if bits not in SUPPORTED_BITS:
        raise SlimlmError(f"unsupported bit width {bits}: packed formats have bits "
                          f"{', '.join(map(str, SUPPORTED_BITS))} (or the ternary method)")
    group = _group(group_size)
    qmax = 2 ** bits - 1
    name = f"int{bits}-{f'g{group}' if group else 'channel'}-{'sym' if symmetric else 'asym'}"
    return BlockFormat(name, None, group, bits, symmetric, 0, qmax, 2 ** (bits - 1) if symmetric else 0,
                       _layout(bits, symmetric, group), "signed_max" if symmetric else "min_max",
                       f"x = d*(q-{2 ** (bits - 1)}), q 0..{qmax}; d = max/-{2 ** (bits - 1)}" if symmetric
                       else f"x = d*q + m, q 0..{qmax}; d = (max-min)/{qmax}, m = min")


def ternary_format(group_size: int = 256) -> BlockFormat:
    """Codes 0..2 around zero 1 (x = d*(q-1)), stored in 2 bits; rtn_rule "absmax" is llama.cpp's
    TQ rule (the `ternary` method chooses better codes and d itself, see ternary.py)."""
    group = _group(group_size)
    return BlockFormat(f"ternary-{f'g{group}' if group else 'channel'}", None, group, 2, True, 0, 2, 1,
                       _layout(2, True, group), "absmax", "x = d*(q-1), q 0..2; d = amax")


def for_width(fmt: BlockFormat, cols: int) -> BlockFormat:
    """The format with its group size resolved for a layer of `cols` input columns (per-channel
    becomes one group of `cols`); this is what blocks.rtn and gptq_quantize expect."""
    if fmt.block_size == 0:
        return dataclasses.replace(fmt, block_size=int(cols), layout=_layout(fmt.bits, fmt.symmetric, int(cols)))
    if cols <= 0 or cols % fmt.block_size:
        raise SlimlmError(f"the layer width {cols} is not a multiple of the group size {fmt.block_size} "
                          f"({fmt.name}): choose a group size that divides it, or 0 for per-channel")
    return fmt


def int_rtn(fmt: BlockFormat, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest with llama.cpp's arithmetic (blocks.rtn), but codes as uint8 so 8-bit
    codes 0..255 fit: (q [rows, cols], d [rows, groups] float32, m or None)."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise SlimlmError(f"{fmt.name} quantizes 2-D float weights [rows, cols], got {w.dtype} {w.shape}")
    fmt = for_width(fmt, w.shape[1])
    x = w.astype(np.float32).reshape(-1, fmt.block_size)
    if not np.isfinite(x).all():
        raise SlimlmError(f"the weights hold NaN or inf: {fmt.name} cannot store them")
    m = None
    if fmt.rtn_rule == "absmax":
        d = np.abs(x).max(axis=1) / np.float32(fmt.qmax - fmt.zero)
        a = np.abs(x * safe_inverse(d)[:, None])
        q = np.copysign(np.floor(a) + (a - np.floor(a) >= 0.5), x) + fmt.zero  # C roundf
    elif fmt.rtn_rule == "signed_max":
        mx = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
        d = mx / np.float32(-fmt.zero)
        q = np.floor(x * safe_inverse(d)[:, None] + np.float32(fmt.zero + 0.5))
    else:
        lo, hi = x.min(axis=1), x.max(axis=1)
        d = (hi - lo) / np.float32(fmt.qmax)
        q = np.floor((x - lo[:, None]) * safe_inverse(d)[:, None] + np.float32(0.5))
        m = lo.reshape(w.shape[0], -1)
    q = np.clip(q, fmt.qmin, fmt.qmax).astype(np.uint8).reshape(w.shape)
    return q, d.reshape(w.shape[0], -1), m


def _nbytes(cols: int, bits: int) -> int:  # bytes of one packed row
    return sum(-(-cols // (8 // width)) for _, width in PLANES[bits])


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes [rows, cols] (0..2^bits-1) -> uint8 [rows, bytes], the layout in the module docstring."""
    q = np.asarray(q).astype(np.uint8)
    rows, cols = q.shape
    planes = []
    for shift, width in PLANES[bits]:
        per = 8 // width
        c = (q >> shift) & ((1 << width) - 1)
        c = np.pad(c, ((0, 0), (0, -cols % per))).reshape(rows, -1, per)
        planes.append(np.bitwise_or.reduce(c << (width * np.arange(per, dtype=np.uint8)), axis=2))
    return np.concatenate(planes, axis=1).astype(np.uint8)


def bits_per_weight(fmt: BlockFormat, cols: int) -> float:
    """Stored bits per quantized weight of a layer `cols` wide: codes (with row padding) + scales."""
    group = for_width(fmt, cols).block_size
    return (8 * _nbytes(cols, fmt.bits) + (cols // group) * 16 * (1 if fmt.symmetric else 2)) / cols


def packed_size(folder: str | Path) -> int:
    """Bytes of the weights on disk (every *.safetensors file of the folder)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _fp16(name: str, x: np.ndarray):
    import torch

    with np.errstate(over="ignore"):
        h = np.asarray(x, dtype=np.float32).astype(np.float16)
    if not np.isfinite(h).all():
        raise SlimlmError(f"{name}: scales/mins must be finite and fit fp16 (|value| <= 65504)")
    return torch.from_numpy(h)


def save_packed(model, out: str | Path, choices: dict, fmt: BlockFormat, manifest_extra: dict | None = None,
                *, force: bool = False) -> Path:
    """Write a Hugging Face folder at `out` with the weights in `choices` ({"X.weight": (q, d, m)})
    packed. `model` is a Hugging Face folder (tensors, config and tokenizer files are taken from
    it) or a transformers model (its state dict and config; no tokenizer)."""
    import torch
    from safetensors.torch import load_file, save_file

    from slimlm.models.loading import atomic_dir, read_config
    from slimlm.runs import write_manifest

    folder = Path(model) if isinstance(model, (str, Path)) else None
    if folder is not None:
        state = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
        config = read_config(folder)
    else:
        state, seen = {}, set()
        for k, v in model.state_dict().items():  # tied weights once (the first name, the embedding)
            if v.data_ptr() not in seen:
                state[k], seen = v.detach().cpu(), seen | {v.data_ptr()}
        config = model.config.to_dict()
    if not state:
        raise SlimlmError(f"{model}: no weights found (a Hugging Face folder with safetensors files)")
    tensors, modules = {}, []
    for name, t in state.items():
        if name not in choices:
            tensors[name] = t.contiguous()
            continue
        if not name.endswith(".weight") or t.dim() != 2:
            raise SlimlmError(f"{name}: only 2-D .weight tensors of linear layers can be packed")
        q, d, m = choices[name]
        f = for_width(fmt, t.shape[1])
        q = np.asarray(q)
        if q.dtype == np.int8 and f.qmax > 127:  # blocks.rtn/gptq store codes as int8: 8-bit codes wrap
            q = q.view(np.uint8)
        groups = (t.shape[0], t.shape[1] // f.block_size)
        if q.shape != tuple(t.shape) or q.dtype.kind not in "iu" or q.min() < f.qmin or q.max() > f.qmax:
            raise SlimlmError(f"{name}: codes must be integers {f.qmin}..{f.qmax} of shape {tuple(t.shape)}")
        if np.shape(d) != groups or (m is None) != f.symmetric or (m is not None and np.shape(m) != groups):
            raise SlimlmError(f"{name}: {fmt.name} needs scales{'' if f.symmetric else ' and mins'} of shape {groups}")
        base = name[:-len(".weight")]
        tensors[base + ".qweight"] = torch.from_numpy(pack_codes(q, f.bits))
        tensors[base + ".scales"] = _fp16(name, d)
        if m is not None:
            tensors[base + ".mins"] = _fp16(name, m)
        modules.append(base)
    if missing := sorted(set(choices) - set(state)):
        raise SlimlmError(f"choices name tensors the model does not have: {', '.join(missing[:3])}")
    config["quantization_config"] = {"quant_method": "slimlm", "bits": fmt.bits, "group_size": fmt.block_size,
                                     "symmetric": fmt.symmetric, "zero": fmt.zero, "format": fmt.name,
                                     "modules": modules}
    with atomic_dir(Path(out), force=force) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        skip = {"config.json", "model.safetensors.index.json", "slimlm.json"}
        for f in (folder.iterdir() if folder is not None else ()):
            if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
                shutil.copy2(f, tmp / f.name)
        write_manifest(tmp, parent=folder or "in-memory model", operation="quantize",
                       params={"format": f"hf-packed:{fmt.name}", **(manifest_extra or {})})
    return Path(out)
