"""`slimlm moe train`: train an upcycled (or pruned) mixture of experts back towards its dense parent.

Every published upcycle trains after the split: copied experts are identical and a neuron split
starts far from its parent (on SmolLM2-135M, 8 experts with 2 active start at a KL of about 2.5 nats
per token to the parent; bench/moe.py). The default recovery recipe is distillation from the parent
(slimlm distill's logit mode: forward KL to the cached teacher top-k, mixed with cross-entropy),
plus the two router losses (losses.py). What trains is a choice:

- router: only the routers (cheap; fixes where tokens go, not what experts compute);
- experts: routers and experts (attention, norms and embeddings frozen);
- all: everything (the default).

The teacher defaults to the parent named in the model's manifest (slimlm.json, written by
`moe upcycle`), so `slimlm moe train ./moe python-docs.txt --out ./moe-trained` needs nothing else.
The settings are one `MoeTrainConfig`, which a YAML recipe can hold (strictly, as every config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.train.configs import DistillConfig
from slimlm.train.core import TrainConfig
from slimlm.train.distill import DistillExtension, distill
from slimlm.train.moe.blocks import read_moe_config, require_moe

TRAIN_PARTS = {"router": "only the routers", "experts": "routers and experts", "all": "every weight"}


@dataclass
class MoeTrainConfig:
    parts: str = "all"  # router, experts or all (TRAIN_PARTS)
    aux_weight: float = 0.01  # load-balancing loss weight (Switch Transformer used 0.01)
    z_weight: float = 0.001  # router z-loss weight (ST-MoE used 0.001)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(weight_ce=0.5, train=TrainConfig(lr=1e-4)))

    def validate(self) -> MoeTrainConfig:
        if self.parts not in TRAIN_PARTS:
            raise SlimlmError(f"unknown --train '{self.parts}': choose {', '.join(TRAIN_PARTS)}")
        if self.aux_weight < 0 or self.z_weight < 0:
            raise SlimlmError("--aux-weight and --z-weight must be at least 0")
        if self.distill.method != "full":
            raise SlimlmError("moe train trains the MoE's own weights (method full): LoRA on fused experts is "
                              "not supported")
        return self


class MoeExtension(DistillExtension):
    def __init__(self, cfg: MoeTrainConfig):
        self.cfg = cfg
        self.settings = {"moe_parts": cfg.parts, "moe_aux_weight": cfg.aux_weight, "moe_z_weight": cfg.z_weight}
        self.losses = None  # losses.RouterLosses, made with the model (imported then: it needs torch)

    def prepare(self, model) -> None:
        layers = require_moe(model)
        if self.cfg.parts == "all":
            return
        model.requires_grad_(False)
        for layer in layers:
            layer.block.gate.requires_grad_(True)
            if self.cfg.parts == "experts":
                layer.experts.requires_grad_(True)

    def wrap_loss(self, loss_fn, model):
        from slimlm.train.moe.losses import RouterLosses

        self.losses = RouterLosses(loss_fn, model, self.cfg.aux_weight, self.cfg.z_weight)
        return self.losses


def manifest_parent(model: str | Path) -> str | None:
    """The parent model reference an upcycled folder's manifest names, if any."""
    from slimlm.runs import MANIFEST

    path = Path(model) / MANIFEST
    if not path.is_file():
        return None
    parent = json.loads(path.read_text()).get("parent") or {}
    return parent.get("spec") or parent.get("path")


def moe_train(model: str | Path, data, out: str | Path, teacher: str | None = None,
              config: MoeTrainConfig | None = None, *, resume: bool = False, force: bool = False,
              record_run: bool = True, progress: bool = True):
    """Train the MoE `model` on `data` into `out` (a DistillResult); teacher: the manifest's parent by default."""
    cfg = (config or MoeTrainConfig()).validate()
    read_moe_config(model)  # a dense model fails here, before OUT is touched
    teacher = teacher or manifest_parent(model)
    if teacher is None:
        raise SlimlmError(f"{model} has no manifest naming its parent: give the dense teacher with --teacher")
    return distill(teacher, model, data, out, replace(cfg.distill), resume=resume, force=force,
                   record_run=record_run, progress=progress, extension=MoeExtension(cfg))
