"""Inference backends behind one interface (base.py), kept in a registry as models/families.py
keeps families: a new backend is one module with a Backend subclass plus one line in BACKENDS.

    from slimlm.models.backends import open_backend
    backend = open_backend("smollm2-135m-instruct")        # or a ModelRef resolved once upstream
    print(backend.generate("Name a prime.").text)
"""

from __future__ import annotations

from slimlm.errors import SlimlmError
from slimlm.models.backends.base import CAPABILITIES, Backend, Completion, GenerationParams, Timings
from slimlm.models.backends.llamacpp import LlamaCppBackend
from slimlm.models.backends.torch_backend import TorchBackend
from slimlm.models.reference import ModelRef

# name -> class. The order is the order of the CLI's --backend help; `auto` asks each class
# whether it `prefers` the model and falls back to DEFAULT_BACKEND.
BACKENDS: dict[str, type[Backend]] = {
    "torch": TorchBackend,
    "llamacpp": LlamaCppBackend,
}
DEFAULT_BACKEND = "torch"


def backend_help() -> str:
    """The --backend help text, from the registry."""
    *first, last = BACKENDS
    return f"auto (llama.cpp for GGUF files, torch for folders), {', '.join(first)}, or {last}."


def llama_cpp_available() -> bool:
    from slimlm.hardware import llama_cpp_build_problem

    return llama_cpp_build_problem() is None


def pick_backend(ref: ModelRef, backend: str = "auto") -> str:
    """The registry name `backend` means for `ref`: itself, or for `auto` the first backend that
    prefers the model (GGUF files go to llama.cpp, measured several times faster at decode on a
    CPU), else torch."""
    if backend != "auto" and backend not in BACKENDS:
        raise SlimlmError(f"unknown backend '{backend}': choose one of {', '.join(('auto', *BACKENDS))}")
    if backend != "auto":
        return backend
    return next((name for name, cls in BACKENDS.items() if cls.prefers(ref)), DEFAULT_BACKEND)


def open_backend(model: ModelRef | str, backend: str = "auto", **kwargs) -> Backend:
    """Load `model` on the chosen backend. Pass the ModelRef when the caller resolved it already
    (a string, Path or built-in name is resolved here); `kwargs` go to the backend's class. Every
    backend takes `threads` (CPU threads; default: the physical cores) and `n_ctx`."""
    from slimlm.models.reference import resolve

    ref = resolve(model)
    return BACKENDS[pick_backend(ref, backend)](ref, **kwargs)


__all__ = ["BACKENDS", "CAPABILITIES", "Backend", "Completion", "GenerationParams", "Timings", "backend_help",
           "open_backend", "pick_backend"]
