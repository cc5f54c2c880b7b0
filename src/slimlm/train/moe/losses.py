"""The two router losses every MoE recipe adds to the language-model loss, and the hook that adds them.

- Load balancing (Switch Transformer, eq. 4-6; Mixtral's `router_aux_loss`): per layer,
  E * sum_i f_i * P_i, where f_i is the share of the token's top-k choices that went to expert i
  and P_i the mean router probability of expert i. 1.0 when the load is perfectly even, E when every
  token goes to one expert. Here it is averaged over layers (transformers' `load_balancing_loss_func`
  pools the layers' tokens instead, and counts f over tokens so its value is top_k times ours for
  one layer); a per-layer mean keeps the weight's meaning independent of depth.
- Router z-loss (ST-MoE, Zoph et al. 2022): the mean squared log-sum-exp of the router logits. It
  keeps the logits small, which keeps the softmax out of its saturated, ill-conditioned region.

`RouterLosses` wraps any training loss (distillation's, or plain cross-entropy): forward hooks on
every router capture its logits during the wrapped loss's own forward pass, so no second pass and no
family-specific `output_router_logits` plumbing are needed. f_i is a count and has no gradient; the
gradient reaches the router through P_i, as in the paper.
"""

from __future__ import annotations

import torch

from slimlm.train.moe.blocks import moe_layers


def load_balancing_loss(logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_i f_i P_i for one layer's router logits [tokens, E] (mask [tokens]: 1 = a real token)."""
    probs = torch.softmax(logits.float(), dim=-1)
    n = probs.shape[-1]
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    w = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.reshape(-1).float()
    total = w.sum().clamp_min(1.0)
    f = (chosen * w[:, None]).sum(0) / (total * top_k)  # share of assignments, sums to 1
    p = (probs * w[:, None]).sum(0) / total  # mean router probability
    return n * (f * p).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of logsumexp(router logits)^2, for one layer's logits [tokens, E]."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    if mask is None:
        return z.mean()
    w = mask.reshape(-1).float()
    return (z * w).sum() / w.sum().clamp_min(1.0)


def _logits_of(output) -> torch.Tensor:
    """A router's logits from its forward output (transformers' routers return (logits, weights, index))."""
    return output[0] if isinstance(output, tuple) else output


class RouterLosses:
    """`loss_fn(model, batch)` plus aux_weight * load balancing plus z_weight * z-loss, each averaged
    over the MoE layers. `last` holds the most recent values (for logs and tests)."""

    def __init__(self, loss_fn, model, aux_weight: float, z_weight: float):
        self.loss_fn, self.aux_weight, self.z_weight = loss_fn, aux_weight, z_weight
        self.layers = moe_layers(model)
        self.captured: list[torch.Tensor] = []
        self.capturing = False  # only inside __call__: evaluation passes must not pile up logits
        self.last: dict[str, float] = {}
        for layer in self.layers:
            layer.block.gate.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output) -> None:
        if self.capturing:
            self.captured.append(_logits_of(output))

    def __call__(self, model, batch: dict):
        self.captured.clear()
        self.capturing = True
        try:
            loss, tokens = self.loss_fn(model, batch)
        finally:
            self.capturing = False
        if not self.captured:  # a loss that never ran the model (nothing to balance)
            return loss, tokens
        mask = batch.get("attention_mask")
        top_k = self.layers[0].block.gate.top_k
        aux = torch.stack([load_balancing_loss(lg, top_k, mask) for lg in self.captured]).mean()
        z = torch.stack([router_z_loss(lg, mask) for lg in self.captured]).mean()
        self.last = {"balance": float(aux.detach()), "z": float(z.detach())}
        self.captured.clear()
        return loss + self.aux_weight * aux + self.z_weight * z, tokens
