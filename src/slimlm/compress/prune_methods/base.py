"""The interface of a prune method, and the registry prune() dispatches through.

A prune method is a class with a `help` line, its constraints (`takes_pattern`: it accepts an N:M
`--pattern`; `check`: anything else to refuse before the model loads) and its work (`prune`:
the loaded fp32 model and calibration text in, the pruned model out, the result's counts filled
in). Two kinds share most of that work, so each has a base class here:

- StructuredMethod removes whole blocks, channels or heads: it measures on calibration windows
  and returns a smaller dense model (`cut`), whose parameters are counted again;
- SparsityMethod zeroes individual weights in place: it collects a statistic per decoder linear
  (`statistics`) and prunes each weight from it (`weight_pruner`); the shapes stay.

A new method is one module in this package with a class decorated `@register_prune_method("name")`
and one line in `__init__.py` importing it; `slimlm prune --method` lists it from then on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from slimlm.compress.calibration import calibration_windows
from slimlm.compress.prune_sparse import check_pattern, decoder_linears, sparsify
from slimlm.compress.prune_structured import param_counts
from slimlm.errors import SlimlmError
from slimlm.registry import Registry

__all__ = ["PruneJob", "PruneMethod", "StructuredMethod", "SparsityMethod", "PRUNE_METHODS",
           "register_prune_method"]


@dataclass
class PruneJob:
    """One prune run as a method sees it: the loaded model, the calibration text and the amount
    (exactly one of ratio, target_params, nm), and the result to fill in."""
    model: object  # a transformers causal LM, fp32
    tokenizer: object
    texts: list[str]
    ratio: float | None
    target_params: float | None
    nm: tuple[int, int] | None  # an N:M pattern, for methods with takes_pattern
    axes: tuple[str, ...]
    samples: int
    seq_len: int
    result: object  # prune.PruneResult
    progress: bool


class PruneMethod:
    name: ClassVar[str] = ""  # set by register_prune_method
    help: ClassVar[str] = ""  # one line for `slimlm prune --help`
    takes_pattern: ClassVar[bool] = False  # accepts --pattern N:M

    def check(self, axes: tuple[str, ...]) -> None:
        """Raise SlimlmError for options this method cannot take (before the model loads)."""

    def prune(self, job: PruneJob):
        """The pruned model (`job.model` changed in place, or a new one); fills in `job.result`."""
        raise NotImplementedError


class StructuredMethod(PruneMethod):
    """Remove whole structures: a smaller dense model of the same family."""

    def prune(self, job: PruneJob):
        windows = calibration_windows(job.tokenizer, job.texts, job.samples, job.seq_len)
        new_model = self.cut(job, windows)
        job.result.params_after, job.result.nonembedding_after = param_counts(new_model)
        return new_model

    def cut(self, job: PruneJob, windows):
        """The smaller model, measured on calibration `windows` [n, seq_len]."""
        raise NotImplementedError


class SparsityMethod(PruneMethod):
    """Zero individual weights of every decoder linear; stored as dense zeros."""

    takes_pattern = True

    def statistics(self, job: PruneJob) -> dict:
        """{decoder linear name: what weight_pruner needs} from one calibration pass."""
        raise NotImplementedError

    def weight_pruner(self, sparsity: float | None, nm: tuple[int, int] | None) -> Callable:
        """prune(weight, statistic) -> the weight with `sparsity` of each row (or N of every M) zeroed."""
        raise NotImplementedError

    def prune(self, job: PruneJob):
        result, model = job.result, job.model
        prunable = sum(m.weight.numel() for m in decoder_linears(model).values())
        sparsity = job.ratio
        if job.target_params is not None:  # zero enough linear weights that the non-zero non-embedding count hits it
            sparsity = (1.0 - job.target_params) * result.nonembedding_before / prunable
            if sparsity >= 1.0:
                raise SlimlmError(f"--keep-params {job.target_params} needs more zeros than the linear layers hold: "
                                  "use a larger fraction")
        check_pattern(model, job.nm)
        stats = self.statistics(job)
        per_layer = sparsify(model, stats, self.weight_pruner(sparsity, job.nm), self.name, job.progress)
        sizes = {n: m.weight.numel() for n, m in decoder_linears(model).items()}
        zeros = sum(per_layer[n] * sizes[n] for n in per_layer)
        result.sparsity = {"overall": zeros / prunable, "layers": per_layer}
        result.nonembedding_after = result.nonembedding_before - round(zeros)
        result.notes.append("zeros are stored densely: the file is no smaller and CPU inference is no faster "
                            "without sparse kernels")
        return model


PRUNE_METHODS: Registry[PruneMethod] = Registry("prune method", PruneMethod, unknown="method")
register_prune_method = PRUNE_METHODS.register
