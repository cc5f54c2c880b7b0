"""Linear layers with their weights pre-packed once for oneDNN, the CPU kernel library in torch.

Why: a plain `nn.Linear` on the CPU hands its weight to a GEMM library on every call. In bf16
that library is oneDNN, which first reorders the weight into its blocked layout, every call, for
every layer of every decode step; packing it once (what torch.compile's `freezing` pass does)
gives bit-identical outputs and, measured on an AMD Zen 5, made bf16 matrix-vector products 1.7x
faster. In fp32 the plain path is MKL, which on that AMD CPU ran 2.3x slower than oneDNN's
AVX-512 kernels (outputs equal to about 1e-6 relative). Whether oneDNN wins differs per CPU
(MKL is Intel's own), so precision.py measures it and packs only where it is faster.

No library does this for eager transformers models (torch's own packing runs only inside
torch.compile), hence this small module. It uses torch's mkldnn ops, the same that compile emits.

The packed copy is an extra copy of each linear weight: the plain `weight` stays, because tied
embeddings, PEFT and saving read it. A layer whose weight changed in place (a merged adapter)
repacks itself on the next call.
"""

from __future__ import annotations

import torch
from torch import nn

PACKABLE = (torch.float32, torch.bfloat16)


def available() -> bool:
    """torch was built with oneDNN and exposes the packing ops (x86 and Arm CPU builds do)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def pack_weight(weight: torch.Tensor, batch_hint: int = 1) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class OneDnnLinear(nn.Linear):
    """An nn.Linear (isinstance still holds, so PEFT and friends treat it as one) whose forward
    uses a oneDNN-packed copy of its weight when the input matches it (CPU, same dtype, no
    autograd: the packed op has no backward), and the plain path otherwise."""

    _packed: torch.Tensor | None = None
    _packed_version: int = -1

    def repack(self) -> None:
        self._packed = pack_weight(self.weight)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != w.dtype or x.device.type != "cpu" or torch.is_grad_enabled():
            return super().forward(x)
        if self._packed is None or self._packed_version != w._version:
            self.repack()
        return packed_linear(x, self._packed, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Turn every plain nn.Linear of a CPU model in a packable dtype into a OneDnnLinear, in place
    (the module keeps its parameters, hooks and place in the tree). Do this after any dtype or
    device change: `.to()` does not move the packed copy. Returns the number of layers packed."""
    count = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if type(module) is nn.Linear and w is not None and w.device.type == "cpu" and w.dtype in PACKABLE:
            module.__class__ = OneDnnLinear
            with torch.no_grad():
                module.repack()
            count += 1
    return count
