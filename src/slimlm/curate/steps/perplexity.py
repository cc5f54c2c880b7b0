"""`perplexity`: CCNet's filter (Wenzek et al. 2020): text a small reference model finds very
surprising is usually boilerplate, lists or garbage. Each document's perplexity under `model`
(any model slimlm loads, on either backend; its first `max_tokens` tokens) goes to metadata
`perplexity`; the lowest `keep` fraction, or those at or below `max_perplexity`, are kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

from datatrove.pipeline.base import PipelineStep

from slimlm.curate.steps.base import register_step
from slimlm.curate.steps.scored import ScoredStep
from slimlm.errors import SlimlmError


class Perplexity(PipelineStep):
    name = "perplexity under the reference model"
    type = "📉 - SCORE"

    def __init__(self, model: str, backend: str, max_tokens: int, dtype: str = "auto", threads: int | None = None):
        super().__init__()
        self.model, self.backend, self.max_tokens, self.dtype = model, backend, max_tokens, dtype
        self.threads = threads

    def run(self, data, rank: int = 0, world_size: int = 1):
        from slimlm.models.backends import open_backend
        from slimlm.models.backends.scoring import Request

        engine = open_backend(self.model, self.backend, threads=self.threads,
                              **({"dtype": self.dtype} if self.dtype != "auto" else {}))
        scorer = engine.scorer()
        limit = min(self.max_tokens, scorer.max_length - 1)
        try:
            for doc in data:
                ids = [scorer.prefix_id] + scorer.encode(doc.text)[:limit]
                if len(ids) < 2:
                    doc.metadata["perplexity"] = float("inf")
                else:
                    logprobs = scorer.score([Request(ids, 1)])[0].logprobs
                    doc.metadata["perplexity"] = round(math.exp(-float(logprobs.mean())), 3)
                yield doc
        finally:
            engine.close()


@dataclass
class PerplexityParams:
    model: str = "smollm2-135m-instruct"  # the reference model
    backend: str = "auto"
    dtype: str = "auto"  # torch backend: float32, bfloat16... (auto: what this CPU runs fastest)
    max_tokens: int = 512  # of each document scored
    keep: float | None = None  # keep this fraction of the corpus, the least surprising
    max_perplexity: float | None = None  # or keep every document at or below this


@register_step("perplexity")
class PerplexityFilter(ScoredStep):
    help = "CCNet's filter: perplexity under a small reference model; keep the lowest fraction or <= max_perplexity"
    params = PerplexityParams
    key = "perplexity"
    lower_is_better = True

    def cut(self, params):
        return params.keep, params.max_perplexity

    def check(self, params):
        self.check_cut(*self.cut(params))
        if params.max_tokens < 1:
            raise SlimlmError("max_tokens must be at least 1")

    def scorer(self, params, ctx):
        return Perplexity(params.model, params.backend, params.max_tokens, params.dtype, ctx.threads())
