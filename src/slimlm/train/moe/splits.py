"""How a dense MLP becomes N experts (`slimlm moe upcycle --split`), one class per way, in a registry.

A split sees one decoder layer's MLP weights (gate and up: [I, hidden]; down: [hidden, I]) and,
if it asks for them, the layer's MLP inputs on calibration text; it returns the experts' weights
and the router's. The upcycler (upcycle.py) does everything else: config, copying attention and
norms, saving. A new split is one class here with `@UPCYCLE_SPLITS.register("name")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from slimlm.registry import Registry
from slimlm.train.moe.partition import assign_neurons, check_split, cluster_scores, cluster_tokens, mlp_activity

if TYPE_CHECKING:  # torch is imported where it runs: the CLI builds its help from these modules
    import torch


@dataclass
class DenseMLP:
    gate: torch.Tensor  # [I, hidden]
    up: torch.Tensor  # [I, hidden]
    down: torch.Tensor  # [hidden, I]
    act: object  # the activation (silu for every family upcycled so far)


@dataclass
class Experts:
    gate: torch.Tensor  # [N, width, hidden]
    up: torch.Tensor  # [N, width, hidden]
    down: torch.Tensor  # [N, hidden, width]
    router: torch.Tensor  # [N, hidden]
    neurons: list | None = None  # each expert's parent neurons (neurons split), for the manifest
    # The always-on shared experts as one MLP (gate, up [S * width, hidden]; down [hidden, S * width]), if any.
    # Families with shared experts gate them by sigmoid(w . x) with w = 0 at upcycling: half their output,
    # which the down projection here already doubles.
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class SplitSettings:
    experts: int
    active: int
    shared: int = 0  # always-on shared experts
    active_fraction: float = 1.0  # neurons: a token's MLP cost, as a fraction of the parent's
    drop: float = 0.0  # copy: fraction of each expert's neurons re-initialised (Drop-Upcycling)
    noise: float = 0.0  # copy: Gaussian noise, relative to each matrix's standard deviation
    router_sharpness: float = 10.0  # neurons: logit gap of a unit cosine difference
    init_std: float = 0.02  # copy: the router's initial standard deviation
    seed: int = 0
    renormalized: bool = True  # the family rescales the K chosen weights to sum to 1 (set by the upcycler)


class UpcycleSplit:
    help = ""
    needs_activations = False  # True: split() gets the layer's MLP inputs on calibration text

    def width(self, intermediate: int, s: SplitSettings) -> int:
        """Neurons per expert; raises a one-line SlimlmError for a setting this split cannot make."""
        raise NotImplementedError

    def split(self, mlp: DenseMLP, s: SplitSettings, inputs: torch.Tensor | None, gen: torch.Generator) -> Experts:
        raise NotImplementedError


UPCYCLE_SPLITS: Registry[UpcycleSplit] = Registry("upcycle split", UpcycleSplit, unknown="split")


@UPCYCLE_SPLITS.register("copy")
class CopySplit(UpcycleSplit):
    help = ("every expert is the parent's MLP (sparse upcycling); K active experts cost K times the parent's "
            "MLP. The untrained MoE computes exactly the parent unless --drop/--noise make experts differ "
            "(for a family that does not rescale the chosen experts' weights, the router starts at zero)")

    def width(self, intermediate: int, s: SplitSettings) -> int:
        return intermediate

    def split(self, mlp: DenseMLP, s: SplitSettings, inputs, gen) -> Experts:
        import torch  # here, not at import: the CLI builds its help from this registry

        n, (i, h) = s.experts, mlp.gate.shape
        gate, up, down = (w.unsqueeze(0).repeat(n, 1, 1) for w in (mlp.gate, mlp.up, mlp.down))
        for stacked, parent in ((gate, mlp.gate), (up, mlp.up), (down, mlp.down)):
            if s.noise:
                stacked += torch.randn(stacked.shape, generator=gen) * (s.noise * parent.std())
        if s.drop:  # Drop-Upcycling: each expert re-draws its own random share of neurons
            k = int(round(s.drop * i))
            for e in range(n):
                idx = torch.randperm(i, generator=gen)[:k]
                gate[e, idx] = torch.randn(k, h, generator=gen) * mlp.gate.std()
                up[e, idx] = torch.randn(k, h, generator=gen) * mlp.up.std()
                down[e][:, idx] = torch.randn(h, k, generator=gen) * mlp.down.std()
        router = torch.randn(n, h, generator=gen) * s.init_std
        if not s.renormalized:  # weights are softmax probabilities: a zero router gives K of 1/N each
            router.zero_()
            down = down * (n / s.active)
        if not s.shared:
            return Experts(gate, up, down, router)
        # S shared copies and the routed mixture each give 1/(S + 1) of the parent (0.5 from the shared gate).
        share = 1.0 / (s.shared + 1)
        shared = (mlp.gate.repeat(s.shared, 1), mlp.up.repeat(s.shared, 1), mlp.down.repeat(1, s.shared) * 2 * share)
        return Experts(gate, up, down * share, router, shared=shared)


@UPCYCLE_SPLITS.register("neurons")
class NeuronSplit(UpcycleSplit):
    help = ("the parent's MLP neurons are divided among the experts by clustering their activations on "
            "calibration text (MoEfication, LLaMA-MoE); the router starts from the cluster centroids. K active "
            "experts cost --active-fraction of the parent's MLP (default 1: the same)")
    needs_activations = True

    def width(self, intermediate: int, s: SplitSettings) -> int:
        return check_split(intermediate, s.experts, s.active, s.active_fraction, s.shared)[0]

    def split(self, mlp: DenseMLP, s: SplitSettings, inputs, gen) -> Experts:
        import torch

        n = s.experts
        width, rounds = check_split(mlp.gate.shape[0], n, s.active, s.active_fraction, s.shared)
        x = inputs.float()
        labels, centroids = cluster_tokens(x, n, seed=s.seed)
        activity = mlp_activity(x, mlp.gate, mlp.up, mlp.down, mlp.act)
        order = activity.mean(0).argsort(descending=True)
        common, pool = order[:s.shared * width].sort().values, order[s.shared * width:].sort().values
        scores = cluster_scores(activity[:, pool], labels, n)
        neurons = [pool[torch.as_tensor(e)].numpy() for e in assign_neurons(scores, rounds)]
        idx = torch.as_tensor(np.stack(neurons))  # [N, width]
        scale = n / rounds  # all experts at weight 1/N then sum to the parent's MLP (see partition.py)
        gate, up = mlp.gate[idx], mlp.up[idx]
        down = mlp.down[:, idx].permute(1, 0, 2) * scale
        # Router rows: unit centroids, scaled so that a cosine difference of 1 is `router_sharpness`
        # logits for a typical (median-norm) token.
        typical = x.norm(dim=-1).median().clamp_min(1e-6)
        router = torch.as_tensor(centroids, dtype=torch.float32) * (s.router_sharpness / typical)
        shared = (mlp.gate[common], mlp.up[common], mlp.down[:, common] * 2) if s.shared else None
        return Experts(gate.contiguous(), up.contiguous(), down.contiguous(), router,
                       neurons=[v.tolist() for v in neurons], shared=shared)
