"""`width`: narrow MLP channels, attention heads (whole grouped-KV groups) and optionally the hidden
size by activation importance (Minitron; the measurement and the surgery are
compress/prune_structured.py). This class picks the widths, bisecting for --keep-params."""

from __future__ import annotations

from slimlm.compress.prune_methods.base import PruneJob, StructuredMethod, register_prune_method
from slimlm.compress.prune_structured import materialize, narrow, param_counts, plan_width, width_importance
from slimlm.errors import SlimlmError

WIDTH_AXES = ("mlp", "heads", "hidden")


@register_prune_method("width")
class Width(StructuredMethod):
    help = "narrow MLP channels and attention heads by activation importance (Minitron)"

    def check(self, axes: tuple[str, ...]) -> None:
        if set(axes) - set(WIDTH_AXES) or not axes:
            raise SlimlmError(f"width axes must be some of {', '.join(WIDTH_AXES)}, got {', '.join(axes) or 'none'}")

    def cut(self, job: PruneJob, windows):
        model, ratio, axes, result = job.model, job.ratio, job.axes, job.result
        importance = width_importance(model, windows, progress=job.progress)
        if ratio is not None:
            config = plan_width(model.config, ratio, axes)
        else:  # bisect the ratio on the non-embedding count of the planned shape (built on the meta device)
            goal = job.target_params * result.nonembedding_before
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
            result.notes.append(f"--keep-params {job.target_params}: cut ratio {ratio:.3f} on {', '.join(axes)}")
        keys = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_size")
        result.removed = {k: f"{getattr(model.config, k)} -> {getattr(config, k)}" for k in keys}
        result.removed["head_dim"] = getattr(config, "head_dim", None)
        if "hidden" in axes and config.hidden_size != model.config.hidden_size:
            result.notes.append("hidden size narrowed: RMSNorm statistics change, so quality drops more than "
                                "the other axes; distill afterwards")
        return materialize(*narrow(model, importance, config))


def _meta_counts(config) -> int:
    """Non-embedding parameters of a model of `config`, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return param_counts(AutoModelForCausalLM.from_config(config))[1]
