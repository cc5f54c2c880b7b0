"""`slimlm prune`: make a model smaller by removing weights, measured on calibration text.

Four methods, one entry point:

- layers: drop whole decoder blocks by ShortGPT's block influence (prune_structured.py);
- width: narrow MLP channels, attention heads (grouped-query structure kept) and optionally the
  hidden size by Minitron's activation importance (prune_structured.py);
- wanda, sparsegpt: zero a fraction of each linear's weights, or an N:M pattern such as 2:4
  (prune_sparse.py). These store dense zeros: no smaller file and no speed-up on a CPU without
  sparse kernels; they tell you what a sparsity level costs in quality.

layers and width write a smaller *dense* Hugging Face folder of the same family, loadable by
`AutoModelForCausalLM.from_pretrained`, so eval, quantize and export work on it unchanged.
Pruned models lose quality; distilling from the original (slimlm.train) wins most of it back.

How much to remove is a `ratio` (fraction of layers, of channels/heads, or of weights) or a
`target_params`: the fraction of *non-embedding* parameters to keep (0.5 = half of them), for which
the cut is chosen to land as close as the method's granularity allows; the count reached is reported.
Calibration text defaults to python-docs without its last three topics, as GPTQ uses.

Each method is a class in prune_methods/, registered by name in PRUNE_METHODS; prune() looks it
up, asks it what it accepts, and hands it the loaded model (no branch here names a method).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.compress.prune_methods import PRUNE_METHODS, PruneJob, PruneMethod
from slimlm.compress.prune_methods.width import WIDTH_AXES
from slimlm.compress.prune_structured import param_counts
from slimlm.errors import SlimlmError

METHODS = PRUNE_METHODS  # the registry under its earlier name: {name: method class (with .help)}

__all__ = ["prune", "PruneResult", "PRUNE_METHODS", "METHODS", "WIDTH_AXES"]


@dataclass
class PruneResult:
    out: str
    method: str
    ratio: float | None
    target_params: float | None
    pattern: str | None
    params_before: int
    params_after: int
    nonembedding_before: int
    nonembedding_after: int  # for wanda/sparsegpt: the non-zero ones
    seconds: float
    sparsity: dict = field(default_factory=dict)  # {"overall": f, "layers": {name: f}} for wanda/sparsegpt
    removed: dict = field(default_factory=dict)  # layers dropped, or the new widths
    importance: list = field(default_factory=list)  # block influence per layer (method layers)
    notes: list[str] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        return self.nonembedding_after / max(self.nonembedding_before, 1)

    def to_dict(self) -> dict:
        return dict(asdict(self), kept_fraction=self.kept_fraction)


def _check_amount(method: PruneMethod, ratio, target_params, pattern) -> None:
    if pattern is not None and not method.takes_pattern:
        takers = [name for name, cls in PRUNE_METHODS.items() if cls.takes_pattern]
        takers_text = " and ".join([", ".join(takers[:-1]), takers[-1]] if len(takers) > 1 else takers)
        raise SlimlmError(f"--pattern is for {takers_text}, not {method.name}: use --ratio")
    given = sum(v is not None for v in (ratio, target_params, pattern))
    if given != 1:
        raise SlimlmError("say how much to prune with exactly one of --ratio, --keep-params or --pattern")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise SlimlmError(f"--ratio {ratio} must be in [0, 1): it is the fraction to remove, and 1 removes everything")
    if target_params is not None and not 0.0 < target_params <= 1.0:
        raise SlimlmError(f"--keep-params {target_params} must be in (0, 1]: the fraction of non-embedding "
                          "parameters to keep")


def prune(model: str | Path, out: str | Path, method: str = "layers", ratio: float | None = None, *,
          target_params: float | None = None, pattern: str | None = None, axes=("mlp", "heads"),
          calib: list[str] | None = None, calib_samples: int = 32, calib_seq_len: int = 256,
          force: bool = False, record: bool = True, progress: bool = True) -> PruneResult:
    """Prune `model` (a Hugging Face folder or any model reference) into the folder `out`."""
    from slimlm.compress.prune_sparse import parse_pattern
    from slimlm.data import calibration_docs
    from slimlm.models.loading import load_torch
    from slimlm.models.reference import resolve

    pruner = PRUNE_METHODS.create(method)
    _check_amount(pruner, ratio, target_params, pattern)
    nm = parse_pattern(pattern)
    pruner.check(tuple(axes))
    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    ref = resolve(str(model))
    start = time.perf_counter()
    torch_model, tokenizer = load_torch(ref)
    texts = calib if calib is not None else calibration_docs()
    total, nonemb = param_counts(torch_model)
    result = PruneResult(out=str(out), method=method, ratio=ratio, target_params=target_params, pattern=pattern,
                         params_before=total, params_after=total, nonembedding_before=nonemb,
                         nonembedding_after=nonemb, seconds=0.0)
    new_model = pruner.prune(PruneJob(torch_model, tokenizer, texts, ratio, target_params, nm, tuple(axes),
                                      calib_samples, calib_seq_len, result, progress))
    result.seconds = time.perf_counter() - start
    _save(new_model, tokenizer, ref, out, force, result, calib_samples, calib_seq_len, axes)
    if record:
        from slimlm.runs import record as record_run

        record_run("prune", ref, params={"method": method, "ratio": ratio, "target_params": target_params,
                                         "pattern": pattern, "out": str(out)},
                   metrics=result.to_dict(), artifact=out)
    return result


def _save(model, tokenizer, ref, out: Path, force: bool, result: PruneResult, samples, seq_len, axes) -> None:
    import torch

    from slimlm.models.loading import atomic_dir, dense_folder, read_config
    from slimlm.runs import write_manifest

    source = read_config(dense_folder(ref))
    dtype = getattr(torch, str(source.get("dtype") or source.get("torch_dtype") or "float32"), torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        model = model.to(dtype)  # back to the source's precision; calibration ran in float32
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, parent=ref, operation="prune",
                       params={"method": result.method, "ratio": result.ratio, "target_params": result.target_params,
                               "pattern": result.pattern, "axes": list(axes), "calib_samples": samples,
                               "calib_seq_len": seq_len},
                       metrics=result.to_dict())
