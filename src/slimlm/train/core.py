"""The training loop every slimlm training verb shares: fine-tuning now, distillation next.

Built on `accelerate.Accelerator`, so one script runs on a CPU, a GPU, or several processes
(`accelerate launch --num_processes 2 --cpu ...`) without code changes. What slimlm adds:
- Gradient accumulation weighted by tokens: each micro-batch counts by its label tokens, summed
  over the accumulation window and all processes (accelerate's recipe for variable-size
  samples), so batch 2 x accumulation 2 equals batch 4 even when padding differs.
- Exact resume: checkpoints hold the model, optimizer, scheduler and RNG states (accelerate's
  save_state) plus the data position, so an interrupted run continues to the same weights an
  uninterrupted one reaches. A checkpoint is written under a temporary name and renamed, so a
  crash never leaves a half checkpoint that --resume would trust.
- The loss is a parameter: `loss_fn(model, batch) -> (mean loss, tokens)`. The default is
  next-token cross-entropy on `labels`; distillation passes its own.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from slimlm.errors import SlimlmError
from slimlm.hardware import best_torch_device, cpu_info
from slimlm.train.data import IGNORE, TrainData, collate, fingerprint

LossFn = Callable[[object, dict], tuple]  # (model, batch) -> (mean loss over its tokens, token count)
SCHEDULES = ("cosine", "linear", "constant")
STATE_FILE = "trainer_state.json"
# Settings that do not change any step's weights (eval_every can move an early stop); all others must
# match the checkpoint's to resume.
RESUMABLE_CHANGES = {"out", "eval_every", "save_every", "keep_checkpoints"}


@dataclass
class TrainConfig:
    """The optimisation settings of a training run: the `train` section of a finetune or distill
    recipe, and what a checkpoint records so --resume can refuse a changed run."""

    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; set, it replaces epochs
    batch_size: int = 4  # examples per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    schedule: str = "cosine"  # cosine, linear or constant, after warmup_steps of linear warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 50  # steps between held-out evaluations (0: only at the end)
    save_every: int = 100  # steps between checkpoints (0: none)
    keep_checkpoints: int = 2  # newest checkpoints kept
    early_stop_patience: int = 0  # stop after this many evaluations without improvement (0: never)
    max_tokens: int | None = None  # stop after this many input tokens (all processes)
    seed: int = 0
    shuffle: bool = True  # each epoch in a new order; False keeps the data's order (a curriculum)
    gradient_checkpointing: bool = False
    bf16: str | bool = "auto"  # "auto": only where the hardware computes bf16 natively
    # run folder: checkpoints/, train_log.jsonl, loss.png; not a recipe key (finetune/distill set it from OUT)
    out: str | None = field(default=None, metadata={"recipe": False})

    def validate(self, need_out: bool = True) -> TrainConfig:
        """Raise a one-line SlimlmError on a bad setting. need_out=False checks a recipe's settings
        before the verb has filled in `out` (finetune and distill set it from their OUT)."""
        if self.schedule not in SCHEDULES:
            raise SlimlmError(f"unknown schedule '{self.schedule}': choose {', '.join(SCHEDULES)}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise SlimlmError(f"{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or (self.max_steps is None and self.epochs <= 0) or (self.max_steps or 1) < 1:
            raise SlimlmError("lr, epochs and max-steps must be positive")
        if need_out and not self.out:
            raise SlimlmError("TrainConfig.out is not set: give the folder for checkpoints and logs")
        return self

    def to_dict(self) -> dict:
        return dict(asdict(self), out=str(self.out) if self.out else None)


@dataclass
class TrainState:
    """Where a run is; saved with every checkpoint so --resume continues from exactly here."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed, per process
    tokens: int = 0  # input tokens trained on, all processes
    best_eval: float | None = None
    evals_since_best: int = 0


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float | None
    eval_loss: float | None
    perplexity: float | None
    best_eval_loss: float | None
    stopped: str  # "done", "max_tokens", "early_stop" or "paused" (until_step; resume to continue)
    seconds: float
    out: Path
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(asdict(self), out=str(self.out))
        d.pop("history")
        return d


def token_count(batch: dict):
    """Positions that predict a label (labels shift left by one): the weight of a micro-batch."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def causal_lm_loss(model, batch: dict):
    """Mean next-token cross-entropy over the labelled positions, and how many there were."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    n = (labels != IGNORE).sum()
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                            reduction="sum")
    return total / n.clamp(min=1), n


def mixed_precision(bf16: str | bool) -> str:
    """accelerate's mixed_precision: bf16 on GPUs that have it and CPUs with AMX/AVX-512 BF16.
    Elsewhere bf16 is emulated, slower than fp32, so "auto" means fp32 there."""
    if bf16 != "auto":
        return "bf16" if bf16 else "no"
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_info().native_bf16 else "no"


def process_state():
    """accelerate's per-process state, created the way the Trainer's Accelerator expects it
    (cpu=True where there is no GPU): call this, not PartialState(), before a Trainer exists."""
    from accelerate import PartialState

    return PartialState(cpu=best_torch_device() == "cpu")


def _examples(data) -> list[dict]:
    items = data if isinstance(data, list) else list(data or [])
    return [dict(ex, index=i) for i, ex in enumerate(items)]


def _trainable_only(models, weights, _output_dir) -> None:
    """save_state pre-hook: with frozen weights (LoRA), checkpoint only what training changes."""
    for model, state in zip(models, weights):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if len(trainable) < sum(1 for _ in model.parameters()):
            for key in [k for k in state if k not in trainable]:
                del state[key]


class Trainer:
    """Train `model` in place on lists of {"input_ids", "labels"} examples (or a TrainData's lists)."""

    def __init__(self, model, config: TrainConfig, train_data: list[dict] | TrainData, eval_data=None,
                 loss_fn: LossFn | None = None, eval_loss_fn: LossFn | None = None):
        import torch
        from accelerate import Accelerator, DataLoaderConfiguration
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        if isinstance(train_data, TrainData):
            train_data, eval_data = train_data.train, train_data.eval if eval_data is None else eval_data
        self.config = config.validate()
        self.out = Path(config.out)
        self.loss_fn = loss_fn or causal_lm_loss
        self.eval_loss_fn = eval_loss_fn or causal_lm_loss  # held-out NLL stays comparable across losses
        self.train_data, self.eval_data = _examples(train_data), _examples(eval_data)
        if not self.train_data:
            raise SlimlmError("no training examples: give more data or a smaller --eval-fraction")
        self.data_fingerprint = fingerprint(self.train_data)
        # cpu=True where there is no GPU: then `accelerate launch --multi_gpu` or torchrun runs
        # several CPU processes over gloo (accelerate's own --cpu launcher needs MPI for that).
        acc = self.accelerator = Accelerator(
            cpu=best_torch_device() == "cpu", mixed_precision=mixed_precision(config.bf16),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed))
        set_seed(config.seed)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        # Its own generator: otherwise each new iterator draws from the global RNG, and a resumed
        # run (which starts an iterator mid-epoch) would see different dropout masks.
        loader = torch.utils.data.DataLoader(self.train_data, batch_size=config.batch_size, shuffle=config.shuffle,
                                             collate_fn=collate, generator=torch.Generator().manual_seed(config.seed))
        self.model, self.optimizer, self.loader = acc.prepare(model, optimizer, loader)
        steps_per_epoch = math.ceil(len(self.loader) / config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        # A prepared scheduler steps once per process on every optimizer step: scale to match.
        name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
        scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=config.warmup_steps * acc.num_processes,
                                  num_training_steps=self.total_steps * acc.num_processes)
        self.scheduler = acc.prepare(scheduler)
        acc.register_save_state_pre_hook(_trainable_only)
        self.log_path, self.plot_path = self.out / "train_log.jsonl", self.out / "loss.png"

    @property
    def unwrapped_model(self):
        """The trained model as a plain module, for after training: without DDP and without the
        autocast wrapper that mixed precision puts on its forward (bf16 on CPUs with native bf16),
        so it computes like the same weights loaded afresh."""
        return self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)

    # --- one optimizer step ------------------------------------------------------------------
    def _step(self, window: list[dict]) -> tuple[float, int]:
        import torch

        acc, world = self.accelerator, self.accelerator.num_processes
        counts = [token_count(b) for b in window]
        sums = acc.reduce(torch.stack([sum(counts), sum(b["attention_mask"].sum() for b in window)]).float(), "sum")
        self.model.train()
        loss_sum = torch.zeros((), device=acc.device)
        for i, (batch, n) in enumerate(zip(window, counts)):
            # Gradients cross processes once per step, on the last micro-batch.
            with acc.no_sync(self.model) if i < len(window) - 1 else nullcontext():
                loss, _ = self.loss_fn(self.model, batch)
                acc.backward(loss * n * world / sums[0].clamp(min=1))
                loss_sum += loss.detach().float() * n
        if self.config.max_grad_norm:
            acc.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return (acc.reduce(loss_sum, "sum") / sums[0].clamp(min=1)).item(), int(sums[1].item())

    def evaluate(self) -> dict | None:
        """Mean NLL (and perplexity) per labelled token of the held-out examples, all processes."""
        import torch

        if not self.eval_data:
            return None
        acc, bs = self.accelerator, self.config.batch_size
        sums = torch.zeros(2, device=acc.device)
        self.model.eval()
        with acc.split_between_processes(self.eval_data) as part, torch.no_grad(), acc.autocast():
            for i in range(0, len(part), bs):
                batch = {k: v.to(acc.device) for k, v in collate(part[i:i + bs]).items()}
                loss, n = self.eval_loss_fn(self.model, batch)
                sums += torch.stack([loss.float() * n, torch.as_tensor(n, device=acc.device).float()])
        sums = acc.reduce(sums, "sum")
        nll = (sums[0] / sums[1].clamp(min=1)).item()
        return {"eval_loss": nll, "perplexity": math.exp(min(nll, 50.0))}

    # --- the loop ----------------------------------------------------------------------------
    def train(self, resume: bool = False, until_step: int | None = None) -> TrainResult:
        """Train to the configured end. `until_step` pauses after that step with a checkpoint (a
        time-limited job's slice); `resume` continues from the newest checkpoint in `out`."""
        acc, cfg = self.accelerator, self.config
        state = self._load_checkpoint() if resume else TrainState()
        history = self._start_log(state.step)
        start, evaluated = time.perf_counter(), None
        last = next((r for r in reversed(history) if "loss" in r), {})
        stopped = self._stop_reason(state, until_step) if resume else None  # e.g. resuming a finished run
        with _progress(self.total_steps, state.step, acc.is_main_process) as update:
            while stopped is None:
                self.loader.set_epoch(state.epoch)
                # Resuming mid-epoch: the same shuffled order (seeded by epoch), minus what was used.
                it = iter(acc.skip_first_batches(self.loader, state.batch_in_epoch) if state.batch_in_epoch
                          else self.loader)
                while stopped is None and (window := list(itertools.islice(it, cfg.grad_accum))):
                    t0 = time.perf_counter()
                    loss, tokens = self._step(window)
                    state.step += 1
                    state.batch_in_epoch += len(window)
                    state.tokens += tokens
                    last = {"step": state.step, "epoch": state.epoch, "loss": loss,
                            "lr": self.scheduler.get_last_lr()[0], "tokens": state.tokens,
                            "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)}
                    history.append(self._log(last))
                    update(advance=1, loss=f"{loss:.3f}", tps=f"{last['tokens_per_s']:.0f}")
                    stopped = self._stop_reason(state, until_step)
                    # Not on "paused": an extra evaluation would change the early-stop count it saves.
                    if cfg.eval_every and state.step % cfg.eval_every == 0 or stopped in ("done", "max_tokens"):
                        evaluated = self._eval_and_track(state, history)
                        if stopped is None and cfg.early_stop_patience and \
                                state.evals_since_best >= cfg.early_stop_patience:
                            stopped = "early_stop"
                    if cfg.save_every and state.step % cfg.save_every == 0 or stopped == "paused":
                        self.save_checkpoint(state)
                if stopped is None:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if acc.is_main_process:
            plot_losses(history, self.plot_path)
        acc.wait_for_everyone()
        return TrainResult(state.step, state.tokens, last.get("loss"), (evaluated or {}).get("eval_loss"),
                           (evaluated or {}).get("perplexity"), state.best_eval, stopped or "done",
                           time.perf_counter() - start, self.out, history)

    def _stop_reason(self, state: TrainState, until_step: int | None) -> str | None:
        if state.step >= self.total_steps:
            return "done"
        if self.config.max_tokens and state.tokens >= self.config.max_tokens:
            return "max_tokens"
        if until_step is not None and state.step >= until_step:
            return "paused"
        return None

    def _eval_and_track(self, state: TrainState, history: list[dict]) -> dict | None:
        result = self.evaluate()
        if result is None:
            return None
        if state.best_eval is None or result["eval_loss"] < state.best_eval:
            state.best_eval, state.evals_since_best = result["eval_loss"], 0
        else:
            state.evals_since_best += 1
        history.append(self._log({"step": state.step, **result}))
        return result

    # --- records ------------------------------------------------------------------------------
    def _start_log(self, step: int) -> list[dict]:
        """The log so far: empty for a new run; for a resumed one, rows up to the checkpoint (rows
        logged after it, before the interruption, are dropped: those steps will be run again).
        Only the main process keeps the log."""
        if not self.accelerator.is_main_process:
            return []
        rows = []
        if step and self.log_path.exists():
            rows = [r for r in map(json.loads, self.log_path.read_text().splitlines()) if r["step"] <= step]
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def _log(self, row: dict) -> dict:
        if self.accelerator.is_main_process:
            with self.log_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        return row

    def checkpoints(self) -> list[Path]:
        folder = self.out / "checkpoints"
        found = [p for p in folder.glob("step-*") if p.name[5:].isdigit()] if folder.is_dir() else []
        return sorted(found, key=lambda p: int(p.name[5:]))

    def save_checkpoint(self, state: TrainState) -> Path:
        acc = self.accelerator
        final = self.out / "checkpoints" / f"step-{state.step}"
        tmp = final.with_name(f".{final.name}.tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            record = {"state": asdict(state), "config": self.config.to_dict(), "data": self.data_fingerprint,
                      "num_processes": acc.num_processes, "total_steps": self.total_steps}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-max(self.config.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self) -> TrainState:
        found = self.checkpoints()
        if not found:
            raise SlimlmError(f"no checkpoint under {self.out / 'checkpoints'}: start without --resume")
        saved = json.loads((found[-1] / STATE_FILE).read_text())
        now = {**self.config.to_dict(), "data": self.data_fingerprint, "num_processes": self.accelerator.num_processes}
        was = {**saved["config"], "data": saved["data"], "num_processes": saved["num_processes"]}
        diff = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(was))
                if k not in RESUMABLE_CHANGES and was.get(k) != now.get(k)]
        if diff:
            raise SlimlmError(f"cannot resume from {found[-1]}: settings differ from the checkpoint's "
                              f"({'; '.join(diff)}): rerun with the same settings, or --force to start over")
        self.accelerator.load_state(str(found[-1]), strict=False)  # strict=False: LoRA saves only adapters
        return TrainState(**saved["state"])


@contextmanager
def _progress(total: int, done: int, main: bool):
    """A bar with loss and tokens/s on a terminal (stderr), nothing in logs, CI or tests."""
    from slimlm.progress import enabled

    if not (main and enabled()):
        yield lambda **kw: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tokens/s"),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    with bar:
        task = bar.add_task("training", total=total, completed=done, loss="-", tps="-")
        yield lambda **kw: bar.update(task, **kw)


def plot_losses(history: list[dict], path: Path) -> Path:
    """Training loss per step and held-out loss per evaluation, as a PNG (Agg: no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
