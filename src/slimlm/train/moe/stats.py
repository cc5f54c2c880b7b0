"""How a mixture of experts routes: per MoE layer, which experts get the tokens, how sure the router is,
which experts fire together and which tokens each expert specialises in.

One forward hook on each layer's router (`block.gate`) sees the router's logits and its choice while
calibration text runs through the model, so the numbers are the model's own routing, not a re-derivation:

- share: the fraction of all top-k assignments each expert receives (sums to 1 over the experts);
- entropy: mean over tokens of the entropy of the router's distribution, in nats (max: log E);
- balance: Switch Transformer's E * sum_i f_i * P_i (f_i the share, P_i the mean router probability);
  1.0 is perfectly balanced, E when one expert takes everything. transformers'
  `load_balancing_loss_func` on one layer is top_k times this (it counts assignments per token, not
  per assignment);
- coactivation: E x E, the fraction of tokens whose top-k holds both i and j (diagonal: holds i);
- top tokens: per expert, the tokens most over-represented among what it receives (lift = P(token |
  expert) / P(token), tokens seen at least `min_count` times, ties broken by count).

Router distribution: softmax of the logits (Mixtral, Qwen-MoE). A router with an
`e_score_correction_bias` (DeepSeek V3) scores each expert with a sigmoid and picks its top-k from the
scores plus that bias; its "probability" here is the sigmoid scores normalised to sum to 1, as DeepSeek-V3's
own balance loss defines it, while the choice is the gate's real one (bias and group limits included).
A gate that returns only logits (no tuple) is read as softmax + top-k with the block's top_k.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.train.moe.blocks import moe_keys, read_moe_config, require_moe

__all__ = ["LayerStats", "MoeStats", "moe_stats", "write_plots"]


@dataclass
class LayerStats:
    layer: int
    share: list[float]  # fraction of top-k assignments per expert (sums to 1)
    router_prob: list[float]  # mean router probability per expert, P_i
    entropy: float  # nats, mean over tokens
    max_entropy: float  # log(E)
    balance: float  # E * sum f_i P_i, 1.0 = balanced
    coactivation: list[list[float]]
    top_tokens: list[list[str]]
    counts: list[int] = field(default_factory=list)  # assignments per expert

    @property
    def share_min(self) -> float:
        return min(self.share)

    @property
    def share_max(self) -> float:
        return max(self.share)


@dataclass
class MoeStats:
    model: str
    model_type: str
    experts: int
    top_k: int
    scoring: str  # "softmax" or "sigmoid" (how router probabilities were read)
    tokens: int
    seconds: float
    layers: list[LayerStats]
    inputs: dict = field(default_factory=dict, repr=False)  # layer -> sampled router inputs (for merging)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("inputs")
        return d


class _Router:
    """Accumulates one layer's routing from its gate's forward hook."""

    def __init__(self, layer, top_k: int, keep_stride: int):
        import torch

        self.layer, self.top_k, self.stride = layer, top_k, keep_stride
        e = layer.num_experts
        self.sigmoid = hasattr(layer.block.gate, "e_score_correction_bias")
        self.prob_sum = torch.zeros(e, dtype=torch.float64)
        self.coact = torch.zeros(e, e, dtype=torch.float64)
        self.entropy_sum, self.tokens = 0.0, 0
        self.chosen, self.inputs = [], []

    def __call__(self, module, args, output) -> None:
        import torch

        logits = (output[0] if isinstance(output, tuple) else output).detach().float()
        logits = logits.reshape(-1, logits.shape[-1])
        probs = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        probs = probs / probs.sum(-1, keepdim=True)
        if isinstance(output, tuple) and len(output) == 3:
            idx = output[2].reshape(logits.shape[0], -1)
        else:
            idx = torch.topk(probs, self.top_k, dim=-1).indices
        hot = torch.zeros_like(probs, dtype=torch.float64).scatter_(1, idx, 1.0)
        self.coact += hot.T @ hot
        self.prob_sum += probs.double().sum(0)
        self.entropy_sum += float(torch.distributions.Categorical(probs=probs).entropy().double().sum())
        self.tokens += logits.shape[0]
        self.chosen.append(idx.to(torch.int16))
        if self.stride:
            self.inputs.append(args[0].detach().reshape(logits.shape[0], -1)[::self.stride].float().clone())

    def result(self, ids, tokenizer, min_count: int) -> LayerStats:
        import torch

        e = self.layer.num_experts
        hot = torch.zeros(len(ids), e).scatter_(1, torch.cat(self.chosen).long(), 1.0)
        counts = hot.sum(0).double()
        share, prob = counts / counts.sum(), self.prob_sum / self.tokens
        return LayerStats(layer=self.layer.index, share=share.tolist(), router_prob=prob.tolist(),
                          entropy=self.entropy_sum / self.tokens, max_entropy=math.log(e),
                          balance=float(e * (share * prob).sum()), coactivation=(self.coact / self.tokens).tolist(),
                          top_tokens=_top_tokens(ids, hot, tokenizer, min_count), counts=[int(c) for c in counts])


def _top_tokens(ids, hot, tokenizer, min_count: int, n: int = 8) -> list[list[str]]:
    """Per expert, the `n` tokens with the highest lift P(token | expert) / P(token)."""
    import numpy as np
    import torch

    uniq, inv = torch.unique(ids, return_inverse=True)
    per_expert = torch.zeros(len(uniq), hot.shape[1]).index_add_(0, inv, hot)  # [tokens, experts]
    seen = torch.bincount(inv, minlength=len(uniq)).double()
    lift = (per_expert.double() / per_expert.sum(0).clamp(min=1)) / (seen / len(ids))[:, None]
    lift[seen < min_count] = 0  # a token seen once or twice has a huge, meaningless lift
    lift[per_expert == 0] = 0
    tops = []
    for e in range(hot.shape[1]):
        order = np.lexsort((-per_expert[:, e].numpy(), -lift[:, e].numpy()))[:n]
        tops.append([tokenizer.decode([int(uniq[i])]) for i in order if lift[i, e] > 0])
    return tops


def _resolve_texts(texts) -> list[str]:
    from slimlm.data import calibration_corpus, calibration_docs

    if texts is None:
        return calibration_docs()
    return calibration_corpus(str(texts)) if isinstance(texts, (str, Path)) else list(texts)


def moe_stats(model, texts=None, max_tokens: int = 100_000, seq_len: int = 512, *, tokenizer=None,
              batch_size: int = 8, min_count: int = 3, keep_inputs: int = 0, record: bool = True,
              progress: bool = True) -> MoeStats:
    """Run up to `max_tokens` tokens of `texts` (a list of documents, a corpus name or file as `--data`
    takes, default python-docs' calibration part) through `model` and measure its routing.

    `model` is a model reference (loaded here, the run recorded) or a loaded torch model with its
    `tokenizer`. `keep_inputs` > 0 keeps about that many router inputs per layer in `.inputs`
    (expert merging compares experts on them)."""
    import torch

    from slimlm.compress.calibration import calibration_windows, run_calibration
    from slimlm.errors import SlimlmError

    if max_tokens < 1:
        raise SlimlmError(f"--tokens {max_tokens} must be at least 1")
    ref, start = None, time.perf_counter()
    if tokenizer is None:
        from slimlm.models.loading import load_torch

        ref = read_moe_config(model)[0]  # a dense model fails before loading
        model, tokenizer = load_torch(ref)
    layers = require_moe(model)
    seq_len = min(seq_len, max_tokens, getattr(model.config, "max_position_embeddings", seq_len) or seq_len)
    windows = calibration_windows(tokenizer, _resolve_texts(texts), max(1, max_tokens // seq_len), seq_len)
    top_k = int(getattr(model.config, moe_keys(model.config)[1]))
    stride = max(1, windows.numel() // keep_inputs) if keep_inputs else 0
    routers = [_Router(layer, int(getattr(layer.block.gate, "top_k", top_k)), stride) for layer in layers]
    handles = [layer.block.gate.register_forward_hook(r) for layer, r in zip(layers, routers)]
    try:
        # The decoder only: routing needs no logits, and the output head is a fifth of a small model's
        # FLOPs (SmolLM2: 28M of 135M weights) and 0.8 GB of logits per batch of 8 x 512.
        run_calibration(model.get_decoder(), windows, batch_size, "routing", progress)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        ids = windows.reshape(-1)
        stats = MoeStats(model=str(getattr(ref, "spec", None) or getattr(model, "name_or_path", "")),
                         model_type=model.config.model_type, experts=layers[0].num_experts, top_k=top_k,
                         scoring="sigmoid" if routers[0].sigmoid else "softmax", tokens=int(ids.numel()), seconds=0.0,
                         layers=[r.result(ids, tokenizer, min_count) for r in routers],
                         inputs={r.layer.index: torch.cat(r.inputs) for r in routers if r.inputs})
    stats.seconds = time.perf_counter() - start
    if record and ref is not None:
        from slimlm.runs import record as record_run

        record_run("moe stats", ref, params={"max_tokens": max_tokens, "seq_len": seq_len},
                   metrics={"tokens": stats.tokens, "seconds": stats.seconds,
                            "balance": [lay.balance for lay in stats.layers],
                            "entropy": [lay.entropy for lay in stats.layers]})
    return stats


def _heatmap(stats: MoeStats, path: Path) -> None:
    """Layers x experts, colour = share of assignments; a balanced layer is one flat colour (1/E)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    grid = np.array([lay.share for lay in stats.layers])
    fig = Figure(figsize=(max(5.0, 0.35 * stats.experts + 2), max(3.0, 0.3 * len(stats.layers) + 1.5)),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)  # 0: colour ~ share
    if grid.size <= 256:  # small enough to print each share in its cell
        for (row, col), value in np.ndenumerate(grid):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="k" if value > 0.6 * grid.max() else "w")
    fig.colorbar(image, ax=ax, label=f"share of assignments (balanced: {1 / stats.experts:.3f})")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yticks(range(len(stats.layers)), [str(lay.layer) for lay in stats.layers])
    ax.set_title(f"{Path(stats.model).name}: token share per expert ({stats.tokens:,} tokens, top-{stats.top_k})", fontsize=9)
    fig.savefig(path, dpi=110, metadata={"Software": "slimlm"})


def _bars(stats: MoeStats, path: Path) -> None:
    """One bar chart per layer, the balanced share dashed, with the layer's balance and entropy."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ncols = min(4, len(stats.layers))
    nrows = math.ceil(len(stats.layers) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for ax, lay in zip(axes.flat, stats.layers):
        ax.bar(range(stats.experts), lay.share, color="#4477aa")
        ax.axhline(1 / stats.experts, linestyle="--", color="#cc3311", linewidth=1)
        ax.set_title(f"layer {lay.layer}: balance {lay.balance:.2f}, H {lay.entropy:.2f}/{lay.max_entropy:.2f}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(stats.layers):]:
        ax.set_visible(False)
    fig.supxlabel("expert", fontsize=9)
    fig.supylabel("share of assignments", fontsize=9)
    fig.savefig(path, dpi=110, metadata={"Software": "slimlm"})


def _html(stats: MoeStats, pngs: list[str]) -> str:
    """A self-contained page: the plots beside it (img tags) and a table of each layer's numbers."""
    import html

    e = html.escape
    rows = "".join(
        f"<tr><td>{lay.layer}</td><td>{lay.share_min:.3f}</td><td>{lay.share_max:.3f}</td>"
        f"<td>{lay.entropy:.3f} / {lay.max_entropy:.3f}</td><td>{lay.balance:.3f}</td>"
        f"<td>{'<br>'.join(f'{i}: ' + e(' | '.join(map(repr, toks))) for i, toks in enumerate(lay.top_tokens))}</td></tr>"
        for lay in stats.layers)
    images = "".join(f"<figure><img alt='{e(p)}' src='{e(p)}'></figure>" for p in pngs)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>MoE routing: {e(stats.model)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid "
            "#ccc;padding:4px 8px;font-size:13px;vertical-align:top}img{max-width:100%}</style></head><body>"
            f"<h1>MoE routing: {e(stats.model)}</h1><p>{stats.experts} experts, top-{stats.top_k}, {stats.scoring} "
            f"router, {stats.tokens:,} tokens in {stats.seconds:.1f} s. Balance is E &middot; &sum; f<sub>i</sub> "
            f"P<sub>i</sub> (1.0 = balanced); entropy in nats, out of log E.</p>{images}<table><tr><th>layer</th>"
            f"<th>share min</th><th>share max</th><th>entropy</th><th>balance</th><th>top tokens per expert</th>"
            f"</tr>{rows}</table></body></html>")


def write_plots(stats: MoeStats, folder) -> list[Path]:
    """Write share_heatmap.png, share_by_layer.png, stats.json and stats.html into `folder` (created)."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heat, bars = folder / "share_heatmap.png", folder / "share_by_layer.png"
    _heatmap(stats, heat)
    _bars(stats, bars)
    (folder / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
    (folder / "stats.html").write_text(_html(stats, [heat.name, bars.name]), encoding="utf-8")
    return [heat, bars, folder / "stats.json", folder / "stats.html"]
