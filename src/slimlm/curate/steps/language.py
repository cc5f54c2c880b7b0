"""Language identification with py3langid (langid.py's 97-language model, shipped inside the
package). datatrove's LanguageFilter would fetch fastText's lid.176.bin, or GlotLID from the
Hugging Face hub, on first use; neither works on an offline machine, so this step is a small
datatrove filter around a model that is already on disk."""

from __future__ import annotations

from dataclasses import dataclass, field

from datatrove.pipeline.filters.base_filter import BaseFilter

from slimlm.curate.steps.base import CurateStep, register_step
from slimlm.errors import SlimlmError


def _identifier():
    import py3langid.langid as langid

    return langid.LanguageIdentifier.from_modelpath(langid.MODEL_DIR / langid.MODEL_FILE, norm_probs=True)


class _LanguageFilter(BaseFilter):
    name = "🌍 Language ID (py3langid)"

    def __init__(self, languages: list[str], threshold: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages, self.threshold = set(languages), threshold
        self._model = None

    def filter(self, doc):
        if self._model is None:
            self._model = _identifier()
        # newlines carry no language; py3langid reads the text as one sequence of bytes
        lang, score = self._model.classify(doc.text.replace("\n", " "))
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(float(score), 4)
        if self.languages and lang not in self.languages:
            return False, f"language_{lang}"
        if score < self.threshold:
            return False, "language_unsure"
        return True


@dataclass
class LanguageParams:
    languages: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes to keep; [] keeps any
    threshold: float = 0.65  # least probability of the detected language (datatrove's default)


@register_step("language")
class Language(CurateStep):
    help = "language identification (py3langid, offline): keep documents in `languages` detected with >= `threshold`"
    params = LanguageParams

    def check(self, params):
        if not 0 <= params.threshold <= 1:
            raise SlimlmError(f"threshold must be between 0 and 1, not {params.threshold}")
        known = set(_identifier().nb_classes)
        unknown = [lang for lang in params.languages if lang not in known]
        if unknown:
            raise SlimlmError(f"language {unknown[0]!r} is not one py3langid knows: use ISO 639-1 codes such as "
                              f"{', '.join(sorted(known)[:8])}, ...")

    def document_steps(self, params, ctx):
        return [_LanguageFilter(params.languages, params.threshold, ctx.removed_writer())]
