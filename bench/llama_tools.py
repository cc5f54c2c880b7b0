#!/usr/bin/env python3
"""Build llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity, and
on request llama-server) for the benchmarks, from the llama.cpp that llama-cpp-python's source
distribution vendors.

Why build them: the bindings expose the quantizer but not the importance-matrix tool nor
`llama-perplexity`, and those are the peer's yardsticks (issue 5 compares slimlm's KL and
perplexity with `llama-perplexity --kl-divergence` on the same files). The tools are built from
the same llama.cpp version slimlm runs and with the same CMake flags as the bindings that
scripts/install_llama_cpp.py installed on this CPU (its record names them), so both sides of a
comparison run the same kernels: two builds with different SIMD paths round quantized dot
products differently, which shows in KL divergences of a few thousandths of a nat. The build goes
into a cache folder outside the repository keyed by version, flags and CPU. llama-server (the
peer of `slimlm serve` under load, bench/serve_load.py) is built on request, into the same folder.

    python bench/llama_tools.py            # build (several minutes on 2 cores) and print the folder
    python bench/llama_tools.py --server   # also llama-server
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
SERVER = "llama-server"


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


def built(tools=TOOLS) -> Path | None:
    folder = tools_dir()
    return folder if all((folder / t).exists() for t in tools) else None


def _sdist(work: Path) -> Path:
    """The vendored llama.cpp source tree from the llama-cpp-python sdist (PyPI)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(work), f"llama-cpp-python=={VERSION}"], check=True)
    archive = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def build(tools=TOOLS) -> Path:
    """The folder holding `tools`, building the missing ones."""
    folder = tools_dir()
    missing = [t for t in tools if not (folder / t).exists()]
    if not missing:
        return folder
    work = Path(tempfile.mkdtemp(prefix="llama-tools-"))
    src = _sdist(work)
    args = cmake_flags()
    build_dir = work / "build"
    print(f"[llama-tools] building {', '.join(missing)} {VERSION} with {' '.join(args)}", flush=True)
    server = "ON" if SERVER in missing else "OFF"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DLLAMA_BUILD_SERVER={server}",
                    "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", *args], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2), "--target", *missing],
                   check=True, stdout=subprocess.DEVNULL)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for tool in tools:  # the ones already built come along, so the folder appears whole, by one rename
        old = folder / tool
        os.replace(build_dir / "bin" / tool if tool in missing else old, tmp / tool)
    if folder.exists():
        for leftover in folder.iterdir():
            os.replace(leftover, tmp / leftover.name)
        folder.rmdir()
    os.replace(tmp, folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the tools are built")
    parser.add_argument("--server", action="store_true", help="llama-server too")
    args = parser.parse_args()
    tools = (*TOOLS, SERVER) if args.server else TOOLS
    folder = built(tools) if args.check else build(tools)
    if folder is None:
        print("not built: run python bench/llama_tools.py", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
