#!/usr/bin/env python3
"""Build and install llama-cpp-python for the CPU this runs on, then prove it works.

Why not `pip install llama-cpp-python`: PyPI ships only the source, and its default build
(`-march=native`) was seen to segfault on an Intel CPU with AMX as soon as a prompt was evaluated
in batches larger than one, while a portable AVX2 build of the same version was stable at about
half the decode speed. Prebuilt wheels from elsewhere are compiled for some other CPU. So:

1. read the CPU's features (/proc/cpuinfo);
2. pick a build: native, except on CPUs with AMX, where it is "native minus AMX" (every AVX-512
   extension the CPU has, AMX tiles off);
3. build a wheel into a cache keyed by llama-cpp-python's version, the build's flags and the
   CPU's model and features, so a wheel is reused only on the same kind of CPU;
4. install it and run a smoke test in a child process that evaluates a real prompt with a batch
   of 512 and with a batch of 1 and compares the logits; if the child crashes or they differ,
   fall back to the portable AVX2 build and test again;
5. record what was installed next to the package (`llama_cpp/slimlm-build.json`), so slimlm can
   tell at run time whether the build belongs to the CPU it finds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# slimlm is installed before this script runs (see the Makefile); its CPU reading is the one
# the run-time check compares against, so both sides use the same code.
from slimlm.hardware import cpu_info, cpu_signature, llama_cpp_build, llama_cpp_record_path

VERSION = "0.3.36"
COMMON_ARGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]
# /proc/cpuinfo flag -> ggml CMake option, for the explicit (non -march=native) x86 builds.
X86_OPTIONS = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512_vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}
PORTABLE_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi2")


def build_plan(flags: set[str], variant: str) -> list[str]:
    is_x86 = platform.machine() in ("x86_64", "AMD64")
    if not is_x86:
        return ["-DGGML_NATIVE=ON"]
    if variant == "portable":
        on = {f for f in PORTABLE_FLAGS if f in flags}
    elif any(f.startswith("amx") for f in flags):
        on = {f for f in X86_OPTIONS if f in flags}  # native minus AMX
    else:
        return ["-DGGML_NATIVE=ON"]
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{opt}={'ON' if f in on else 'OFF'}" for f, opt in X86_OPTIONS.items()]
    args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return args


def first_variant(flags: set[str]) -> str:
    if platform.machine() in ("x86_64", "AMD64") and any(f.startswith("amx") for f in flags):
        return "native-no-amx"
    return "native"


def wheel_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "slimlm" / "llama-cpp-wheels"


def build_wheel(cmake_args: list[str], key: str) -> Path:
    out = wheel_cache() / key
    existing = sorted(out.glob("llama_cpp_python-*.whl"))
    if existing:
        print(f"[llama.cpp] reusing the wheel built earlier on this CPU: {existing[0]}")
        return existing[0]
    tmp = Path(tempfile.mkdtemp(prefix="llama-wheel-"))
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(cmake_args + COMMON_ARGS)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(os.cpu_count() or 2)
    print(f"[llama.cpp] building llama-cpp-python {VERSION} with {env['CMAKE_ARGS']} (several minutes)")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(tmp),
           f"llama-cpp-python=={VERSION}"]
    subprocess.run(cmd, env=env, check=True)
    wheel = next(tmp.glob("llama_cpp_python-*.whl"))
    out.mkdir(parents=True, exist_ok=True)
    final = out / wheel.name
    os.replace(wheel, final)
    return final


SMOKE = r"""
import sys, numpy as np
from llama_cpp import Llama
path = sys.argv[1]
text = ("The Python language reference describes the syntax and core semantics of the language. "
        "It is terse, but attempts to be exact and complete. ") * 8
def log_softmax(n_batch):
    llm = Llama(model_path=path, n_ctx=512, n_batch=n_batch, n_ubatch=n_batch, logits_all=True, verbose=False)
    toks = llm.tokenize(text.encode())[:200]
    llm.eval(toks)
    x = np.array(llm.scores[: len(toks)], dtype=np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
big, one = log_softmax(512), log_softmax(1)
kl = float((np.exp(one) * (one - big)).sum(-1).mean())
agree = float((big.argmax(-1) == one.argmax(-1)).mean())
print(f"batched-vs-single mean KL {kl:.5f}, top-1 agreement {agree:.3f}")
# Batched kernels round differently from single-token ones: a healthy build was seen here at KL
# 0.001 and top-1 0.98 (near-ties flip); a broken one is far off on both (or crashes).
sys.exit(0 if np.isfinite(kl) and kl < 0.01 and agree >= 0.95 else 3)
"""


def smoke_model() -> Path | None:
    from slimlm.errors import ModelNotFound
    from slimlm.models.reference import BUILTINS

    try:
        return BUILTINS["smollm2-135m-instruct"].locate()
    except ModelNotFound:
        return None


def smoke_test() -> bool:
    model = smoke_model()
    if model is None:
        print("[llama.cpp] built-in SmolLM2 not installed; checking the import only")
        return subprocess.run([sys.executable, "-c", "import llama_cpp"]).returncode == 0
    proc = subprocess.run([sys.executable, "-c", SMOKE, str(model)], capture_output=True, text=True)
    print(f"[llama.cpp] smoke test exit code {proc.returncode}: {proc.stdout.strip() or proc.stderr[-300:]}")
    return proc.returncode == 0


def write_record(record: dict) -> None:
    llama_cpp_record_path().write_text(json.dumps(record, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if a matching build is installed")
    ap.add_argument("--variant", choices=["native", "native-no-amx", "portable"], help="skip the automatic choice")
    args = ap.parse_args()
    cpu = cpu_info()
    model, flags, sig = cpu.model, set(cpu.flags), cpu_signature()
    rec = llama_cpp_build()
    if rec and rec.get("cpu_signature") == sig and rec.get("version") == VERSION and not args.force:
        print(f"[llama.cpp] {rec['variant']} build for this CPU ({model}) already installed")
        return 0
    variants = [args.variant] if args.variant else [first_variant(flags)]
    if not args.variant and variants[0] != "portable":
        variants.append("portable")
    for variant in variants:
        cmake_args = build_plan(flags, variant)
        key = hashlib.sha256(f"{VERSION} {variant} {' '.join(cmake_args + COMMON_ARGS)} {sig}".encode()).hexdigest()[:16]
        wheel = build_wheel(cmake_args, f"{VERSION}-{variant}-{key}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheel)],
                       check=True)
        if smoke_test():
            write_record({"version": VERSION, "variant": variant, "cmake_args": cmake_args, "cpu_model": model,
                          "cpu_signature": sig, "smoke_test": "passed"})
            print(f"[llama.cpp] installed the {variant} build for {model}")
            return 0
        print(f"[llama.cpp] the {variant} build failed its smoke test on this CPU; trying the next one")
    print("[llama.cpp] no build passed the smoke test; slimlm will use the torch backend only", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "llama-cpp-python"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
