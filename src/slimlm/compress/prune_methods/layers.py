"""`layers`: drop whole decoder blocks with the least block influence (ShortGPT; the measurement
and the surgery are compress/prune_structured.py). This class decides how many to drop."""

from __future__ import annotations

from slimlm.compress.prune_methods.base import PruneJob, StructuredMethod, register_prune_method
from slimlm.compress.prune_structured import block_influence, decoder_layers, drop_layers, materialize
from slimlm.errors import SlimlmError


@register_prune_method("layers")
class Layers(StructuredMethod):
    help = "drop whole decoder blocks with the least block influence (ShortGPT)"

    def cut(self, job: PruneJob, windows):
        model, ratio, result = job.model, job.ratio, job.result
        layers, _ = decoder_layers(model)
        n = len(layers)
        bi = block_influence(model, windows, progress=job.progress)
        order = sorted(range(n), key=lambda i: bi[i])  # least influential first
        if ratio is not None:
            drop = int(ratio * n + 0.5)
        else:  # the number of blocks whose removal lands closest to the target
            sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
            goal, left, best = job.target_params * result.nonembedding_before, result.nonembedding_before, []
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
