"""LoRA adapters on the torch backend's weights, several at once, switched per request.

PEFT's `PeftModel` injects each adapter's low-rank layers into the base model's own modules (in
place), so every adapter shares the base weights and switching is a flag per layer:
`set_adapter(name)` for an adapter, `disable_adapter_layers()` for the plain base model.

With adapters, decode runs in the prefill precision: the torch backend may keep a second,
half-precision copy of the weights for decode, and that copy would need LoRA layers of its own.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from slimlm.errors import SlimlmError


def load_adapters(backend, adapters: dict[str, str], loader=None):
    """Load {name: PEFT folder} onto `backend.model`; returns the PeftModel. `loader(base, path,
    adapter_name)` loads the first one (default: PEFT's own); the server passes slimlm's, which
    also wraps a slimlm-quantized base (train/qlora.py), a layer this package may not import."""
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise SlimlmError(f"--adapter {name}={path}: no adapter_config.json there: pass a folder "
                              "written by PEFT's save_pretrained")
    try:
        import peft  # noqa: F401  (present?)
    except ImportError:
        raise SlimlmError("serving adapters needs PEFT: pip install peft") from None
    plan = backend.plan
    if plan.split:
        backend.decode_model = backend.model
        backend.plan = replace(plan, decode=plan.prefill, reason="adapters: one copy of the weights",
                               onednn=tuple(d for d in plan.onednn if d == plan.prefill))
    if loader is None:
        from peft import PeftModel

        def loader(base, path, adapter_name):
            return PeftModel.from_pretrained(base, path, adapter_name=adapter_name)

    items = list(adapters.items())
    try:
        model = loader(backend.model, items[0][1], adapter_name=items[0][0])
        for name, path in items[1:]:
            model.load_adapter(path, adapter_name=name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimlmError(f"cannot load the adapters on {backend.ref.spec} ({first}): an adapter must be "
                          "trained for this base model") from None
    model.eval()
    return model


def switch(peft_model, name: str | None) -> None:
    """Turn the adapter `name` on (None: all off, the plain base model)."""
    if name is None:
        peft_model.base_model.disable_adapter_layers()
    else:
        peft_model.base_model.enable_adapter_layers()
        peft_model.set_adapter(name)
