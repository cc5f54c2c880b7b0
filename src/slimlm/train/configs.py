"""The settings of `finetune` and `distill` as data: one dataclass per verb.

Each composes `TrainConfig` (the optimisation, its `train` section) with the verb's own settings.
The CLI builds one from its flags (over a `--config` YAML recipe, loaded strictly by
slimlm.config.load_config), the library takes it, and `validate()` checks what can be checked from
the settings alone, before a model is loaded or an output folder touched. The model references,
the data and the output folder are not settings: they are the call's positional arguments.

Field names are the YAML keys; they follow the CLI flags (`--seq-len` is `seq_len`), except where
a field names the library's argument (`target_modules` for `--target`, and in `train`,
`early_stop_patience` for `--early-stop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.train.core import TrainConfig

METHODS = {"lora": "low-rank adapters beside the chosen projections; the model's weights stay frozen",
           "dora": "LoRA plus a learned magnitude per weight column (closer to full fine-tuning)",
           "full": "every weight is trained (needs ~4x the model's size in memory for Adam)"}
MODES = {"logit": "match the teacher's next-token distributions (one vocabulary; cached top-k teacher)",
         "sequence": "fine-tune on the teacher's answers to the training prompts (any tokenizers)"}


@dataclass
class FinetuneConfig:
    """Every setting of `slimlm finetune` (see examples/recipes/lora-finetune.yaml)."""

    method: str = "lora"  # lora, dora or full (METHODS)
    rank: int = 16  # LoRA rank: adapter width
    alpha: float = 32  # LoRA scale: the update is multiplied by alpha / rank
    dropout: float = 0.05  # on the adapter's input
    target_modules: list[str] | None = None  # modules to adapt (None: the family's default)
    merge: bool = False  # also fold the adapter into a dense model (OUT), keeping it in OUT/adapter
    gguf: bool = False  # LoRA: also write the adapter for llama.cpp (adapter.gguf)
    train_on_prompt: bool = False  # learn the prompt tokens too
    seq_len: int = 512  # tokens per example (longer ones are cut) or packed block
    eval_fraction: float = 0.1  # share of the data held out
    pack: bool | None = None  # None: pack plain text, keep chat/pair examples one per row
    skip_bad_lines: bool = False  # skip malformed JSONL lines (counted) instead of stopping
    curriculum: str | None = None  # order training by a score the records carry (metadata.KEY[:desc]), not shuffled
    curriculum_buckets: int = 0  # >1: that many score buckets in order, each shuffled
    train: TrainConfig = field(default_factory=TrainConfig)  # its `out` is the run's OUT

    def validate(self) -> FinetuneConfig:
        """Raise a one-line SlimlmError on a bad or contradictory setting; returns self."""
        if self.method not in METHODS:
            raise SlimlmError(f"unknown method '{self.method}': choose {', '.join(METHODS)}")
        if self.merge and self.method == "full":
            raise SlimlmError("--merge folds an adapter into the weights: full fine-tuning already writes dense "
                              "weights")
        if self.gguf and self.method != "lora":
            raise SlimlmError(f"--gguf writes a llama.cpp LoRA adapter, which {self.method} is not: "
                              "`slimlm export` a merged or fully fine-tuned model instead")
        _check_fraction(self.eval_fraction)
        _check_curriculum(self.curriculum, self.curriculum_buckets)
        self.train.validate(need_out=False)
        return self


@dataclass
class DistillConfig:
    """Every setting of `slimlm distill` (see examples/recipes/distill-logit.yaml). `loss` and
    `skew` are the flags' names; the run's records keep the library's (`kind`, `alpha`)."""

    mode: str = "logit"  # logit or sequence (MODES)
    loss: str = "forward_kl"  # logit: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl
    weight_ce: float = 0.0  # share of plain cross-entropy mixed in
    temperature: float = 1.0  # softens both distributions (loss scaled by T^2)
    beta: float = 0.5  # jsd: the teacher's weight in the mixture
    skew: float = 0.1  # skew_kl / skew_reverse_kl: the mixing weight
    top_k: int = 32  # teacher log-probs kept per token in the cache
    cache: Path | None = None  # teacher cache folder (logit) or answers JSONL (sequence); None: the default
    on_policy: float = 0.0  # logit: fraction of steps on the student's own samples (GKD)
    method: str = "full"  # full, lora or dora
    rank: int = 16
    lora_alpha: float | None = None  # None: 2 x rank
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    merge: bool = False
    seq_len: int = 512
    eval_fraction: float = 0.1
    pack: bool | None = None
    train_on_prompt: bool = False
    skip_bad_lines: bool = False
    curriculum: str | None = None  # order training by a score the records carry (metadata.KEY[:desc]), not shuffled
    curriculum_buckets: int = 0  # >1: that many score buckets in order, each shuffled
    prompt_tokens: int = 64  # sequence, plain text: tokens of each block the teacher continues
    max_new_tokens: int = 256  # sequence: longest teacher answer
    gen_temperature: float = 0.0  # sequence: 0 greedy, else sampling
    gen_batch_size: int = 8  # sequence: prompts the teacher answers at once
    backend: str = "auto"  # sequence: the teacher's backend (auto, torch, llamacpp)
    cache_batch_size: int = 4  # logit: sequences per teacher forward pass while building the cache
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))  # its `out` is the run's OUT

    @property
    def adapter_alpha(self) -> float:
        """The LoRA alpha used: lora_alpha, or twice the rank when it is not set."""
        return 2 * self.rank if self.lora_alpha is None else self.lora_alpha

    def validate(self) -> DistillConfig:
        """Raise a one-line SlimlmError on a bad or contradictory setting; returns self."""
        from slimlm.train.losses import KINDS

        if self.mode not in MODES:
            raise SlimlmError(f"unknown mode '{self.mode}': choose {', '.join(MODES)}")
        if self.loss not in KINDS:
            raise SlimlmError(f"unknown distillation loss '{self.loss}': choose one of {', '.join(KINDS)}")
        if self.method not in METHODS:
            raise SlimlmError(f"unknown method '{self.method}': choose full, lora or dora")
        if not 0.0 <= self.on_policy <= 1.0 or (self.on_policy and self.mode != "logit"):
            raise SlimlmError(f"--on-policy {self.on_policy} must be in [0, 1], and only with --mode logit (it needs "
                              "the teacher's distribution on the student's own samples)")
        if self.merge and self.method == "full":
            raise SlimlmError("--merge folds an adapter into the weights: full training already writes dense weights")
        _check_fraction(self.eval_fraction)
        _check_curriculum(self.curriculum, self.curriculum_buckets)
        self.train.validate(need_out=False)
        return self


def _check_fraction(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise SlimlmError(f"--eval-fraction {value} must be at least 0 and below 1 (the share held out)")


def _check_curriculum(curriculum: str | None, buckets: int) -> None:
    from slimlm.train.data import parse_curriculum

    if curriculum is not None:
        parse_curriculum(curriculum)
    if buckets < 0 or (buckets and curriculum is None):
        raise SlimlmError("--curriculum-buckets needs --curriculum and must be at least 0")
