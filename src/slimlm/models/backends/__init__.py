"""Inference backends behind one interface: torch/transformers and llama.cpp."""

from __future__ import annotations

from slimlm.errors import SlimlmError
from slimlm.models.backends.base import Backend, Completion, GenerationParams, Timings

BACKENDS = ("auto", "torch", "llamacpp")


def llama_cpp_available() -> bool:
    from slimlm.hardware import llama_cpp_build_problem

    return llama_cpp_build_problem() is None


def pick_backend(ref, backend: str = "auto") -> str:
    """GGUF files go to llama.cpp (measured several times faster at decode on a CPU), folders to torch."""
    if backend not in BACKENDS:
        raise SlimlmError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "llamacpp" if ref.kind == "gguf" and llama_cpp_available() else "torch"


def open_backend(model, backend: str = "auto", **kwargs) -> Backend:
    """Load `model` (folder, GGUF file or built-in name) on the chosen backend."""
    from slimlm.models.reference import resolve

    ref = resolve(model)
    chosen = pick_backend(ref, backend)
    if chosen == "llamacpp":
        from slimlm.models.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(ref, **kwargs)
    from slimlm.models.backends.torch_backend import TorchBackend

    return TorchBackend(ref, **kwargs)


__all__ = ["BACKENDS", "Backend", "Completion", "GenerationParams", "Timings", "open_backend", "pick_backend"]
