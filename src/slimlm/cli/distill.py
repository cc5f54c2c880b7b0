"""The `distill` verb of the CLI. Parsing and printing only; the work is in slimlm.train.distill.
It builds a DistillConfig as finetune builds its config (cli/train.py: `--config` recipe, then typed options)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from slimlm.cli.app import app, out
from slimlm.cli.train import ConfigOpt, add_training_rows, config_from_cli, option_fields
from slimlm.train.configs import MODES, DistillConfig

_D, _T = DistillConfig(), DistillConfig().train

@app.command()
def distill(
    ctx: typer.Context,
    teacher: str = typer.Option(..., "--teacher", "-t", help="The model to learn from (folder, .gguf, built-in)."),
    student: str = typer.Option(..., "--student", "-s", help="The model that learns (e.g. a `slimlm prune` output)."),
    data: str = typer.Option(..., "--data", "-d", help="JSONL of chats, prompt/completion pairs or {\"text\"} lines; "
                             "a .txt file; or python-docs."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the student, checkpoints/, train_log.jsonl, "
                                 "loss.png."),
    mode: str = typer.Option(_D.mode, "--mode", help="; ".join(f"{k}: {v}" for k, v in MODES.items())),
    loss: str = typer.Option(_D.loss, "--loss", help="logit mode: forward_kl (mass-covering), reverse_kl "
                             "(mode-seeking), jsd (--beta), skew_kl or skew_reverse_kl (--skew)."),
    weight_ce: float = typer.Option(_D.weight_ce, "--weight-ce",
                                    help="Share of plain cross-entropy mixed into the loss (0-1)."),
    temperature: float = typer.Option(_D.temperature, "--temperature",
                                      help="Softens both distributions (loss scaled by T^2)."),
    beta: float = typer.Option(_D.beta, "--beta", help="jsd: the teacher's weight in the mixture (0 forward KL, 1 "
                               "reverse KL)."),
    skew: float = typer.Option(_D.skew, "--skew", help="skew_kl / skew_reverse_kl: the mixing weight alpha."),
    top_k: int = typer.Option(_D.top_k, "--top-k",
                              help="Teacher log-probs kept per token in the cache (6 bytes each)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="logit: teacher cache folder to build or reuse "
                                         "(default: in slimlm's cache, per teacher and data); sequence: the "
                                         "teacher's answers JSONL (default OUT/teacher_answers.jsonl)."),
    on_policy: float = typer.Option(_D.on_policy, "--on-policy", help="logit: fraction of steps on which the student "
                                    "samples and the teacher (kept in memory) scores its tokens (GKD)."),
    method: str = typer.Option(_D.method, "--method", help="full: train every weight; lora / dora: adapters only."),
    rank: int = typer.Option(_D.rank, "--rank", "-r", help="LoRA rank."),
    merge: bool = typer.Option(False, "--merge", help="LoRA: also write the merged dense student."),
    prompt_tokens: int = typer.Option(_D.prompt_tokens, "--prompt-tokens", help="sequence, plain text: tokens of "
                                      "each block the teacher continues."),
    max_new_tokens: int = typer.Option(_D.max_new_tokens, "--max-new-tokens",
                                       help="sequence: longest teacher answer."),
    gen_temperature: float = typer.Option(_D.gen_temperature, "--gen-temperature",
                                          help="sequence: 0 greedy, else sampling."),
    gen_batch_size: int = typer.Option(_D.gen_batch_size, "--gen-batch-size",
                                       help="sequence: prompts the teacher answers at once."),
    backend: str = typer.Option(_D.backend, "--backend",
                                help="sequence: the teacher's backend (auto, torch, llamacpp)."),
    epochs: float = typer.Option(_T.epochs, "--epochs",
                                 help="Passes over the training data (ignored with --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps to train for."),
    lr: float = typer.Option(_T.lr, "--lr",
                             help="Peak learning rate (full ~1e-4 for a pruned student; LoRA ~5e-4)."),
    batch_size: int = typer.Option(_T.batch_size, "--batch-size", "-b",
                                   help="Examples per micro-batch (per process)."),
    grad_accum: int = typer.Option(_T.grad_accum, "--grad-accum", help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(_D.seq_len, "--seq-len", help="Tokens per example or packed block."),
    eval_fraction: float = typer.Option(_D.eval_fraction, "--eval-fraction",
                                        help="Share held out for held-out loss (0: none)."),
    schedule: str = typer.Option(_T.schedule, "--schedule", help="cosine, linear or constant."),
    warmup_steps: int = typer.Option(_T.warmup_steps, "--warmup-steps", help="Steps of linear warm-up."),
    eval_every: int = typer.Option(_T.eval_every, "--eval-every",
                                   help="Steps between held-out evaluations (0: at the end)."),
    save_every: int = typer.Option(_T.save_every, "--save-every",
                                   help="Steps between checkpoints for --resume (0: none)."),
    seed: int = typer.Option(_T.seed, "--seed", help="Seed for the split, data order, sampling and initialization."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="LoRA: modules to adapt (default per family)."),
    train_on_prompt: bool = typer.Option(False, "--train-on-prompt", help="Learn the prompt tokens too."),
    curriculum: Optional[str] = typer.Option(None, "--curriculum", help="Train in the order of a score the records "
                                             "carry (metadata.KEY from slimlm curate: edu_score = best last; "
                                             "perplexity = easiest first; KEY:desc reverses) instead of shuffled."),
    curriculum_buckets: int = typer.Option(0, "--curriculum-buckets", help="With --curriculum: cut the order "
                                           "into this many score buckets, each shuffled (0: strict order)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT (same settings)."),
    force: bool = typer.Option(False, "--force", help="Delete OUT (a previous slimlm run) and start over."),
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Teach a smaller student what a larger teacher knows: logit or sequence-level distillation.

    \b
    Example (prune then distill, the Minitron recipe):
      slimlm prune ./dense --method width --keep-params 0.5 --out ./half
      slimlm distill --teacher ./dense --student ./half --data python-docs --out ./half-kd --max-steps 200
      slimlm eval ./half-kd --task perplexity:python-docs --reference ./dense
    logit mode runs the teacher once over the data into a top-k cache (bytes/token shown), then
    trains without it; a second student on the same data reuses the cache. Teacher and student
    must share a vocabulary; otherwise use --mode sequence, where the teacher writes answers to
    your prompts (resumable) and the student is fine-tuned on them.
    Interrupted? Rerun with --resume. Every setting (and more: lora_alpha, pack, ...) can come from
    a YAML recipe: --config examples/recipes/distill-logit.yaml; options typed here override it.
    """
    from slimlm.train.distill import distill as do_distill

    settings = config_from_cli(ctx, DistillConfig, config, DISTILL_FLAGS)
    result = do_distill(teacher, student, data, out_dir, settings, resume=resume, force=force)
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    d = result.data
    table = Table(title=f"{teacher} → {student} → {result.out}", show_header=False, box=None)
    how = f"{result.mode}" + (f", {result.kind}" if result.mode == "logit" else "")
    table.add_row("distillation", how + (f", on-policy {settings.on_policy:.0%} of steps" if settings.on_policy else ""))
    table.add_row("method", f"{result.method}: {result.trainable_params:,} of {result.total_params:,} parameters")
    if result.mode == "logit":
        table.add_row("teacher cache", f"{result.cache} ({'reused' if result.cache_reused else 'built'}, "
                                       f"{result.cache_bytes_per_token:.0f} bytes/token)")
    else:
        table.add_row("teacher answers", f"{result.cache} ({'reused' if result.cache_reused else 'generated'})")
    table.add_row("data", f"{d['train_examples']} training / {d['eval_examples']} held-out {d['kind']} examples")
    add_training_rows(table, result.train, result.out)
    out.print(table)
    if result.method == "full" or settings.merge:
        out.print(f"[dim]next: slimlm eval {result.out} --task perplexity:python-docs --reference {teacher}[/dim]")


DISTILL_FLAGS = option_fields(distill, DistillConfig, {"target": "target_modules"})
