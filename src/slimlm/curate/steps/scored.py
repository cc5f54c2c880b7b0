"""Filters by a score every document gets, keeping the best `keep` fraction of the corpus or those
past a fixed threshold: FineWeb-Edu's educational-value classifier (`quality`) and CCNet's
perplexity under a small reference model (`perplexity`).

A fraction of the whole corpus needs every score before the first document can be judged, so
both run as whole-corpus steps: a scoring stage writes scored copies of the shards (the scores
stay in each document's metadata, and so in the output), a one-task stage finds the cut, and the
filter then reads the scored shards. Ties at the cut are all kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from slimlm.curate.steps.base import CorpusPlan, CurateStep, Stage
from slimlm.errors import SlimlmError


class FindCut(PipelineStep):
    """Reads every scored shard's `key` and writes the cut: the score of the last document kept
    when keeping the `keep` best (higher is better unless `lower_is_better`), or `threshold`."""

    name = "find the cut"
    type = "✂️ - CUT"

    def __init__(self, scored: Path, key: str, out: Path, keep: float | None, threshold: float | None,
                 lower_is_better: bool):
        super().__init__()
        self.scored, self.key, self.out = scored, key, out
        self.keep, self.threshold, self.lower = keep, threshold, lower_is_better

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from slimlm.curate.ingest import read_shards

        scores = [record["metadata"][self.key] for record in read_shards(self.scored)]
        values = np.sort(np.asarray(scores, dtype=np.float64))
        if self.lower:
            values = values[::-1]  # best last either way
        if self.keep is not None and len(values):
            n = max(1, math.ceil(self.keep * len(values)))
            cut = float(values[len(values) - n])
        else:
            cut = self.threshold
        hist, edges = np.histogram(values, bins=20) if len(values) else ([], [])
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps({"key": self.key, "cut": cut, "documents": len(values),
                                              "lower_is_better": self.lower,
                                              "histogram": {"counts": list(map(int, hist)),
                                                            "edges": [float(e) for e in edges]}}))
        yield from ()


class KeepPastCut(BaseFilter):
    """Keeps a document whose score is at or past the cut FindCut wrote."""

    name = "✂️ keep past the cut"

    def __init__(self, cut_file: Path, key: str, lower_is_better: bool, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.cut_file, self.key, self.lower = cut_file, key, lower_is_better
        self._cut = None

    def filter(self, doc):
        if self._cut is None:
            self._cut = json.loads(Path(self.cut_file).read_text())["cut"]
        score = doc.metadata[self.key]
        ok = score <= self._cut if self.lower else score >= self._cut
        return True if ok else (False, f"{self.key}_{'above' if self.lower else 'below'}_cut")


class ScoredStep(CurateStep):
    """A whole-corpus step: `prepare` stages (optional), a scoring block, the cut, the filter."""

    whole_corpus = True
    key = ""  # the metadata field the score goes to
    lower_is_better = False

    def prepare(self, params, ctx, source: Path) -> list[Stage]:
        return []

    def scorer(self, params, ctx) -> PipelineStep:
        raise NotImplementedError

    def cut(self, params) -> tuple[float | None, float | None]:
        """(keep fraction, threshold): exactly one is not None."""
        raise NotImplementedError

    def check_cut(self, keep, threshold) -> None:
        if (keep is None) == (threshold is None):
            raise SlimlmError("give either keep (a fraction of the corpus) or a threshold, not both or neither")
        if keep is not None and not 0 < keep <= 1:
            raise SlimlmError(f"keep must be a fraction in (0, 1], not {keep}")

    def corpus_stages(self, params, ctx, source):
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter

        scored, cut_file = ctx.folder("scored"), ctx.folder("cut.json")
        keep, threshold = self.cut(params)
        stages = self.prepare(params, ctx, source) + [
            Stage("score", [JsonlReader(str(source)), self.scorer(params, ctx),
                            JsonlWriter(str(scored), output_filename="${rank}.jsonl.gz")], ctx.tasks),
            Stage("find the cut", [FindCut(scored, self.key, cut_file, keep, threshold, self.lower_is_better)], 1)]
        return CorpusPlan(stages, [KeepPastCut(cut_file, self.key, self.lower_is_better, ctx.removed_writer())],
                          scored)
