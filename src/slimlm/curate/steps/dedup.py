"""Deduplication over the whole corpus, with datatrove's multi-stage jobs (the ones FineWeb was
deduplicated with): each stage reads the shards, writes its signatures, and the last one drops
duplicates as the next pipeline reads the same shards again.

- `exact_dedup`: documents with the same text (after the steps before it, so normalize first);
  the first one seen is kept.
- `near_dedup`: MinHash LSH over word n-grams. A pair of documents with Jaccard similarity s
  becomes a candidate with probability 1 - (1 - s^rows)^bands; pairs are clustered and one
  document per cluster kept. FineWeb's setting is 5-grams, 14 bands x 8 rows (112 hashes), which
  puts the 50% point of that curve at s ~ 0.72. Given `threshold` instead, bands x rows are
  chosen for it by the rule datasketch's MinHashLSH uses (`optimal_bands`).
- `line_dedup`: lines (or spans of consecutive lines) that occur in more than one document are
  cut from every document after the first, and a document left too short is dropped. This is
  CCNet's paragraph deduplication (Wenzek et al. 2020) and C4's span deduplication, run by
  datatrove's sentence-dedup jobs on lines: what repeats across pages is navigation, cookie
  banners and footers, which no single-document rule recognises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from slimlm.curate.steps.base import CorpusPlan, CurateStep, Stage, check_positive, register_step
from slimlm.curate.steps.text import RecountTokens
from slimlm.errors import SlimlmError


def document_text(doc: Document) -> str:
    return doc.text


@register_step("exact_dedup")
class ExactDedup(CurateStep):
    help = "exact duplicates (the same text after the steps before it): the first one is kept"
    whole_corpus = True

    def corpus_stages(self, params, ctx, source):
        from datatrove.pipeline.dedup.exact_dedup import (
            ExactDedupConfig,
            ExactDedupFilter,
            ExactDedupSignature,
            ExactFindDedups,
        )
        from datatrove.pipeline.readers import JsonlReader

        config = ExactDedupConfig(content_getter=document_text)
        sigs, dups = ctx.folder("signatures"), ctx.folder("duplicates")
        stages = [Stage("signatures", [JsonlReader(str(source)), ExactDedupSignature(str(sigs), config)], ctx.tasks),
                  Stage("find duplicates", [ExactFindDedups(str(sigs), str(dups), config)], 1)]
        return CorpusPlan(stages, [ExactDedupFilter(str(dups), config, exclusion_writer=ctx.removed_writer())], source)


@dataclass
class NearDedupParams:
    ngram: int = 5  # words per shingle
    bands: int | None = None  # LSH bands (datatrove's num_buckets); default 14, or chosen for `threshold`
    rows: int | None = None  # hashes per band (datatrove's hashes_per_bucket); default 8, or chosen
    threshold: float | None = None  # the Jaccard similarity to tune bands x rows for (instead of giving them)
    hashes: int = 112  # bands x rows when chosen for `threshold`


def optimal_bands(threshold: float, hashes: int) -> tuple[int, int]:
    """(bands, rows), bands x rows <= hashes, that minimize the chance of a false positive (a pair
    below `threshold` becoming a candidate) plus that of a false negative (a pair above it
    missed), each integrated over similarity as datasketch's MinHashLSH does (equal weights).

    Written out (ten lines) because datasketch keeps its version private."""
    from scipy.integrate import quad

    def candidate(s, b, r):
        return 1 - (1 - s ** r) ** b

    best, best_err = (1, hashes), float("inf")
    for b in range(1, hashes + 1):
        for r in range(1, hashes // b + 1):
            fp = quad(lambda s: candidate(s, b, r), 0, threshold)[0]
            fn = quad(lambda s: 1 - candidate(s, b, r), threshold, 1)[0]
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


@register_step("near_dedup")
class NearDedup(CurateStep):
    help = "near duplicates by MinHash LSH (datatrove): word 5-grams, 14 bands x 8 rows, or tuned to a Jaccard `threshold`"
    params = NearDedupParams
    whole_corpus = True

    def check(self, params):
        check_positive(params, "ngram", "bands", "rows", "hashes")
        if params.threshold is not None and not 0 < params.threshold < 1:
            raise SlimlmError(f"threshold must be between 0 and 1, not {params.threshold}")
        if params.threshold is not None and (params.bands or params.rows):
            raise SlimlmError("give either threshold or bands and rows, not both")

    def shape(self, params) -> tuple[int, int]:
        if params.threshold is not None:
            return optimal_bands(params.threshold, params.hashes)
        return params.bands or 14, params.rows or 8

    def corpus_stages(self, params, ctx, source):
        from datatrove.pipeline.dedup.minhash import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )
        from datatrove.pipeline.readers import JsonlReader

        bands, rows = self.shape(params)
        config = MinhashConfig(n_grams=params.ngram, num_buckets=bands, hashes_per_bucket=rows)
        sigs, buckets, clusters = ctx.folder("signatures"), ctx.folder("buckets"), ctx.folder("clusters")
        stages = [Stage("signatures", [JsonlReader(str(source)), MinhashDedupSignature(str(sigs), config=config)],
                        ctx.tasks),
                  Stage("buckets", [MinhashDedupBuckets(str(sigs), str(buckets), config=config)], bands),
                  Stage("clusters", [MinhashDedupCluster(str(buckets), str(clusters), config=config)], 1)]
        return CorpusPlan(stages, [MinhashDedupFilter(str(clusters), exclusion_writer=ctx.removed_writer())], source)


@dataclass
class LineDedupParams:
    lines: int = 1  # consecutive lines matched as one span (C4 used 3 sentences; CCNet 1 paragraph)
    min_doc_words: int = 50  # a document cut below this many words is dropped (datatrove's default)
    min_sentences: int = 3  # ...or below this many sentences (datatrove's default)


class _RemovedOnly(PipelineStep):
    """Runs datatrove's SentenceDedupFilter and sends only the documents it drops to `writer`.

    Written here because that filter's own exclusion writer also receives every document it keeps
    but shortens, which would count kept documents as removed in the funnel and `curate inspect`."""

    name = "drop documents left too short by line dedup"
    type = "🫂 - DEDUPS"

    def __init__(self, inner, writer):
        super().__init__()
        self.inner, self.writer = inner, writer

    def run(self, data, rank: int = 0, world_size: int = 1):
        pending = {}  # documents read by the filter and not yet yielded: id -> (document, its text then)

        def feed():
            for doc in data:
                pending[doc.id] = (doc, doc.text)
                yield doc

        def drop_until(doc_id):
            for seen in list(pending):
                doc, text = pending.pop(seen)
                if seen == doc_id:
                    return
                self.writer.write(dataclasses.replace(doc, text=text), rank=rank)

        with self.writer:
            for doc in self.inner.run(feed(), rank, world_size):
                drop_until(doc.id)
                yield doc
            drop_until(None)


@register_step("line_dedup")
class LineDedup(CurateStep):
    help = "lines repeated across documents (menus, banners, footers) cut after their first document (CCNet)"
    params = LineDedupParams
    whole_corpus = True

    def check(self, params):
        check_positive(params, "lines")

    def corpus_stages(self, params, ctx, source):
        from datatrove.pipeline.dedup.sentence_dedup import (
            SentDedupConfig,
            SentenceDedupFilter,
            SentenceDedupSignature,
            SentenceFindDedups,
        )
        from datatrove.pipeline.readers import JsonlReader

        config = SentDedupConfig(n_sentences=params.lines, split_sentences=False,
                                 min_doc_words=params.min_doc_words, min_num_sentences=params.min_sentences)
        sigs, dups = ctx.folder("signatures"), ctx.folder("duplicates")
        stages = [Stage("signatures", [JsonlReader(str(source)), SentenceDedupSignature(str(sigs), config=config)],
                        ctx.tasks),
                  Stage("find duplicates", [SentenceFindDedups(str(sigs), str(dups), config=config)], 1)]
        cut = _RemovedOnly(SentenceDedupFilter(str(dups), config=config), ctx.removed_writer())
        return CorpusPlan(stages, [cut, RecountTokens(ctx.token_counter)], source)
