"""What this machine can do, read at run time.

slimlm runs on CPUs that differ from the one it was developed on (an AVX2-only AMD EPYC, an
Intel with AVX-512 BF16 and AMX, a user's laptop), so every speed decision starts here rather
than from a build-time guess: which dtype is fast (bf16 only where the CPU has it natively),
how many threads to use, and whether the installed llama.cpp build belongs to this CPU.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Flags worth reporting: the SIMD and matrix extensions the kernels in torch and ggml use.
_INTERESTING = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve", "bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    physical_cores: int
    logical_cores: int
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def features(self) -> list[str]:
        return [f for f in _INTERESTING if f in self.flags]

    @property
    def native_bf16(self) -> bool:
        """True where bf16 matmuls run in hardware (AVX-512 BF16, AMX, or Arm BF16)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16", "bf16"})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flags"] = self.features
        return d

    def describe(self) -> str:
        return f"{self.model} ({self.arch}, {self.physical_cores} cores; {' '.join(self.features) or 'no SIMD flags read'})"


@functools.cache
def cpu_info() -> CpuInfo:
    import psutil

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: fall back to what torch can tell
        pass
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return CpuInfo(model=model, arch=platform.machine(), physical_cores=physical,
                   logical_cores=os.cpu_count() or physical, flags=frozenset(flags))


def cpu_signature() -> str:
    """A short hash of the CPU model and its SIMD/matrix flags: builds are keyed by it."""
    import hashlib

    cpu = cpu_info()
    relevant = sorted(f for f in cpu.flags if f.startswith(("avx", "amx", "fma", "f16c", "bmi", "sve", "neon", "asimd")))
    return hashlib.sha256((cpu.arch + cpu.model + " ".join(relevant)).encode()).hexdigest()[:16]


def default_threads() -> int:
    """Physical cores, or what the process is allowed to use if that is fewer."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    return max(1, min(cpu_info().physical_cores, allowed))


def best_torch_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def best_torch_dtype(device: str = "cpu"):
    """The fastest dtype that keeps quality: bf16 on GPUs and CPUs with native bf16, else fp32.

    On a CPU without native bf16 (e.g. AVX2-only), bf16 matmuls are emulated and slower than fp32,
    and fp16 on CPU is slower still, so fp32 is the fast choice there.
    """
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_info().native_bf16 else torch.float32


def llama_cpp_record_path() -> Path | None:
    """Where scripts/install_llama_cpp.py records its build: beside the installed llama_cpp."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")  # locates it without loading the library
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "slimlm-build.json"


def llama_cpp_build() -> dict | None:
    """The build record, {} if llama_cpp has none (installed by the user), None if not installed."""
    path = llama_cpp_record_path()
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def llama_cpp_build_problem() -> str | None:
    """Why the installed llama.cpp build should not run on this CPU, or None if it may.

    A build compiled with instructions this CPU lacks dies with SIGILL mid-generation; checking
    the build's recorded CPU model first turns that into a clear message with the fix.
    """
    record = llama_cpp_build()
    if record is None:
        return "llama-cpp-python is not installed; run `make setup` (or pick --backend torch)"
    if not record:
        return None  # installed by the user, not by slimlm: trust it
    cpu = cpu_info()
    if record.get("cpu_signature") not in (None, cpu_signature()) and record.get("variant") != "portable":
        return (f"llama-cpp-python was built for another CPU ({record.get('cpu_model')}); "
                f"run `make llama-cpp` to rebuild it for this one ({cpu.model})")
    if record.get("variant") == "portable" and not {"avx2", "fma"} <= cpu.flags and cpu.arch == "x86_64":
        return "this CPU lacks AVX2/FMA that the portable llama.cpp build needs; run `make llama-cpp`"
    return None
