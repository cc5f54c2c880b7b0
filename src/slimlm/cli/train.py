"""The training verbs of the CLI: finetune. Parsing and printing only; the work is in slimlm.train.

Each training verb builds its config dataclass (slimlm.train.configs) and hands it to the library:
the `--config` YAML recipe's settings (or the defaults), then every option the user typed, so an
option on the command line overrides the recipe. Click's parameter source tells a typed option
from a default one; the defaults shown in --help are the dataclass's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from slimlm.cli.app import ModelArg, app, out
from slimlm.train.configs import METHODS, FinetuneConfig

_F, _T = FinetuneConfig(), FinetuneConfig().train
ConfigOpt = typer.Option(None, "--config", help="YAML recipe of the settings (examples/recipes/); options "
                         "given on the command line override it. An unknown key is an error.")


def option_fields(command, cls, renames: dict[str, str]) -> dict[str, str]:
    """CLI option (parameter name) -> config field ("train.x": the TrainConfig section's x), derived
    from the names: an option named like a field of the config or of its `train` section sets that
    field; `renames` lists the options named otherwise. Derived, so a new option cannot be forgotten."""
    import inspect
    from dataclasses import fields

    from slimlm.train.core import TrainConfig

    top = {f.name for f in fields(cls)} - {"train"}
    train = {f.name for f in fields(TrainConfig)} - {"out"}
    mapping = {}
    for param in inspect.signature(command).parameters:
        name = renames.get(param) or (param if param in top else f"train.{param}" if param in train else None)
        if name:
            mapping[param] = name
    return mapping


def config_from_cli(ctx: typer.Context, cls, recipe: Optional[Path], flags: dict[str, str]):
    """The verb's config: the recipe's settings (or the defaults), then the options the user typed.
    The source is compared by name: typer vendors its own click, whose ParameterSource is not click's."""
    from slimlm.config import load_config, replace_checked

    config = load_config(cls, recipe) if recipe else cls()
    typed: dict = {}
    for param, name in flags.items():
        if getattr(ctx.get_parameter_source(param), "name", None) not in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            continue
        value = ctx.params[param]
        value = list(value) if isinstance(value, tuple) else value
        section, _, key = name.rpartition(".")
        (typed.setdefault(section, {}) if section else typed)[key] = value
    return replace_checked(config, "command line", **typed)


def add_training_rows(table: Table, run, out_dir: Path) -> None:
    """The rows every training verb (finetune, distill) ends its summary with; `run` is a TrainResult."""
    table.add_row("steps, tokens", f"{run.steps} steps, {run.tokens:,} tokens in {run.seconds:.1f} s ({run.stopped})")
    if run.train_loss is not None:
        table.add_row("training loss (last step)", f"{run.train_loss:.4f}")
    if run.eval_loss is not None:
        table.add_row("held-out loss, perplexity", f"{run.eval_loss:.4f}, {run.perplexity:.3f}")
    table.add_row("log, plot", f"{out_dir / 'train_log.jsonl'}, {out_dir / 'loss.png'}")


@app.command()
def finetune(
    ctx: typer.Context,
    model: str = ModelArg,
    data: str = typer.Option(..., "--data", "-d", help="JSONL of {\"messages\": [...]} chats, {\"prompt\", "
                             "\"completion\"} pairs or {\"text\"} lines; a .txt file; or python-docs."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the result, checkpoints/, train_log.jsonl "
                                 "and loss.png."),
    method: str = typer.Option(_F.method, "--method", help="; ".join(f"{k}: {v}" for k, v in METHODS.items())),
    rank: int = typer.Option(_F.rank, "--rank", "-r",
                             help="LoRA rank: adapter width (8-64 typical; more learns more)."),
    alpha: float = typer.Option(_F.alpha, "--alpha", help="LoRA scale; the update is multiplied by alpha/rank."),
    dropout: float = typer.Option(_F.dropout, "--dropout",
                                  help="Dropout on the adapter's input (regularizes small data)."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="Module to adapt (repeat, or comma-separate); "
                                               "default: the family's attention and MLP projections."),
    merge: bool = typer.Option(False, "--merge", help="Also fold the adapter into the weights: OUT becomes a dense "
                               "model folder every slimlm command takes (the adapter stays in OUT/adapter)."),
    epochs: float = typer.Option(_T.epochs, "--epochs",
                                 help="Passes over the training data (ignored with --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps to train for."),
    lr: float = typer.Option(_T.lr, "--lr", help="Peak learning rate (LoRA 1e-4..1e-3; full fine-tuning ~1e-5)."),
    batch_size: int = typer.Option(_T.batch_size, "--batch-size", "-b",
                                   help="Examples per micro-batch (per process)."),
    grad_accum: int = typer.Option(_T.grad_accum, "--grad-accum", help="Micro-batches per optimizer step: a bigger "
                                   "effective batch without more memory."),
    seq_len: int = typer.Option(_F.seq_len, "--seq-len",
                                help="Tokens per example (longer ones are cut) or packed block."),
    eval_fraction: float = typer.Option(_F.eval_fraction, "--eval-fraction", help="Share of the data held out to "
                                        "measure held-out loss and perplexity (0 for none)."),
    schedule: str = typer.Option(_T.schedule, "--schedule",
                                 help="Learning-rate schedule: cosine, linear or constant."),
    warmup_steps: int = typer.Option(_T.warmup_steps, "--warmup-steps",
                                     help="Steps of linear warm-up before the schedule."),
    eval_every: int = typer.Option(_T.eval_every, "--eval-every",
                                   help="Steps between held-out evaluations (0: at the end)."),
    save_every: int = typer.Option(_T.save_every, "--save-every",
                                   help="Steps between checkpoints for --resume (0: none)."),
    early_stop: int = typer.Option(_T.early_stop_patience, "--early-stop", help="Stop after this many evaluations "
                                   "without a better held-out loss (0: never)."),
    seed: int = typer.Option(_T.seed, "--seed",
                             help="Seed for the split, the data order, dropout and the adapter's init."),
    pack: bool = typer.Option(False, "--pack", help="Pack chat/pair examples into --seq-len blocks (plain text "
                              "always is): no padding, masks kept."),
    gguf: bool = typer.Option(False, "--gguf", help="LoRA: also write the adapter for llama.cpp (adapter.gguf; "
                              "llama-cli -m base.gguf --lora adapter.gguf)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in "
                                                "the backward pass: less memory, ~30% slower."),
    train_on_prompt: bool = typer.Option(False, "--train-on-prompt", help="Learn the prompt tokens too, not only "
                                         "the answers."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed JSONL lines (counted) "
                                        "instead of stopping at the first."),
    curriculum: Optional[str] = typer.Option(None, "--curriculum", help="Train in the order of a score the records "
                                             "carry (metadata.KEY from slimlm curate: edu_score = best last; "
                                             "perplexity = easiest first; KEY:desc reverses) instead of shuffled."),
    curriculum_buckets: int = typer.Option(0, "--curriculum-buckets", help="With --curriculum: cut the order "
                                           "into this many score buckets, each shuffled (0: strict order)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT from its newest "
                                "checkpoint, with the same settings."),
    force: bool = typer.Option(False, "--force", help="Delete OUT (a previous slimlm run) and start over."),
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Teach a model your task from examples: LoRA/DoRA adapters or full fine-tuning.

    \b
    Example:
      slimlm finetune ./dense --data examples.jsonl --out ./tuned --max-steps 200 --merge
      slimlm generate ./tuned "Your prompt"
    Data, one JSON object per line (the model's chat template formats it; only the
    assistant's words are learned):
      {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
      {"prompt": "...", "completion": "..."}
    Plain text (.txt, {"text": ...} lines, python-docs) is learned whole.
    Without --merge, OUT is a peft adapter: PeftModel.from_pretrained(base, OUT).
    OUT/loss.png: training loss falling while held-out loss rises means memorizing;
    stop earlier (--early-stop) or lower --lr. Interrupted? Rerun with --resume.
    Several processes: accelerate launch --multi_gpu --num_processes 2 -m slimlm finetune ...
    Recipe: slimlm finetune ./dense --data chats.jsonl --out ./tuned --config examples/recipes/lora-finetune.yaml
    """
    from slimlm.train.finetune import finetune as do_finetune

    settings = config_from_cli(ctx, FinetuneConfig, config, FINETUNE_FLAGS)
    result = do_finetune(model, data, out_dir, settings, resume=resume, force=force)
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    d = result.data
    table = Table(title=f"{model} → {result.out}", show_header=False, box=None)
    table.add_row("method", f"{result.method}" + (f" on {', '.join(result.targets)}" if result.targets else ""))
    table.add_row("trained parameters", f"{result.trainable_params:,} of {result.total_params:,} "
                                        f"({result.trainable_params / max(result.total_params, 1):.2%})")
    table.add_row("data", f"{d['train_examples']} training / {d['eval_examples']} held-out {d['kind']} examples"
                          + (f", {d['truncated']} cut to --seq-len" if d["truncated"] else "")
                          + (f", {d['skipped']} bad lines skipped" if d["skipped"] else ""))
    add_training_rows(table, result.train, result.out)
    out.print(table)
    if result.method == "full" or result.merged:
        out.print(f"[dim]next: slimlm generate {result.out} \"...\"  or  "
                  f"slimlm export {result.out} --out model.gguf[/dim]")
    else:
        out.print(f"[dim]next: peft.PeftModel.from_pretrained(base, \"{result.adapter}\"), or rerun with --merge "
                  "for a standalone model[/dim]")


FINETUNE_FLAGS = option_fields(finetune, FinetuneConfig, {"target": "target_modules",
                                                          "early_stop": "train.early_stop_patience"})
