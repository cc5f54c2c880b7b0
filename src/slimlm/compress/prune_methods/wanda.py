"""`wanda`: zero the weights with the lowest |W| * ||x|| (Sun et al. 2023; compress/prune_sparse.py)."""

from __future__ import annotations

from slimlm.compress.calibration import calibration_windows
from slimlm.compress.prune_methods.base import PruneJob, SparsityMethod, register_prune_method
from slimlm.compress.prune_sparse import input_sq_norms, wanda_prune


@register_prune_method("wanda")
class Wanda(SparsityMethod):
    help = "zero the weights with the lowest |W|*||x|| (Wanda); dense zeros, no CPU speed-up"

    def statistics(self, job: PruneJob) -> dict:
        windows = calibration_windows(job.tokenizer, job.texts, job.samples, job.seq_len)
        return input_sq_norms(job.model, windows, progress=job.progress)

    def weight_pruner(self, sparsity, nm):
        return lambda weight, sq_norm: wanda_prune(weight, sq_norm, sparsity, nm)
