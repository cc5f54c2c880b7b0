"""AWQ for an MoE layer's routed experts (awq.py does the dense layers), each expert's scales
judged on the tokens its router sends it.

An MoE block's input (the post-attention norm's output) feeds the router, every routed expert's
gate and up projections (transformers 5.x keeps them fused: `experts.gate_up_proj` [E, 2I, H]),
and, in Qwen-MoE and DeepSeek, shared experts (Qwen's with a gate of their own). Two kinds of
scale are folded, both leaving the
full-precision model exactly equivalent:

    input  norm(x) * w -> router, experts' gate/up, shared expert's gate/up, shared gate:
           w' = w / s; every consumer's columns * s (the router and the shared gate are kept
           unquantized, so for them the fold is exact whatever s is)
    down   per expert: act(gate) * up -> down_proj[e]: up rows of gate_up_proj[e] / s,
           down_proj[e] columns * s (the gate is untouched, so act(gate) is too)

The input scale is one for the whole block (one norm feeds every expert), s = mean(|x|)^alpha over
all tokens as in awq.py; its error is the sum over experts of ||X_e W_e^T - X_e Wq_e^T||^2 on the
rows X_e routed to expert e (the tokens whose top-k holds it), plus the shared expert's on every
token: an expert's quantization error lands only on its own tokens. The down scale is searched per
expert, on that expert's own down inputs. Why by hand: transformers' fused experts are neither
nn.Linear nor reachable by AutoAWQ's or llm-compressor's module mappings.
"""

from __future__ import annotations

__all__ = ["ExpertBlock", "find_expert_block"]


def _columns_of(module):
    """The 2-D weight whose columns meet the block's input ([out, H]), for a router or a linear."""
    w = getattr(module, "weight", None)
    return w if getattr(w, "ndim", 0) == 2 else None


class ExpertBlock:
    """One MoE MLP block: its norm, experts, router, shared expert, and what calibration saw."""

    def __init__(self, layer: int, norm_name: str, norm, norm_kind: str, block, experts, consumers: list,
                 shared: list):
        self.layer, self.norm_name, self.norm, self.norm_kind = layer, norm_name, norm, norm_kind
        self.block, self.experts = block, experts
        self.consumers = consumers  # unquantized 2-D weights also fed by the norm: router, shared gate
        self.shared = shared  # the shared expert's gate/up linears (quantized, every token)
        n = experts.gate_up_proj.shape[0]
        self.abs_sum, self.count, self.rows = None, 0, []
        self.routed: dict[int, list] = {e: [] for e in range(n)}
        self.down_abs: dict[int, object] = {}
        self.down_count: dict[int, int] = {}
        self.down_rows: dict[int, list] = {e: [] for e in range(n)}
        self.wired: bool | None = None
        self._norm_out = None

    def hooks(self, stride: int) -> list:
        """Forward hooks collecting the block's inputs and each expert's routed inputs."""
        def on_norm(module, args, output):
            self._norm_out = output

        def on_block(module, args):
            if self.wired is None:
                self.wired = args[0] is self._norm_out

        def on_experts(module, args, output):
            from slimlm.compress.gptq_experts import routed_inputs

            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            a = x.abs().sum(0).double()
            self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
            self.count += x.shape[0]
            self.rows.append(x[::stride].cpu())
            for e, xe, h in routed_inputs(module, args[0], args[1]):
                self.routed[e].append(xe[::stride].cpu())
                d = h.abs().sum(0).double()
                self.down_abs[e] = d if e not in self.down_abs else self.down_abs[e] + d
                self.down_count[e] = self.down_count.get(e, 0) + h.shape[0]
                self.down_rows[e].append(h[::stride].cpu())

        return [self.norm.register_forward_hook(on_norm), self.block.register_forward_pre_hook(on_block),
                self.experts.register_forward_hook(on_experts)]

    def forget(self) -> None:
        self._norm_out = None

    def scale(self, fmt, grid: int, search_scale, fold_norm) -> list[dict]:
        """Search and fold the input scale, then each expert's down scale; report entries.
        `search_scale` and `fold_norm` are awq.py's (passed in: awq.py imports this module)."""
        import torch

        width = self.experts.gate_up_proj.shape[1] // 2
        gate_up, down = self.experts.gate_up_proj.data, self.experts.down_proj.data
        report = []
        pairs = [(torch.cat(self.routed[e]), gate_up[e].float()) for e in self.routed if self.routed[e]]
        pairs += [(torch.cat(self.rows), lin.weight.detach().float()) for lin in self.shared]
        s, alpha, err, err_rtn = search_scale(fmt, None, self.abs_sum / self.count, None, grid, pairs=pairs)
        if alpha > 0:
            with torch.no_grad():
                gate_up.mul_(s[None, None, :].to(gate_up.dtype))
                for w in [*self.consumers, *(lin.weight for lin in self.shared)]:
                    w.data.mul_(s[None, :].to(w.dtype))
                fold_norm(self.norm, self.norm_kind, s)
        report.append({"layer": self.layer, "group": "experts", "prev": self.norm_name,
                       "linears": ["experts.gate_up_proj", *(["shared_expert"] if self.shared else [])],
                       "alpha": alpha, "error": err, "error_rtn": err_rtn})
        for e, rows in self.down_rows.items():
            if not rows or width % fmt.block_size:  # a down projection's blocks run along the I columns
                continue
            s, alpha, err, err_rtn = search_scale(fmt, None, self.down_abs[e] / self.down_count[e], None, grid,
                                                  pairs=[(torch.cat(rows), down[e].float())])
            if alpha > 0:
                with torch.no_grad():
                    gate_up[e, width:].div_(s[:, None].to(gate_up.dtype))
                    down[e].mul_(s[None, :].to(down.dtype))
            report.append({"layer": self.layer, "group": "expert-down", "expert": e, "prev": f"experts.{e}.up",
                           "linears": [f"experts.{e}.down"], "alpha": alpha, "error": err, "error_rtn": err_rtn})
        self.rows, self.routed, self.down_rows = [], {}, {}
        return report


def find_expert_block(i: int, base: str, layer, mlp, norm_name: str, norm_kind) -> ExpertBlock | str:
    """The layer's MoE block, or why it cannot be scaled."""
    from slimlm.compress.gptq_experts import is_fused_experts

    experts = getattr(mlp, "experts", None)
    if not is_fused_experts(experts):
        return f"MLP {type(mlp).__name__} has neither gate/up_proj linears nor fused experts"
    norm = getattr(layer, norm_name, None)
    kind = norm_kind(norm) if norm is not None else None
    if kind is None:
        return f"{norm_name} does not scale per channel as x*w or x*(1+w)"
    router = _columns_of(getattr(mlp, "gate", None))
    if router is None or router.shape[1] != experts.gate_up_proj.shape[2]:
        return f"MoE block {type(mlp).__name__} has no router weight over its input"
    consumers, shared = [router], []
    shared_mlp = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)  # Qwen, DeepSeek
    if shared_mlp is not None:
        lins = [getattr(shared_mlp, n, None) for n in ("gate_proj", "up_proj")]
        if not all(getattr(lin, "weight", None) is not None for lin in lins):
            return "the shared expert has no gate/up_proj linears"
        shared = lins
        shared_gate = _columns_of(getattr(mlp, "shared_expert_gate", None))
        if shared_gate is not None:
            consumers.append(shared_gate)
    return ExpertBlock(i, f"{base}.{norm_name}", norm, kind, mlp, experts, consumers, shared)

