"""The published heuristic rule sets, as datatrove implements them: Gopher's quality and
repetition rules (Rae et al. 2021), C4's line and document rules (Raffel et al. 2020) and
FineWeb's extra rules (Penedo et al. 2024). Each step's settings are the filter's own keyword
arguments with their published defaults (read from datatrove's signatures: base.params_of).

datatrove tokenizes words with a tokenizer per language; for English that is spaCy's rule-based
`blank("en")`, which ships inside the spacy package, so nothing is fetched (its NLTK path would
need punkt data from the internet)."""

from __future__ import annotations

from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)

from slimlm.curate.steps.base import CurateStep, params_of, register_step


class _DatatroveFilter(CurateStep):
    filter_class: type

    def document_steps(self, params, ctx):
        from dataclasses import asdict

        return [self.filter_class(exclusion_writer=ctx.removed_writer(), **asdict(params))]


@register_step("gopher_quality")
class GopherQuality(_DatatroveFilter):
    help = "Gopher's quality rules: word count, mean word length, symbols, bullets, stop words"
    filter_class = GopherQualityFilter
    params = params_of(GopherQualityFilter)


@register_step("gopher_repetition")
class GopherRepetition(_DatatroveFilter):
    help = "Gopher's repetition rules: duplicated lines, paragraphs and n-grams"
    filter_class = GopherRepetitionFilter
    params = params_of(GopherRepetitionFilter)


@register_step("c4_quality")
class C4Quality(_DatatroveFilter):
    help = "C4's rules: terminal punctuation, sentences, lorem ipsum, javascript, policy and cookie lines"
    filter_class = C4QualityFilter
    params = params_of(C4QualityFilter)


@register_step("fineweb_quality")
class FineWebQuality(_DatatroveFilter):
    help = "FineWeb's rules: lines ending in punctuation, short lines, duplicated characters, newlines"
    filter_class = FineWebQualityFilter
    params = params_of(FineWebQualityFilter)
