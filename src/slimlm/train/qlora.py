"""LoRA on a slimlm-quantized base, QLoRA-style: the base stays packed and frozen, and only the
adapter trains in full precision.

`slimlm quantize --format hf --bits 4` writes linears that slimlm loads as `PackedLinear`: codes
plus scales, dequantized inside forward (models/packed.py). peft does not know that module, so
it is registered with peft's custom-module hook (`LoraConfig._register_custom_module`, which peft
marks experimental) as an ordinary LoRA Linear around it: the LoRA arithmetic is peft's own;
only the base's forward is ours. What this saves is memory: at 4 bits the base weights take about
an eighth of fp32's size during training (codes plus fp16 scales). Merging an adapter into packed
codes would need a requantization, so merging is refused; merge into the unquantized model instead.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from slimlm.errors import SlimlmError


@contextmanager
def quiet_peft():
    """peft warns "Unsupported layer type ... proceed at your own risk" about every packed module
    it wraps through the custom-module hook; this module is that support, and tests check it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        yield


def packed_linear_class():
    from slimlm.models.packed import packed_linear_class as packed

    return packed()


def has_packed(model) -> bool:
    """True when the model holds slimlm-quantized (packed) linears."""
    packed = packed_linear_class()
    return any(isinstance(m, packed) for m in model.modules())


def _lora_on_packed_class():
    from peft.tuners.lora.layer import Linear

    class LoraOnPacked(Linear):
        """peft's LoRA Linear around a PackedLinear; the base is never modified."""

        def merge(self, *args, **kwargs):
            raise SlimlmError("cannot merge a LoRA adapter into a quantized (packed) base: train the adapter on the "
                              "unquantized model to merge it, or serve the adapter on top of the quantized base")

    return LoraOnPacked


def register(config) -> None:
    """Teach a peft LoraConfig to wrap PackedLinear modules (no-op for configs of other methods)."""
    config._register_custom_module({packed_linear_class(): _lora_on_packed_class()})


def load_adapter(base, path, adapter_name: str = "default"):
    """PeftModel.from_pretrained(base, path), also when `base` is a slimlm-quantized model."""
    from peft import LoraConfig, PeftModel

    if not has_packed(base):
        return PeftModel.from_pretrained(base, path, adapter_name=adapter_name)
    config = LoraConfig.from_pretrained(path)
    register(config)
    with quiet_peft():
        return PeftModel.from_pretrained(base, path, adapter_name=adapter_name, config=config)
