"""Choose the torch dtypes for prefill and decode by measuring this CPU, once.

Decode multiplies one token's activations by every weight, so it is bound by memory bandwidth
and half-precision weights help even where the CPU has no native bf16 (torch converts in its
gemv kernels). Prefill multiplies many tokens at once, so it is bound by arithmetic, and
emulated bf16 is several times slower than fp32 there. Which effect wins differs per CPU, so a
short probe (matrix-vector and matrix-matrix products at model-like sizes) decides, and its
result is cached per CPU model and torch version.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.hardware import cpu_info

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
# A half-precision decode must beat fp32 by this much to be worth a second copy of the weights.
_MIN_GAIN = 1.2


@dataclass(frozen=True)
class PrecisionPlan:
    prefill: object  # torch.dtype
    decode: object
    reason: str

    @property
    def split(self) -> bool:
        return self.prefill != self.decode

    def short(self) -> str:
        name = lambda d: str(d).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")  # noqa: E731
        return f"{name(self.prefill)}/{name(self.decode)}" if self.split else name(self.prefill)

    def describe(self) -> str:
        name = lambda d: str(d).replace("torch.", "")  # noqa: E731
        if self.split:
            return f"prefill {name(self.prefill)}, decode {name(self.decode)} ({self.reason})"
        return f"{name(self.prefill)} ({self.reason})"


def _time(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def probe_cpu() -> dict:
    """Seconds per matvec (decode-like) and per matmul (prefill-like), in fp32 and bf16."""
    import torch

    out = {}
    for name in ("float32", "bfloat16"):
        dtype = getattr(torch, name)
        w = torch.randn(4096, 4096).to(dtype)  # 32-64 MB: larger than the caches, like real weights
        x1, xn = torch.randn(1, 4096).to(dtype), torch.randn(128, 4096).to(dtype)
        with torch.inference_mode():
            out[f"matvec_{name}"] = _time(lambda: x1 @ w.T, 20)
            out[f"matmul_{name}"] = _time(lambda: xn @ w.T, 3)
    return out


def _cached_probe() -> dict:
    import hashlib

    import torch

    from slimlm.paths import cache_dir

    key = hashlib.sha256(f"{cpu_info().model}|{sorted(cpu_info().flags)}|{torch.__version__}".encode()).hexdigest()[:16]
    path = cache_dir() / f"precision-probe-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    result = probe_cpu()
    path.write_text(json.dumps(result))
    return result


def choose_precision(device: str, requested: str = "auto") -> PrecisionPlan:
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
