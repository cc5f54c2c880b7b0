#!/usr/bin/env python3
"""Build llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity) for
the benchmarks, from the llama.cpp that llama-cpp-python's source distribution vendors.

Why build them: the bindings expose the quantizer but not the importance-matrix tool nor
`llama-perplexity`, and those are the peer's yardsticks (issue 5 compares slimlm's KL and
perplexity with `llama-perplexity --kl-divergence` on the same files). The tools are built from
the same llama.cpp version slimlm runs and with the same CMake flags as the bindings that
scripts/install_llama_cpp.py installed on this CPU (its record names them), so both sides of a
comparison run the same kernels: two builds with different SIMD paths round quantized dot
products differently, which shows in KL divergences of a few thousandths of a nat. The build goes
into a cache folder outside the repository keyed by version, flags and CPU.

    python bench/llama_tools.py            # build (several minutes on 2 cores) and print the folder
    python bench/llama_tools.py --check    # print the folder if built, exit 1 if not
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from install_llama_cpp import VERSION, build_plan, first_variant  # noqa: E402

from slimlm.hardware import cpu_info, cpu_signature, llama_cpp_build  # noqa: E402

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def cmake_flags() -> list[str]:
    """The installed bindings' flags, or (no record) the choice the installer would make first."""
    recorded = (llama_cpp_build() or {}).get("cmake_args")
    if recorded:
        return list(recorded)
    flags = cpu_info().flags
    return build_plan(flags, first_variant(flags))


def tools_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    key = hashlib.sha256(" ".join(cmake_flags()).encode()).hexdigest()[:8]
    return root / "slimlm" / "llama-tools" / f"{VERSION}-{cpu_signature()}-{key}"


def built() -> Path | None:
    folder = tools_dir()
    return folder if all((folder / t).exists() for t in TOOLS) else None


def _sdist(work: Path) -> Path:
    """The vendored llama.cpp source tree from the llama-cpp-python sdist (PyPI)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(work), f"llama-cpp-python=={VERSION}"], check=True)
    archive = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def build() -> Path:
    if (folder := built()) is not None:
        return folder
    work = Path(tempfile.mkdtemp(prefix="llama-tools-"))
    src = _sdist(work)
    args = cmake_flags()
    build_dir = work / "build"
    print(f"[llama-tools] building {', '.join(TOOLS)} {VERSION} with {' '.join(args)}", flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", *args], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                   check=True, stdout=subprocess.DEVNULL)
    folder = tools_dir()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        os.replace(build_dir / "bin" / tool, tmp / tool)
    os.replace(tmp, folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the tools are built")
    args = parser.parse_args()
    folder = built() if args.check else build()
    if folder is None:
        print("not built: run python bench/llama_tools.py", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
