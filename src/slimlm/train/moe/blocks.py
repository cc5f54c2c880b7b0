"""Where a transformers MoE model keeps its router and experts, for every MoE family slimlm edits.

transformers (v5) stores each sparse MoE block the same way for Mixtral, Qwen-MoE and DeepSeek V3:
`block.gate.weight` is the router, one row per expert, shape [E, hidden]; `block.experts` holds
`gate_up_proj` [E, 2 * I, hidden] (the gate projection's I rows, then the up projection's) and
`down_proj` [E, hidden, I]. Upcycling, stats and pruning ask this module, never the family name,
so a new MoE family with this layout needs only its entry in models/families.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.models.families import FAMILIES


@dataclass
class MoeLayer:
    index: int  # decoder layer number
    block: object  # the sparse MoE block (torch module)

    @property
    def router(self):
        """The router's weight, [experts, hidden]: logits = hidden_states @ router.T."""
        return self.block.gate.weight

    @property
    def experts(self):
        return self.block.experts

    @property
    def num_experts(self) -> int:
        return int(self.router.shape[0])

    @property
    def expert_width(self) -> int:
        """Intermediate neurons per routed expert."""
        return int(self.experts.down_proj.shape[-1])


def moe_layers(model) -> list[MoeLayer]:
    """The model's sparse MoE blocks, in layer order (dense layers, as DeepSeek's first ones, skipped)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise SlimlmError(f"{type(model).__name__} has no decoder layers (model.model.layers)")
    found = []
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if block is not None and hasattr(block, "gate") and hasattr(getattr(block, "experts", None), "down_proj"):
            found.append(MoeLayer(i, block))
    return found


def moe_keys(config) -> tuple[str, str]:
    """(config key of the routed expert count, config key of the experts per token) for its family."""
    fam = FAMILIES.get(getattr(config, "model_type", None))
    if fam is None or not fam.is_moe:
        moe = ", ".join(f.model_type for f in FAMILIES.values() if f.is_moe)
        raise SlimlmError(f"{getattr(config, 'model_type', '?')} is not a mixture-of-experts family slimlm knows: "
                          f"one of {moe}")
    return fam.experts_key, fam.experts_used_key


def read_moe_config(model):
    """(resolved reference, transformers config) of a model reference, or the one-line error of
    moe_keys for a dense model: what every MoE verb checks before it loads any weight."""
    from transformers import AutoConfig

    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    ref = resolve(str(model))
    config = AutoConfig.from_pretrained(dense_folder(ref), local_files_only=True)
    moe_keys(config)
    return ref, config


def require_moe(model) -> list[MoeLayer]:
    """moe_layers, or a one-line error for a dense model."""
    moe_keys(model.config)
    layers = moe_layers(model)
    if not layers:
        raise SlimlmError(f"{model.config.model_type} model has no sparse MoE blocks in the layout slimlm edits")
    return layers
