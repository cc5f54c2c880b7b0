"""Packed Hugging Face folders, the reading side: what `load_torch` needs to run a folder that
`slimlm quantize --format hf` wrote (compress/packed.py is the writing side and documents the
layout).

Each quantized `X.weight` is stored as `X.qweight` (uint8, codes bit-packed along each row),
`X.scales` (fp16, one per group) and, for asymmetric formats, `X.mins`; `config.json` says so
under `quantization_config` with `quant_method: "slimlm"`. `load_packed` builds the model without
allocating its weights, swaps each quantized nn.Linear for a `PackedLinear`, which dequantizes in
forward (x = d * (q - zero) + m, so the fp32 weight lives only during the matmul), and loads the
packed tensors. This lives in models/ because loading a model is a models/ concern: models/ imports
nothing from the verbs above it, and compress/ imports the shared bit layout (PLANES) from here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

__all__ = ["PLANES", "unpack_codes", "packed_linear_class", "load_packed", "is_packed"]

# Per bit width, the planes a row of codes is stored in: (shift, width) of the bits each plane
# holds. 8, 4 and 2 bits are one plane of 8/width codes a byte; 3 bits are a plane of the low 2
# bits (4 codes a byte) and a plane of the high bit (8 codes a byte).
PLANES = {8: ((0, 8),), 4: ((0, 4),), 3: ((0, 2), (2, 1)), 2: ((0, 2),)}


def is_packed(config) -> bool:
    """Whether a model config (a transformers config) describes a folder save_packed wrote."""
    qc = getattr(config, "quantization_config", None)
    return isinstance(qc, dict) and qc.get("quant_method") == "slimlm"


def unpack_codes(packed, bits: int, cols: int):
    """uint8 [rows, bytes] -> int32 codes [rows, cols]; numpy arrays or torch tensors (on any
    device: the same vectorized shifts run on CUDA)."""
    import torch

    is_np = isinstance(packed, np.ndarray)
    b = (torch.from_numpy(np.ascontiguousarray(packed)) if is_np else packed).to(torch.int32)
    q, at = None, 0
    for shift, width in PLANES[bits]:
        n = -(-cols // (8 // width))
        shifts = torch.arange(0, 8, width, dtype=b.dtype, device=b.device)
        c = ((b[:, at:at + n, None] >> shifts) & ((1 << width) - 1)).reshape(b.shape[0], -1)[:, :cols]
        q, at = (c << shift) if q is None else q | (c << shift), at + n
    return q.numpy() if is_np else q


@functools.cache
def packed_linear_class():
    """The PackedLinear class, built on first use so that importing this module needs no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class PackedLinear(nn.Module):
        """nn.Linear whose weight is stored packed; forward unpacks and dequantizes it (torch ops,
        any device), so the dense weight exists only for the duration of the matmul."""

        def __init__(self, in_features: int, out_features: int, bits: int, zero: int, qweight, scales,
                     mins=None, bias=None):
            super().__init__()
            self.in_features, self.out_features, self.bits, self.zero = in_features, out_features, bits, zero
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scales)
            self.register_buffer("mins", mins)
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

        def dequantize(self) -> torch.Tensor:
            q = unpack_codes(self.qweight, self.bits, self.in_features).float()
            rows, groups = self.scales.shape
            w = (q.reshape(rows, groups, -1) - self.zero) * self.scales.float()[..., None]
            if self.mins is not None:
                w = w + self.mins.float()[..., None]
            return w.view(rows, self.in_features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"

    return PackedLinear


def __getattr__(name: str):  # PackedLinear is built on first use, so importing this module needs no torch
    if name == "PackedLinear":
        return packed_linear_class()
    raise AttributeError(name)


def load_packed(folder: str | Path, dtype=None, device: str = "cpu", attn: str | None = None):
    """The model of a folder written by save_packed, quantized linears as PackedLinear."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, dtype = Path(folder), dtype or torch.float32
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    qc = config.quantization_config
    del config.quantization_config  # else from_config warns that transformers has no "slimlm" quantizer
    state = load_file(str(folder / "model.safetensors"))
    kwargs = {"attn_implementation": attn} if attn else {}
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    cls = packed_linear_class()
    for base in qc["modules"]:
        lin = model.get_submodule(base)
        if not isinstance(lin, torch.nn.Linear) or base + ".qweight" not in state:
            raise SlimlmError(f"{folder}: {base} is not a linear layer of {config.model_type} with packed "
                              "weights in model.safetensors: the folder is damaged")
        parent, _, child = base.rpartition(".")
        bias = state.pop(base + ".bias", None)
        setattr(model.get_submodule(parent), child, cls(
            lin.in_features, lin.out_features, qc["bits"], qc["zero"], state.pop(base + ".qweight"),
            state.pop(base + ".scales"), state.pop(base + ".mins", None), None if bias is None else bias.to(dtype)))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise SlimlmError(f"{folder}: tensors {', '.join(unexpected[:3])} do not fit {config.model_type}")
    model.tie_weights()
    model.config.quantization_config = qc  # the model says what it is; save_pretrained writes it packed again
    if meta := [n for n, p in model.named_parameters() if p.is_meta]:
        raise SlimlmError(f"{folder}: model.safetensors lacks {', '.join(meta[:3])}: the folder is incomplete")
    return model.to(device).eval()
