"""Make a mixture of experts smaller by removing whole experts, chosen by how calibration text routes.

The config holds one routed-expert count for every layer, so every MoE layer keeps the same number of
experts, each layer its own ones: the `keep` experts its router sends the most calibration tokens to
(slimlm.train.moe.stats measures it, once, on the original model: a later layer's routing is not
re-measured after an earlier layer's experts are cut). What a method does before the rest are cut is its class in
EXPERT_PRUNERS:

- least-routed: nothing; the dropped experts' tokens go to their next choice. An expert that is
  never chosen leaves the outputs exactly as they were.
- merge: each dropped expert is first folded into the kept expert whose *output* is most alike, as a
  usage-weighted average of their weights (see Merge for why outputs and why the router row is kept).

Router rows, expert tensors (anything of the router or experts whose first dimension is the expert
count, so DeepSeek V3's e_score_correction_bias too) are sliced, the config's expert count and experts
per token (`active`, by default the old top-k or `keep` if fewer) updated, and the model saved as a
Hugging Face folder of the same family that AutoModelForCausalLM loads. Removing experts loses quality:
check with `slimlm eval`, and train it back (`slimlm moe train`, distillation from the original).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.registry import Registry
from slimlm.train.moe.blocks import MoeLayer, moe_keys, read_moe_config, require_moe
from slimlm.train.moe.stats import LayerStats, moe_stats

__all__ = ["EXPERT_PRUNERS", "ExpertPruner", "ExpertPruneResult", "prune_experts", "register_expert_pruner"]


class ExpertPruner:
    """Which experts a layer keeps, and what happens to the kept ones before the others are cut."""

    name: str = ""
    help: str = ""
    inputs: int = 0  # router inputs per layer the method needs from calibration (moe_stats keep_inputs)

    def choose(self, stats: LayerStats, keep: int) -> list[int]:
        """The `keep` experts with the most assignments (ties: the higher mean router probability), ascending."""
        order = sorted(range(len(stats.counts)), key=lambda i: (-stats.counts[i], -stats.router_prob[i], i))
        return sorted(order[:keep])

    def fold(self, layer: MoeLayer, kept: list[int], stats: LayerStats, inputs) -> dict[int, int]:
        """Change the kept experts in place before the others are cut; returns {dropped: kept it went into}."""
        return {}


EXPERT_PRUNERS: Registry[ExpertPruner] = Registry("expert pruning method", ExpertPruner, unknown="method")
register_expert_pruner = EXPERT_PRUNERS.register


@register_expert_pruner("least-routed")
class LeastRouted(ExpertPruner):
    help = "drop the experts calibration text is routed to least (their tokens go to their next choice)"


@register_expert_pruner("merge")
class Merge(ExpertPruner):
    """Fold each dropped expert into the kept expert whose outputs on calibration tokens are most alike.

    Similarity is the cosine between the two experts' outputs on the same router inputs, not between
    their weights: two experts can compute nearly the same function with their intermediate neurons in
    a different order, which weight cosine calls unrelated. The merged weights are the usage-weighted
    average (assignments as weights) of the kept expert and those folded into it; that average is
    exact for experts that share a neuron order (upcycled ones, slimlm's own MoEs), and for experts
    trained apart it loses more: compare with least-routed on `slimlm eval`. The kept expert's router
    row is kept as it is: it already decides which tokens the expert gets, and an average of two router
    rows pointing different ways is shorter, so the merged expert would win fewer tokens than either."""

    help = ("drop the least-routed experts, each merged into the kept expert with the most similar output "
            "(usage-weighted average of weights)")
    inputs = 512

    def fold(self, layer: MoeLayer, kept: list[int], stats: LayerStats, inputs) -> dict[int, int]:
        import torch

        similarity = _output_similarity(layer, inputs)
        dropped = [i for i in range(layer.num_experts) if i not in kept]
        into = {d: kept[int(similarity[d, kept].argmax())] for d in dropped}
        usage = torch.tensor(stats.counts, dtype=torch.float64)
        with torch.no_grad():
            for target in kept:
                group = [target, *(d for d, t in into.items() if t == target)]
                weights = usage[group]
                if len(group) == 1 or weights.sum() == 0:
                    continue  # nothing folded in, or no usage to weigh by: the kept expert stays as it was
                weights = weights / weights.sum()
                for tensor in _expert_tensors(layer.experts, layer.num_experts):
                    merged = (weights.to(tensor.dtype)[:, None] * tensor[group].flatten(1)).sum(0)
                    tensor[target] = merged.view_as(tensor[target])
        return into


def _output_similarity(layer: MoeLayer, inputs, chunk: int = 128):
    """E x E cosine between the experts' outputs on `inputs` (flattened over tokens), in chunks of tokens."""
    import torch

    e = layer.num_experts
    gram = torch.zeros(e, e, dtype=torch.float64)
    with torch.no_grad():
        for at in range(0, len(inputs), chunk):
            x = inputs[at:at + chunk].to(layer.router.dtype)
            ones = torch.ones(len(x), 1, dtype=x.dtype)
            ys = torch.stack([layer.experts(x, torch.full((len(x), 1), i), ones) for i in range(e)]).flatten(1)
            gram += (ys.double() @ ys.double().T)
    norms = gram.diagonal().sqrt().clamp(min=1e-12)
    return gram / norms[:, None] / norms[None, :]


def _expert_tensors(module, e: int) -> list:
    """The module's own parameters and buffers with one slice per expert (first dimension == e)."""
    return [t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)] if t.dim() and t.shape[0] == e]


def _cut(layer: MoeLayer, kept: list[int], active: int) -> None:
    """Keep only the `kept` experts of the router and the experts module, and route to `active` of them."""
    import torch
    from torch import nn

    e, index = layer.num_experts, torch.tensor(kept)
    for module in (layer.block.gate, layer.experts):
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.dim() and tensor.shape[0] == e:
                sliced = tensor.data[index].clone()
                setattr(module, name, nn.Parameter(sliced, tensor.requires_grad)
                        if isinstance(tensor, nn.Parameter) else sliced)
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)
    for module in (layer.block, layer.block.gate):
        if hasattr(module, "top_k"):
            module.top_k = active


@dataclass
class ExpertPruneResult:
    out: str
    method: str
    experts_before: int
    experts_after: int
    top_k_before: int
    top_k_after: int
    params_before: int
    params_after: int
    tokens: int  # calibration tokens the routing was measured on
    seconds: float
    kept: dict = field(default_factory=dict)  # layer -> the original indices of the experts kept
    merged: dict = field(default_factory=dict)  # layer -> {dropped expert: kept expert it was merged into}
    dropped_share: dict = field(default_factory=dict)  # layer -> share of assignments the dropped experts had
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _amounts(config, keep: int | None, ratio: float | None, active: int | None) -> tuple[int, int]:
    """(experts to keep, experts per token), or a one-line error for an impossible request."""
    experts_key, used_key = moe_keys(config)
    total, top_k = int(getattr(config, experts_key)), int(getattr(config, used_key))
    if (keep is None) == (ratio is None):
        raise SlimlmError("say how many experts to keep with exactly one of --keep or --ratio")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise SlimlmError(f"--ratio {ratio} must be in (0, 1): the fraction of the {total} experts to remove")
        keep = total - round(total * ratio)
        if keep >= total:
            raise SlimlmError(f"--ratio {ratio} removes none of the {total} experts: the smallest ratio that "
                              f"removes one is {1 / total:.3g}")
    if keep < 1:
        raise SlimlmError(f"--keep {keep} must be at least 1")
    if keep >= total:
        raise SlimlmError(f"--keep {keep} is not fewer than the model's {total} experts: keep at most {total - 1}")
    active = min(top_k, keep) if active is None else active
    if active < 1:
        raise SlimlmError(f"--active {active} must be at least 1: the experts each token is routed to")
    if keep < active:
        raise SlimlmError(f"--active {active} is more than the {keep} experts kept: the largest --active for "
                          f"--keep {keep} is {keep}, or keep at least {active}")
    groups = int(getattr(config, "n_group", 1) or 1)
    if groups > 1:
        raise SlimlmError(f"group-limited routing (n_group {groups}) is not supported by expert pruning: "
                          "experts are grouped by position, and cutting them per layer breaks the groups")
    return keep, active


def prune_experts(model: str | Path, out: str | Path, keep: int | None = None, ratio: float | None = None, *,
                  method: str = "least-routed", active: int | None = None, texts=None,
                  calib_tokens: int = 32_768, seq_len: int = 256, force: bool = False, record: bool = True,
                  progress: bool = True) -> ExpertPruneResult:
    """Remove experts from the MoE model `model` (a reference) into the folder `out`: keep `keep`
    experts per layer (or remove the fraction `ratio`), route each token to `active` of them.
    `texts`: documents, or a corpus name or file as `--data` takes (default python-docs' calibration part)."""
    from slimlm.models.loading import load_torch

    pruner = EXPERT_PRUNERS.create(method)
    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    ref, config = read_moe_config(model)
    keep, active = _amounts(config, keep, ratio, active)
    start = time.perf_counter()
    torch_model, tokenizer = load_torch(ref)
    layers = require_moe(torch_model)
    experts_key, used_key = moe_keys(torch_model.config)
    stats = moe_stats(torch_model, texts, calib_tokens, seq_len, tokenizer=tokenizer, keep_inputs=pruner.inputs,
                      record=False, progress=progress)
    total, top_k = layers[0].num_experts, int(getattr(torch_model.config, used_key))
    params_before = sum(p.numel() for p in torch_model.parameters())
    result = ExpertPruneResult(out=str(out), method=method, experts_before=total, experts_after=keep,
                               top_k_before=top_k, top_k_after=active, params_before=params_before,
                               params_after=params_before, tokens=stats.tokens, seconds=0.0)
    for layer, layer_stats in zip(layers, stats.layers):
        kept = pruner.choose(layer_stats, keep)
        merged = pruner.fold(layer, kept, layer_stats, stats.inputs.get(layer.index))
        _cut(layer, kept, active)
        result.kept[layer.index] = kept
        result.dropped_share[layer.index] = 1.0 - sum(layer_stats.share[i] for i in kept)
        if merged:
            result.merged[layer.index] = merged
    setattr(torch_model.config, experts_key, keep)
    setattr(torch_model.config, used_key, active)
    if active != top_k:
        result.notes.append(f"experts per token changed from {top_k} to {active}")
    result.params_after = sum(p.numel() for p in torch_model.parameters())
    result.seconds = time.perf_counter() - start
    _save(torch_model, tokenizer, ref, out, force, result)
    if record:
        from slimlm.runs import record as record_run

        record_run("moe prune", ref, params={"method": method, "keep": keep, "ratio": ratio, "active": active,
                                             "out": str(out)}, metrics=result.to_dict(), artifact=out)
    return result


def _save(model, tokenizer, ref, out: Path, force: bool, result: ExpertPruneResult) -> None:
    """Write the folder atomically, in the source's precision (calibration ran in float32), with its manifest."""
    import torch

    from slimlm.models.loading import atomic_dir, dense_folder, read_config
    from slimlm.runs import write_manifest

    source = read_config(dense_folder(ref))
    dtype = getattr(torch, str(source.get("dtype") or source.get("torch_dtype") or "float32"), torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        model = model.to(dtype)
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, parent=ref, operation="moe prune",
                       params={"method": result.method, "keep": result.experts_after, "active": result.top_k_after},
                       metrics=result.to_dict())
