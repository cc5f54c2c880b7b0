"""GPTQ Hessians of an MoE's routed experts, each from the tokens its router sends it.

A dense layer sees every token, so its Hessian is H = 2/N * sum x x^T over all of them. An expert
sees only the tokens routed to it, and those are what its quantization error lands on: an
expert that specializes in code should be fitted to code-like inputs, not to the average token.
So each expert's H is summed over its own tokens: the input of its gate and up projections (the
hidden state, for the tokens whose top-k holds the expert) and the input of its down projection
(act(gate) * up of those tokens, as the expert computes it).

Why by hand: transformers (5.x) stores an MoE layer's experts as fused 3-D parameters
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) inside one module, so the linear-layer hooks
of gptq.py never see an expert, and neither llm-compressor's nor AutoGPTQ's hooks apply to that
layout. The hook here reads the experts module's own arguments (hidden states, top-k indices) and
its own weights. Checkpoints store experts apart (Mixtral's `experts.E.w1|w3|w2`, Qwen-MoE's
`experts.E.gate_proj|up_proj|down_proj`); `checkpoint_keys` maps each (layer, expert, role) to
those names, which is what the writers ask GPTQ for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["ExpertHessianHooks", "checkpoint_keys", "expert_modules", "expert_slices", "expert_views",
           "is_fused_experts", "routed_inputs"]

ROLES = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_CHECKPOINT = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.(w[123]|gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def is_fused_experts(module) -> bool:
    """Whether `module` is transformers' fused experts module (3-D gate_up_proj and down_proj)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return getattr(gate_up, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3 and hasattr(module, "act_fn")


def expert_modules(module, prefix: str = "") -> dict:
    """{module name: experts module} for every fused experts module inside `module`."""
    return {prefix + name: m for name, m in module.named_modules() if is_fused_experts(m)}


def routed_inputs(module, hidden, top_k):
    """(expert, its gate/up input rows, its down projection's input rows) for every expert of a
    fused experts module that the top-k indices send a token to, computed as the expert does
    (act(gate) * up). `hidden` and `top_k` are the module's own forward arguments."""
    import torch

    x = hidden.detach().reshape(-1, hidden.shape[-1]).float()
    top_k = top_k.reshape(x.shape[0], -1)
    with torch.no_grad():
        for e in range(module.gate_up_proj.shape[0]):
            rows = (top_k == e).any(dim=-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e].float()).chunk(2, dim=-1)
            yield e, xe, module.act_fn(gate) * up


def expert_slices(module, layer: int, keys: dict[tuple[int, int, str], str]):
    """(checkpoint name without ".weight", the view of the fused parameter that holds it) for each
    routed expert projection of one experts module in decoder layer `layer` (`keys` from
    checkpoint_keys), expert by expert: gate and up are the two halves of gate_up_proj[e] (gate
    first, as the experts module chunks them), down is down_proj[e]. Writing into a view changes
    the model."""
    width = module.gate_up_proj.shape[1] // 2
    for e in range(module.gate_up_proj.shape[0]):
        for role, view in (("gate", module.gate_up_proj.data[e, :width]),
                           ("up", module.gate_up_proj.data[e, width:]), ("down", module.down_proj.data[e])):
            key = keys.get((layer, e, role))
            if key is not None:
                yield key, view


def expert_views(model, keys: dict[tuple[int, int, str], str]) -> dict[str, object]:
    """{checkpoint weight name: its view} for every routed expert projection of `model` (expert_slices)."""
    return {key + ".weight": view for name, module in expert_modules(model).items()
            for key, view in expert_slices(module, layer_of(name), keys)}


def checkpoint_keys(names: Iterable[str]) -> dict[tuple[int, int, str], str]:
    """{(layer, expert, role): checkpoint name without ".weight"}, role gate, up or down."""
    out = {}
    for n in names:
        m = _CHECKPOINT.search(n)
        if m:
            out[(int(m.group(1)), int(m.group(2)), ROLES[m.group(3)])] = n[:-len(".weight")]
    return out


def layer_of(module_name: str) -> int:
    m = _LAYER.search("." + module_name)
    if m is None:
        raise ValueError(f"{module_name} is not inside a decoder layer")
    return int(m.group(1))


class ExpertHessianHooks:
    """Forward hooks on experts modules accumulating, per expert, 2/N * sum x x^T (float64, CPU)
    of its gate/up input and of its down input over the tokens routed to it."""

    def __init__(self, experts: dict):
        self.sums: dict[tuple[str, int, str], object] = {}
        self.counts: dict[tuple[str, int, str], int] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in experts.items()]

    def _add(self, key, x) -> None:
        xx = (x.T @ x).double().cpu()
        self.sums[key] = self.sums[key] + xx if key in self.sums else xx
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def _hook(self, name: str):
        def hook(module, args, output):
            for e, xe, down_in in routed_inputs(module, args[0], args[1]):
                self._add((name, e, "in"), xe)
                self._add((name, e, "down"), down_in)
        return hook

    def remove(self, keys: dict[tuple[int, int, str], str]) -> dict:
        """Unhook; {checkpoint name without ".weight": H} for every expert projection that saw a
        token (`keys` from checkpoint_keys). An expert no token reached has none."""
        for h in self._handles:
            h.remove()
        out = {}
        for (name, e, kind), s in self.sums.items():
            H = s.mul_(2.0 / self.counts[(name, e, kind)])
            for role in (("gate", "up") if kind == "in" else ("down",)):
                key = keys.get((layer_of(name), e, role))
                if key is not None:
                    out[key] = H
        return out
