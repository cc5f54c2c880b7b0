"""LoRA adapters served beside their base model as MODEL:ADAPTER, on one copy of the weights.

On torch, PEFT's `PeftModel` injects each adapter's low-rank layers into the base model's own
modules (in place), so every adapter shares the base weights and switching is a flag per layer:
`set_adapter(name)` for an adapter, `disable_adapter_layers()` for the plain base model. The
worker switches before each request, under the engine's lock, so requests for different adapters
can interleave safely.

With adapters, decode runs in the prefill precision: the torch backend may keep a second,
half-precision copy of the weights for decode, and that copy would need LoRA layers of its own.

llama.cpp takes a LoRA file when a model is opened (llama-cpp-python's `lora_path`), one per
handle, so serving several adapters would mean several handles; slimlm does not do that yet and
says so instead of silently serving the base model.
"""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimlmError


class AdapterSet:
    """The adapters loaded on one backend; `use(name)` selects one (None: the base model)."""

    def __init__(self, backend, adapters: dict[str, str]) -> None:
        self.names: list[str] = list(adapters)
        self._peft = None
        self._current: str | None = "<none>"
        if not adapters:
            return
        if backend.name != "torch":
            raise SlimlmError(f"adapters need the torch backend ({backend.name} opens LoRA files per model): serve "
                              "a Hugging Face folder with --backend torch, or merge the adapter into the model")
        for name, path in adapters.items():
            if not (Path(path) / "adapter_config.json").is_file():
                raise SlimlmError(f"--adapter {name}={path}: no adapter_config.json there: pass a folder "
                                  "written by PEFT's save_pretrained")
        try:
            import peft  # noqa: F401  (present?)
        except ImportError:
            raise SlimlmError("serving adapters needs PEFT: pip install peft") from None
        if backend.plan.split:
            from dataclasses import replace

            backend.decode_model = backend.model
            backend.plan = replace(backend.plan, decode=backend.plan.prefill, reason="adapters: one copy of the weights",
                                   onednn=tuple(d for d in backend.plan.onednn if d == backend.plan.prefill))
        items = list(adapters.items())
        try:
            from slimlm.train.qlora import load_adapter  # also on a slimlm-quantized base

            self._peft = load_adapter(backend.model, items[0][1], adapter_name=items[0][0])
            for name, path in items[1:]:
                self._peft.load_adapter(path, adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SlimlmError(f"cannot load the adapters on {backend.ref.spec} ({first}): an adapter must be "
                              "trained for this base model") from None
        self._peft.eval()

    def use(self, name: str | None) -> None:
        if self._peft is None or name == self._current:
            return
        if name is None:
            self._peft.base_model.disable_adapter_layers()
        else:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(name)
        self._current = name
