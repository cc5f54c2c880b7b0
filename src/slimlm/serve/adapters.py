"""LoRA adapters served beside their base model as MODEL:ADAPTER, on one copy of the weights.

Loading and switching are the backend's (`apply_adapters`, `use_adapter`; on torch, PEFT layers
injected into the base model's own modules: models/backends/torch_adapters.py). The server adds
the names clients ask for, and slimlm's own adapter loader, which also wraps a slimlm-quantized
base (train/qlora.py). The worker switches before each request, under the engine's lock, so
requests for different adapters can interleave safely.

llama.cpp takes a LoRA file when a model is opened, one per handle, so serving several adapters
would mean several handles; slimlm does not do that yet and says so (the backend raises) instead
of silently serving the base model.
"""

from __future__ import annotations


class AdapterSet:
    """The adapters loaded on one backend; `use(name)` selects one (None: the base model)."""

    def __init__(self, backend, adapters: dict[str, str]) -> None:
        self.names: list[str] = list(adapters)
        self.backend = backend
        if not adapters:
            return
        loader = None
        if backend.supports("adapters"):  # else apply_adapters says why not
            from slimlm.train.qlora import load_adapter as loader  # also on a slimlm-quantized base
        backend.apply_adapters(adapters, loader=loader)

    def use(self, name: str | None) -> None:
        if self.names:
            self.backend.use_adapter(name)
