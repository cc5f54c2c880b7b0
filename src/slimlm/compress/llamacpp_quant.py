"""llama.cpp's own quantizer, called through llama-cpp-python: the baseline slimlm's methods are
measured against, and the way to get llama.cpp's K-quants and I-quants (Q4_K_M, Q6_K, IQ4_XS...).

The input is an f32 GGUF that slimlm exports from the Hugging Face folder, so both slimlm's and
llama.cpp's files start from the same weights. Importance matrices need llama.cpp's `imatrix`
tool, which the Python bindings do not expose; this path quantizes without one.
"""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import BackendUnavailable, SlimlmError

_PREFIX = "LLAMA_FTYPE_MOSTLY_"


def llamacpp_types() -> dict[str, int]:
    """Quantization types this llama.cpp build offers, by name (Q4_K_M, Q8_0, ...)."""
    from slimlm.hardware import llama_cpp_build_problem

    problem = llama_cpp_build_problem()
    if problem:
        raise BackendUnavailable(problem)
    import llama_cpp

    return {name[len(_PREFIX):]: getattr(llama_cpp, name) for name in dir(llama_cpp) if name.startswith(_PREFIX)}


def check_type(name: str) -> str:
    types = llamacpp_types()
    key = name.upper()
    if key not in types:
        raise SlimlmError(f"llama.cpp offers no type '{name}': choose one of {', '.join(sorted(types))}")
    return key


def llamacpp_quantize(source: Path, out: Path, type_name: str, threads: int | None = None) -> Path:
    """Quantize the GGUF `source` into `out` with llama.cpp's quantizer (its own tensor choices:
    e.g. Q4_K_M keeps some tensors at Q6_K)."""
    import llama_cpp

    from slimlm.hardware import default_threads

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llamacpp_types()[check_type(type_name)]
    params.nthread = threads or default_threads()
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor on the C streams
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0 or not Path(out).exists():
        raise SlimlmError(f"llama.cpp's quantizer failed on {source} (status {status}) for type {type_name}")
    return Path(out)
