"""`slimlm moe ...`: make a mixture of experts from a dense model, train it, look inside it, shrink it.
Parsing and printing only; the work is in slimlm.train.moe."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import ModelArg, app, out
from slimlm.cli.choices import registry_option
from slimlm.cli.train import add_training_rows
from slimlm.train.moe.prune import EXPERT_PRUNERS
from slimlm.train.moe.recover import TRAIN_PARTS, MoeTrainConfig
from slimlm.train.moe.splits import UPCYCLE_SPLITS

moe_app = typer.Typer(
    no_args_is_help=True,
    help="Mixture of experts: `moe upcycle` turns a dense model into a sparse MoE, `moe train` trains it back "
         "towards its parent, `moe stats` shows how it routes, `moe prune` removes the experts it routes least to.")
app.add_typer(moe_app, name="moe")



@moe_app.command("upcycle")
def upcycle_cmd(
    model: str = ModelArg,
    out_path: Path = typer.Option(..., "--out", "-o", help="The MoE Hugging Face folder to write."),
    experts: int = typer.Option(8, "--experts", "-n", help="Routed experts per layer (N)."),
    active: int = typer.Option(2, "--active", "-k", help="Experts each token is routed to (K)."),
    split: str = registry_option(UPCYCLE_SPLITS, "neurons", "--split"),
    active_fraction: float = typer.Option(1.0, "--active-fraction", help="neurons: a token's MLP cost as a fraction "
                                          "of the parent's (1: K experts hold as many neurons as the parent's MLP; "
                                          "K/N: the neurons are partitioned, no overlap)."),
    shared_experts: int = typer.Option(0, "--shared-experts", help="Always-on experts (families that have them)."),
    drop: float = typer.Option(0.0, "--drop", help="copy: fraction of each expert's neurons re-drawn at random "
                               "(Drop-Upcycling), so experts can diverge."),
    noise: float = typer.Option(0.0, "--noise", help="copy: Gaussian noise on each expert, relative to the weights' "
                                "standard deviation."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="neurons: calibration sequences (python-docs)."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="neurons: tokens per calibration sequence."),
    seed: int = typer.Option(0, "--seed", help="Seed for clustering and random initialisation."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Turn a dense model into a sparse mixture of experts (Llama/Mistral parents become Mixtral).

    \b
    Example: slimlm moe upcycle smollm2-135m-instruct --experts 8 --active 2 --out smol-8x2
    Example: slimlm moe upcycle ./dense --split copy --drop 0.5 --experts 4 --active 2 --out dense-4x2
    Then train it back towards its parent: slimlm moe train smol-8x2 --data python-docs --out smol-8x2-trained
    The result is an ordinary checkpoint of its family: eval, export, serve and quantize take it as it is.
    """
    from slimlm.train.moe.upcycle import upcycle

    result = upcycle(model, out_path, experts, active, split, active_fraction=active_fraction,
                     shared_experts=shared_experts, drop=drop, noise=noise, calib_samples=calib_samples,
                     calib_seq_len=calib_seq_len, seed=seed, force=force)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table(title=f"{model} → {result.out}", show_header=False, box=None)
    table.add_row("family", f"{result.family}: {result.experts} experts of {result.expert_width} neurons, "
                            f"{result.active} active, split {result.split}")
    table.add_row("parameters", f"{result.params_parent:,} (parent) → {result.params_total:,} total, "
                                f"{result.params_active:,} active per token")
    table.add_row("time", f"{result.seconds:.1f} s")
    out.print(table)
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")


@moe_app.command("train")
def train_cmd(
    model: str = ModelArg,
    data: str = typer.Option(..., "--data", "-d", help="Training text: python-docs, a .txt file, or JSONL as "
                             "`slimlm distill` takes."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the trained MoE, checkpoints/, train_log.jsonl, "
                                 "loss.png."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="The dense model to distill from (default: "
                                          "the parent the MoE's manifest names)."),
    parts: str = typer.Option("all", "--train", help="; ".join(f"{k}: {v}" for k, v in TRAIN_PARTS.items())),
    aux_weight: float = typer.Option(MoeTrainConfig.aux_weight, "--aux-weight", help="Load-balancing loss weight."),
    z_weight: float = typer.Option(MoeTrainConfig.z_weight, "--z-weight", help="Router z-loss weight."),
    weight_ce: float = typer.Option(0.5, "--weight-ce", help="Share of cross-entropy mixed into the distillation "
                                    "loss (1: plain training, no teacher signal)."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (default: one epoch)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many training tokens."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Sequences per step."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per packed block."),
    eval_every: int = typer.Option(50, "--eval-every", help="Steps between held-out evaluations (0: at the end)."),
    save_every: int = typer.Option(100, "--save-every", help="Steps between checkpoints for --resume (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split and data order."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT (same settings)."),
    force: bool = typer.Option(False, "--force", help="Delete OUT (a previous slimlm run) and start over."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Train a mixture of experts back towards its dense parent: distillation plus the router losses.

    \b
    Example: slimlm moe train smol-8x2 --data python-docs --out smol-8x2-trained --max-tokens 200000
    Example: slimlm moe train smol-8x2 --data notes.txt --train router --out smol-8x2-router
    The teacher's top-k is cached once (as in `slimlm distill`), so a second run on the same data is cheaper.
    """
    from slimlm.train.configs import DistillConfig
    from slimlm.train.core import TrainConfig
    from slimlm.train.moe.recover import moe_train

    tc = TrainConfig(lr=lr, max_steps=max_steps, max_tokens=max_tokens, batch_size=batch_size,
                     eval_every=eval_every, save_every=save_every, seed=seed)
    cfg = MoeTrainConfig(parts=parts, aux_weight=aux_weight, z_weight=z_weight,
                         distill=DistillConfig(weight_ce=weight_ce, seq_len=seq_len, train=tc))
    result = moe_train(model, data, out_dir, teacher=teacher, config=cfg, resume=resume, force=force)
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    table = Table(title=f"{result.teacher} → {model} → {result.out}", show_header=False, box=None)
    table.add_row("trained", f"{parts}: {result.trainable_params:,} of {result.total_params:,} parameters")
    add_training_rows(table, result.train, result.out)
    out.print(table)


@moe_app.command("stats")
def stats_cmd(
    model: str = ModelArg,
    data: str = typer.Option("python-docs", "--data", help="Text to route: python-docs (built in, its calibration "
                             "part), mix, a .txt file or a .jsonl file of {\"text\"} lines."),
    tokens: int = typer.Option(100_000, "--tokens", help="Tokens to route, at most."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence (at most the model's context)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write share_heatmap.png, "
                                           "share_by_layer.png, stats.json and stats.html into."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Show how a mixture of experts routes: each expert's share of the tokens, router entropy and balance.

    \b
    Example: slimlm moe stats ./moe --tokens 20000 --out moe-stats
    Balance is Switch Transformer's E * sum_i f_i * P_i: 1.0 is perfectly balanced, E all on one expert.
    """
    from slimlm.train.moe.stats import moe_stats, write_plots

    stats = moe_stats(model, data, max_tokens=tokens, seq_len=seq_len)
    written = write_plots(stats, out_dir) if out_dir is not None else []
    if as_json:
        print(json.dumps(stats.to_dict()))
        return
    table = Table(title=f"{model}: {stats.experts} experts, top-{stats.top_k}, {stats.tokens:,} tokens "
                        f"({stats.scoring} router)")
    for column in ("layer", "share min", "share max", f"entropy (of {math.log(stats.experts):.2f})", "balance"):
        table.add_column(column, justify="right")
    for lay in stats.layers:
        table.add_row(str(lay.layer), f"{lay.share_min:.3f}", f"{lay.share_max:.3f}", f"{lay.entropy:.3f}",
                      f"{lay.balance:.3f}")
    out.print(table)
    out.print(f"[dim]balanced share: {1 / stats.experts:.3f}; balance 1.0 = perfectly balanced; "
              f"{stats.seconds:.1f} s[/dim]")
    for path in written:
        out.print(f"wrote {path}", markup=False, highlight=False)


@moe_app.command("prune")
def prune_cmd(
    model: str = ModelArg,
    out_path: Path = typer.Option(..., "--out", "-o", help="The Hugging Face folder to write."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Experts to keep in every MoE layer."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Instead of --keep: fraction of experts to remove."),
    method: str = registry_option(EXPERT_PRUNERS, "least-routed", "--method"),
    active: Optional[int] = typer.Option(None, "--active", help="Experts each token is routed to afterwards "
                                         "(default: as before, or --keep if fewer)."),
    data: str = typer.Option("python-docs", "--data", help="Calibration text: python-docs (built in), mix, a .txt "
                             "file or a .jsonl file of {\"text\"} lines."),
    tokens: int = typer.Option(32_768, "--tokens", help="Calibration tokens to measure routing on."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Remove the experts a mixture of experts routes least to, in every MoE layer.

    \b
    Example: slimlm moe prune ./moe --keep 6 --out moe-6
    Example: slimlm moe prune ./moe --ratio 0.25 --method merge --active 2 --out moe-merged
    Removing experts loses quality: check with `slimlm eval`, and train it back with `slimlm moe train`.
    """
    from slimlm.train.moe.prune import prune_experts

    result = prune_experts(model, out_path, keep=keep, ratio=ratio, method=method, active=active, texts=data,
                           calib_tokens=tokens, force=force)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table(title=f"{model} → {result.out}", show_header=False, box=None)
    table.add_row("method", result.method)
    table.add_row("experts", f"{result.experts_before} → {result.experts_after} per layer, top-{result.top_k_before} "
                             f"→ top-{result.top_k_after}")
    table.add_row("parameters", f"{result.params_before:,} → {result.params_after:,}")
    shares = result.dropped_share.values()
    table.add_row("routed to dropped", f"{min(shares):.1%} to {max(shares):.1%} of assignments per layer "
                                       f"({result.tokens:,} tokens)")
    for layer, into in result.merged.items():
        table.add_row(f"layer {layer} merged", ", ".join(f"{d} → {t}" for d, t in into.items()))
    table.add_row("time", f"{result.seconds:.1f} s")
    out.print(table)
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")
