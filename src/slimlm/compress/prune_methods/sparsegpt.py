"""`sparsegpt`: zero weights and compensate the rest from the input Hessian (Frantar & Alistarh
2023; compress/prune_sparse.py), with the Hessians GPTQ collects."""

from __future__ import annotations

from slimlm.compress.gptq import collect_hessians
from slimlm.compress.prune_methods.base import PruneJob, SparsityMethod, register_prune_method
from slimlm.compress.prune_sparse import inverse_factor, sparsegpt_prune


@register_prune_method("sparsegpt")
class SparseGPT(SparsityMethod):
    help = "zero weights and compensate the rest from the input Hessian (SparseGPT); dense zeros"

    def statistics(self, job: PruneJob) -> dict:
        return collect_hessians(job.model, job.tokenizer, job.texts, samples=job.samples, seq_len=job.seq_len,
                                progress=job.progress)

    def weight_pruner(self, sparsity, nm):
        factors: dict = {}

        def prune(weight, H):
            if id(H) not in factors:  # q/k/v (gate/up) share one H object, so one factorization
                factors[id(H)] = inverse_factor(H)
            return sparsegpt_prune(weight, H, sparsity, nm, factor=factors[id(H)])

        return prune
