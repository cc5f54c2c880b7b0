"""Candidate kinds: how a shrink search turns one CandidateSpec into a model file.

Each kind is a small class in CANDIDATE_KINDS (the same Registry as the quantization and prune
methods): `check` validates a preset's settings before any work, `build` writes the candidate into
its own folder. The kinds are thin: every number a candidate has comes from the verbs the user
can run by hand (`quantize`, `prune`, `distill`), called through their library functions, so a
shrink result can always be reproduced one verb at a time.

A new kind is one class here (or in a plugin module) with `@CANDIDATE_KINDS.register("name")`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.registry import Registry


@dataclass
class CandidateSpec:
    """One candidate to build: a kind and that kind's settings (unused ones stay None)."""
    kind: str
    method: str | None = None  # quantize: a QUANT_METHODS name; prune: a PRUNE_METHODS name
    format: str | None = None  # the GGUF type written (prune: the type the pruned model is stored as)
    target_bpw: float | None = None  # quantize: per-tensor mixed precision under this many bits per weight
    calib: str | None = None  # quantize (calibrated methods): calibration text; None: the task data or default
    ratio: float | None = None  # prune: the fraction removed
    distill_steps: int = 0  # prune: logit-distillation steps from the parent afterwards (0: none)
    train_steps: int | None = None  # finetune: LoRA steps on the user's --data
    label: str | None = None  # the name shown in tables (default: built from the settings)
    baseline: bool = False  # always evaluated in full (never pruned on proxies): the reference users compare with

    def name(self) -> str:
        if self.label:
            return self.label
        parts = ["finetune" if self.kind == "finetune" else (self.method or self.kind)]
        if self.ratio is not None:
            parts.append(f"{self.ratio:g}")
        if self.distill_steps:
            parts.append(f"kd{self.distill_steps}")
        if self.train_steps:
            parts.append(f"lora{self.train_steps}")
        if self.target_bpw is not None:
            parts.append(f"{self.target_bpw:g}bpw")
        elif self.format:
            parts.append(self.format.partition(":")[2] or self.format)
        return " ".join(parts)

    def key(self) -> str:
        """A file-system-safe id: the name plus a hash of every setting (a changed setting is a new candidate)."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9_.]+', '-', self.name()).strip('-').lower()}-{digest}"


@dataclass
class BuildContext:
    """What every build gets: the parent's dense folder and the calibration text source."""
    parent: Path  # the parent's Hugging Face folder
    calib: str | None  # calibration text (a file, or a built-in corpus name); None: each method's default
    data: str | None = None  # the user's training data (--data), for kinds that train on it
    notes: list[str] = field(default_factory=list)


@dataclass
class Built:
    artifact: Path  # the GGUF file that is served and measured
    hf_folder: Path | None = None  # the Hugging Face folder it came from, where the candidate has one
    notes: list[str] = field(default_factory=list)


class SkipCandidate(SlimlmError):
    """A candidate that does not apply to this search (e.g. a fine-tune without --data)."""


class CandidateKind:
    help = ""
    name = ""
    judged_by_kl = True  # False: the candidate changes the model on purpose, so KL to the parent is no proxy

    def check(self, spec: CandidateSpec) -> None:
        """Raise a one-line SlimlmError for settings this kind cannot build."""

    def build(self, spec: CandidateSpec, ctx: BuildContext, folder: Path) -> Built:
        raise NotImplementedError


CANDIDATE_KINDS: Registry[CandidateKind] = Registry("candidate kind", CandidateKind)


def _unused(spec: CandidateSpec, allowed: set[str]) -> None:
    for name in ("method", "format", "target_bpw", "calib", "ratio", "train_steps"):
        if getattr(spec, name) is not None and name not in allowed:
            raise SlimlmError(f"kind {spec.kind} takes no {name}: remove it (settings: {', '.join(sorted(allowed))})")
    if spec.distill_steps and "distill_steps" not in allowed:
        raise SlimlmError(f"kind {spec.kind} takes no distill_steps: remove it")


def _gguf_format(value: str | None, default: str) -> str:
    fmt = value or default
    return fmt if fmt.lower().startswith("gguf") else f"gguf:{fmt}"


@CANDIDATE_KINDS.register("quantize")
class QuantizeCandidate(CandidateKind):
    help = "a GGUF file from `slimlm quantize` (method: any quantization method; format or target_bpw)"

    def check(self, spec: CandidateSpec) -> None:
        from slimlm.compress.quant_methods import QUANT_METHODS

        _unused(spec, {"method", "format", "target_bpw", "calib"})
        if spec.method not in QUANT_METHODS:
            raise SlimlmError(f"unknown quantization method {spec.method!r}: choose one of {', '.join(QUANT_METHODS)}")
        if spec.format is None and spec.target_bpw is None:
            raise SlimlmError("a quantize candidate needs a format (e.g. gguf:Q4_0) or a target_bpw")
        if spec.format is not None and spec.target_bpw is not None:
            raise SlimlmError("give a quantize candidate either a format or a target_bpw, not both")
        if spec.target_bpw is not None and not 1.0 < spec.target_bpw <= 16.0:
            raise SlimlmError(f"target_bpw {spec.target_bpw} is outside 1..16 bits per weight")

    def build(self, spec: CandidateSpec, ctx: BuildContext, folder: Path) -> Built:
        from slimlm.compress.quantize import quantize

        out = folder / "model.gguf"
        kwargs = {"target_bpw": spec.target_bpw} if spec.target_bpw is not None else {}
        calib = spec.calib or ctx.calib
        if calib is not None:
            kwargs["calib"] = calib
        result = quantize(ctx.parent, out, method=spec.method, format=_gguf_format(spec.format, "gguf"),
                          force=True, check=False, **kwargs)
        return Built(out, notes=list(result.notes))


@CANDIDATE_KINDS.register("prune")
class PruneCandidate(CandidateKind):
    help = ("structured pruning (`slimlm prune`, method and ratio), then optional logit distillation from "
            "the parent (distill_steps: the Minitron recipe), stored as a GGUF type (format, default Q8_0)")

    def check(self, spec: CandidateSpec) -> None:
        from slimlm.compress.prune_methods import PRUNE_METHODS

        _unused(spec, {"method", "ratio", "format", "distill_steps", "calib"})
        if spec.method not in PRUNE_METHODS:
            raise SlimlmError(f"unknown prune method {spec.method!r}: choose one of {', '.join(PRUNE_METHODS)}")
        if spec.ratio is None or not 0.0 < spec.ratio < 1.0:
            raise SlimlmError("a prune candidate needs a ratio between 0 and 1 (the fraction removed)")
        if spec.distill_steps < 0:
            raise SlimlmError("distill_steps must be 0 or more")

    def build(self, spec: CandidateSpec, ctx: BuildContext, folder: Path) -> Built:
        from slimlm.compress.prune import prune
        from slimlm.compress.quantize import quantize

        pruned = folder / "pruned"
        prune(ctx.parent, pruned, method=spec.method, ratio=spec.ratio, force=True, progress=False)
        hf = pruned
        if spec.distill_steps:
            hf = self._distill(spec, ctx, pruned, folder)
        out = folder / "model.gguf"
        result = quantize(hf, out, method="rtn", format=_gguf_format(spec.format, "gguf:Q8_0"), force=True, check=False)
        return Built(out, hf_folder=hf, notes=list(result.notes))

    @staticmethod
    def _distill(spec: CandidateSpec, ctx: BuildContext, student: Path, folder: Path) -> Path:
        """Logit distillation from the parent on the calibration text (a text file of it is written
        once in the candidate's folder, since distill reads data from files)."""
        from slimlm.data import calibration_corpus
        from slimlm.train.core import TrainConfig
        from slimlm.train.distill import distill

        data = folder / "distill-data.txt"
        data.write_text("\n\n".join(calibration_corpus(spec.calib or ctx.calib or "python-docs")))
        out = folder / "distilled"
        distill(ctx.parent, student, data, out, force=True, record_run=True, progress=False,
                seq_len=256, train=TrainConfig(lr=1e-4, max_steps=spec.distill_steps, batch_size=4, eval_every=0,
                                               save_every=0))
        return out


@CANDIDATE_KINDS.register("finetune")
class FinetuneCandidate(CandidateKind):
    help = ("LoRA fine-tuning on your --data (train_steps), merged, then quantized (method, default rtn; "
            "format); skipped when no --data is given")
    judged_by_kl = False

    def check(self, spec: CandidateSpec) -> None:
        from slimlm.compress.quant_methods import QUANT_METHODS

        _unused(spec, {"method", "format", "train_steps", "calib"})
        if spec.method is not None and spec.method not in QUANT_METHODS:
            raise SlimlmError(f"unknown quantization method {spec.method!r}: choose one of {', '.join(QUANT_METHODS)}")
        if spec.train_steps is None or spec.train_steps < 1:
            raise SlimlmError("a finetune candidate needs train_steps (at least 1)")

    def build(self, spec: CandidateSpec, ctx: BuildContext, folder: Path) -> Built:
        from slimlm.compress.quantize import quantize
        from slimlm.train.core import TrainConfig
        from slimlm.train.finetune import finetune

        if ctx.data is None:
            raise SkipCandidate("needs your training data: pass --data FILE")
        tuned = folder / "tuned"
        finetune(ctx.parent, ctx.data, tuned, force=True, merge=True,
                 train=TrainConfig(max_steps=spec.train_steps, eval_every=0, save_every=0))
        out = folder / "model.gguf"
        kwargs = {"calib": spec.calib or ctx.calib or ctx.data}
        result = quantize(tuned, out, method=spec.method or "rtn", format=_gguf_format(spec.format, "gguf:Q8_0"),
                          force=True, check=False, **kwargs)
        return Built(out, hf_folder=tuned, notes=list(result.notes))
