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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError

METHODS = {"layers": "drop whole decoder blocks with the least block influence (ShortGPT)",
           "width": "narrow MLP channels and attention heads by activation importance (Minitron)",
           "wanda": "zero the weights with the lowest |W|*||x|| (Wanda); dense zeros, no CPU speed-up",
           "sparsegpt": "zero weights and compensate the rest from the input Hessian (SparseGPT); dense zeros"}
WIDTH_AXES = ("mlp", "heads", "hidden")

__all__ = ["prune", "PruneResult", "METHODS", "WIDTH_AXES"]


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


def _check_amount(method: str, ratio, target_params, pattern) -> None:
    if method not in METHODS:
        raise SlimlmError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    if pattern is not None and method not in ("wanda", "sparsegpt"):
        raise SlimlmError(f"--pattern is for wanda and sparsegpt, not {method}: use --ratio")
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
    from slimlm.compress.gptq import _calibration_windows
    from slimlm.compress.prune_sparse import parse_pattern
    from slimlm.data import calibration_docs
    from slimlm.models.loading import load_torch
    from slimlm.models.reference import resolve

    _check_amount(method, ratio, target_params, pattern)
    nm = parse_pattern(pattern)
    bad_axes = set(axes) - set(WIDTH_AXES)
    if method == "width" and (bad_axes or not axes):
        raise SlimlmError(f"width axes must be some of {', '.join(WIDTH_AXES)}, got {', '.join(axes) or 'none'}")
    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    ref = resolve(str(model))
    start = time.perf_counter()
    torch_model, tokenizer = load_torch(ref)
    texts = calib if calib is not None else calibration_docs()
    total, nonemb = _counts(torch_model)
    result = PruneResult(out=str(out), method=method, ratio=ratio, target_params=target_params, pattern=pattern,
                         params_before=total, params_after=total, nonembedding_before=nonemb,
                         nonembedding_after=nonemb, seconds=0.0)
    if method in ("wanda", "sparsegpt"):
        new_model = _sparse(torch_model, tokenizer, texts, method, ratio, target_params, nm, result,
                            calib_samples, calib_seq_len, progress)
    else:
        windows = _calibration_windows(tokenizer, texts, calib_samples, calib_seq_len)
        run = _layers if method == "layers" else _width
        new_model = run(torch_model, windows, ratio, target_params, tuple(axes), result, progress)
        result.params_after, result.nonembedding_after = _counts(new_model)
    result.seconds = time.perf_counter() - start
    _save(new_model, tokenizer, ref, out, force, result, calib_samples, calib_seq_len, axes)
    if record:
        from slimlm.runs import record as record_run

        record_run("prune", ref, params={"method": method, "ratio": ratio, "target_params": target_params,
                                         "pattern": pattern, "out": str(out)},
                   metrics=result.to_dict(), artifact=out)
    return result


def _counts(model) -> tuple[int, int]:
    from slimlm.compress.prune_structured import param_counts

    return param_counts(model)


def _layers(model, windows, ratio, target_params, axes, result: PruneResult, progress: bool):
    from slimlm.compress.prune_structured import block_influence, decoder_layers, drop_layers, materialize

    layers, _ = decoder_layers(model)
    n = len(layers)
    bi = block_influence(model, windows, progress=progress)
    order = sorted(range(n), key=lambda i: bi[i])  # least influential first
    if ratio is not None:
        drop = int(ratio * n + 0.5)
    else:  # the number of blocks whose removal lands closest to the target
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        goal, left, best = target_params * result.nonembedding_before, result.nonembedding_before, []
        for k in range(n):
            best.append((abs(left - goal), k))
            left -= sizes[order[k]]
        drop = min(best)[1]
    if drop >= n:
        raise SlimlmError(f"--ratio {ratio} removes all {n} decoder layers: use a smaller --ratio")
    keep = sorted(order[drop:])
    result.importance = [round(v, 6) for v in bi]
    result.removed = {"layers": sorted(order[:drop]), "num_hidden_layers": f"{n} -> {len(keep)}"}
    return materialize(*drop_layers(model, keep))


def _width(model, windows, ratio, target_params, axes, result: PruneResult, progress: bool):
    from slimlm.compress.prune_structured import materialize, narrow, plan_width, width_importance

    importance = width_importance(model, windows, progress=progress)
    if ratio is not None:
        config = plan_width(model.config, ratio, axes)
    else:  # bisect the ratio on the non-embedding count of the planned shape (built on the meta device)
        goal = target_params * result.nonembedding_before
        lo, hi, seen = 0.0, 0.99, {}
        for _ in range(14):
            mid = (lo + hi) / 2
            try:
                cfg = plan_width(model.config, mid, axes)
            except SlimlmError:
                hi = mid
                continue
            count = _meta_counts(cfg)
            seen[count] = (mid, cfg)
            lo, hi = (mid, hi) if count > goal else (lo, mid)
        seen.setdefault(result.nonembedding_before, (0.0, plan_width(model.config, 0.0, axes)))
        count = min(seen, key=lambda c: abs(c - goal))
        ratio, config = seen[count]
        result.notes.append(f"--keep-params {target_params}: cut ratio {ratio:.3f} on {', '.join(axes)}")
    keys = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_size")
    result.removed = {k: f"{getattr(model.config, k)} -> {getattr(config, k)}" for k in keys}
    result.removed["head_dim"] = getattr(config, "head_dim", None)
    if "hidden" in axes and config.hidden_size != model.config.hidden_size:
        result.notes.append("hidden size narrowed: RMSNorm statistics change, so quality drops more than "
                            "the other axes; distill afterwards")
    return materialize(*narrow(model, importance, config))


def _meta_counts(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return _counts(AutoModelForCausalLM.from_config(config))[1]


def _sparse(model, tokenizer, texts, method, ratio, target_params, nm, result: PruneResult,
            samples, seq_len, progress):
    from slimlm.compress.prune_sparse import decoder_linears, sparsify

    prunable = sum(m.weight.numel() for m in decoder_linears(model).values())
    sparsity = ratio
    if target_params is not None:  # zero enough linear weights that the non-zero non-embedding count hits it
        sparsity = (1.0 - target_params) * result.nonembedding_before / prunable
        if sparsity >= 1.0:
            raise SlimlmError(f"--keep-params {target_params} needs more zeros than the linear layers hold: "
                              "use a larger fraction")
    per_layer = sparsify(model, tokenizer, texts, method, sparsity, nm, samples, seq_len, progress)
    sizes = {n: m.weight.numel() for n, m in decoder_linears(model).items()}
    zeros = sum(per_layer[n] * sizes[n] for n in per_layer)
    result.sparsity = {"overall": zeros / prunable, "layers": per_layer}
    result.nonembedding_after = result.nonembedding_before - round(zeros)
    result.notes.append("zeros are stored densely: the file is no smaller and CPU inference is no faster "
                        "without sparse kernels")
    return model


def _save(model, tokenizer, ref, out: Path, force: bool, result: PruneResult, samples, seq_len, axes) -> None:
    import torch

    from slimlm.models.loading import _quiet, atomic_dir, dense_folder, read_config
    from slimlm.runs import write_manifest

    _quiet()
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
