"""Choose the torch dtypes for prefill and decode by measuring this CPU, once.

Decode multiplies one token's activations by every weight, so it is bound by memory bandwidth
and half-precision weights help even where the CPU has no native bf16 (torch converts in its
gemv kernels). Prefill multiplies many tokens at once, so it is bound by arithmetic, and
emulated bf16 is several times slower than fp32 there. Which effect wins differs per CPU, so a
short probe (matrix-vector and matrix-matrix products at model-like sizes) decides, and its
result is cached per CPU model and torch version.

The same probe times each product once more with the weight pre-packed for oneDNN (onednn.py):
which GEMM library is faster in a dtype also differs per CPU (MKL's fp32 kernels ran 2.3x slower
than oneDNN's on an AMD Zen 5), so the plan lists the dtypes whose linears get packed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

from slimlm.errors import SlimlmError
from slimlm.hardware import cpu_info

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
# A half-precision decode must beat fp32 by this much to be worth a second copy of the weights.
_MIN_GAIN = 1.2
# Packed oneDNN weights must beat the plain path by this much in a regime where the dtype is
# used, and lose by no more than this in any, to be worth their extra copy of the weights.
_ONEDNN_GAIN, _ONEDNN_FLOOR = 1.1, 0.95
_PROBE_VERSION = 2  # bump when probe_cpu() measures something new, so old caches are redone


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class PrecisionPlan:
    prefill: object  # torch.dtype
    decode: object
    reason: str
    onednn: tuple = ()  # dtypes whose linear layers run on pre-packed oneDNN weights

    @property
    def split(self) -> bool:
        return self.prefill != self.decode

    def short(self) -> str:
        name = lambda d: _dtype_name(d).replace("float", "fp").replace("bfp16", "bf16")  # noqa: E731
        text = f"{name(self.prefill)}/{name(self.decode)}" if self.split else name(self.prefill)
        return text + (" onednn" if self.onednn else "")

    def describe(self) -> str:
        name = _dtype_name
        if self.split:
            text = f"prefill {name(self.prefill)}, decode {name(self.decode)} ({self.reason})"
        else:
            text = f"{name(self.prefill)} ({self.reason})"
        if self.onednn:
            text += f"; linears on packed oneDNN weights in {', '.join(name(d) for d in self.onednn)} (measured faster)"
        return text


def _time(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def probe_cpu() -> dict:
    """Seconds per matvec (decode-like) and per matmul (prefill-like), in fp32 and bf16, through
    the plain linear and (where torch has oneDNN) with the weight pre-packed for oneDNN."""
    import torch

    from slimlm.models.backends import onednn

    out = {"version": _PROBE_VERSION}
    for name in ("float32", "bfloat16"):
        dtype = getattr(torch, name)
        w = torch.randn(4096, 4096).to(dtype)  # 32-64 MB: larger than the caches, like real weights
        x1, xn = torch.randn(1, 4096).to(dtype), torch.randn(128, 4096).to(dtype)
        linear = torch.nn.functional.linear
        with torch.inference_mode():
            out[f"matvec_{name}"] = _time(lambda: linear(x1, w), 20)
            out[f"matmul_{name}"] = _time(lambda: linear(xn, w), 3)
            if onednn.available():
                packed = onednn.pack_weight(w)
                out[f"matvec_{name}_onednn"] = _time(lambda: onednn.packed_linear(x1, packed, None), 20)
                out[f"matmul_{name}_onednn"] = _time(lambda: onednn.packed_linear(xn, packed, None), 3)
    return out


def _cached_probe() -> dict:
    import hashlib

    import torch

    from slimlm.paths import cache_dir

    key = hashlib.sha256(f"{cpu_info().model}|{sorted(cpu_info().flags)}|{torch.__version__}".encode()).hexdigest()[:16]
    path = cache_dir() / f"precision-probe-{key}.json"
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("version") == _PROBE_VERSION:
                return cached
        except ValueError:
            pass
    result = probe_cpu()
    path.write_text(json.dumps(result))
    return result


def _onednn_dtypes(plan: PrecisionPlan, probe: dict) -> tuple:
    """The plan's dtypes whose packed oneDNN products beat the plain ones clearly in a regime the
    dtype is used for (matmul for the prefill dtype, matvec for the decode dtype) and lose in none."""
    out = []
    for dtype in dict.fromkeys((plan.prefill, plan.decode)):
        name = _dtype_name(dtype)
        if f"matvec_{name}_onednn" not in probe:
            continue
        used = [r for r, d in (("matmul", plan.prefill), ("matvec", plan.decode)) if d == dtype]
        gain = {r: probe[f"{r}_{name}"] / probe[f"{r}_{name}_onednn"] for r in ("matvec", "matmul")}
        if max(gain[r] for r in used) >= _ONEDNN_GAIN and min(gain.values()) >= _ONEDNN_FLOOR:
            out.append(dtype)
    return tuple(out)


def choose_precision(device: str, requested: str = "auto") -> PrecisionPlan:
    """The dtypes (and, on a CPU, the GEMM kernels) for prefill and decode on this machine."""
    plan = _choose_dtypes(device, requested)
    if device == "cpu" and os.environ.get("SLIMLM_ONEDNN", "1") != "0":  # 0: plain kernels, to compare
        plan = replace(plan, onednn=_onednn_dtypes(plan, _cached_probe()))
    return plan


def _choose_dtypes(device: str, requested: str) -> PrecisionPlan:
    import torch

    if requested != "auto":
        if requested not in _DTYPES:
            raise SlimlmError(f"unknown dtype '{requested}': use auto, float32, bfloat16 or float16")
        dtype = getattr(torch, _DTYPES[requested])
        return PrecisionPlan(dtype, dtype, "requested")
    if device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return PrecisionPlan(dtype, dtype, "GPU")
    if device != "cpu":
        return PrecisionPlan(torch.float16, torch.float16, device)
    if cpu_info().native_bf16:
        return PrecisionPlan(torch.bfloat16, torch.bfloat16, "CPU has native bf16")
    probe = _cached_probe()
    gain = probe["matvec_float32"] / probe["matvec_bfloat16"]
    if gain >= _MIN_GAIN:
        return PrecisionPlan(torch.float32, torch.bfloat16, f"measured: bf16 decode {gain:.1f}x fp32, no native bf16")
    return PrecisionPlan(torch.float32, torch.float32, f"measured: bf16 decode only {gain:.1f}x fp32")
