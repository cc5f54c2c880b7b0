"""Steps that rewrite a document's text rather than judge it: Unicode and whitespace
normalization, and PII redaction with the server's privacy guard (slimlm.data.privacy: one set of
detectors, so what `serve` would refuse to send out is what `curate` removes from training data).

Both are datatrove formatters written here because datatrove's own do something else: its
FTFYFormatter repairs mojibake (and needs ftfy), and its PIIFormatter only knows emails and IP
addresses by regular expression, where the guard validates cards (Luhn), IBANs (mod 97), national
ids and phone numbers (libphonenumber) before calling a span personal data."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from slimlm.curate.steps.base import CurateStep, register_step
from slimlm.data.privacy import KINDS, PLACEHOLDER
from slimlm.errors import SlimlmError

_SPACES = re.compile(r"[^\S\n]+")  # runs of whitespace other than newlines
_BLANK_LINES = re.compile(r"\n\s*\n(\s*\n)+")  # three or more line breaks with only spaces between
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class RecountTokens(PipelineStep):
    """Sets metadata["token_count"] again after a step that changed the text."""

    name = "recount tokens"
    type = "🔢 - COUNT"

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.metadata["token_count"] = self.counter.count([doc.text])[0]
            yield doc


class _Normalizer(BaseFilter):
    name = "normalize"

    def __init__(self, form: str, whitespace: bool, control: bool, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.form, self.whitespace, self.control = form, whitespace, control

    def filter(self, doc):
        text = unicodedata.normalize(self.form, doc.text) if self.form else doc.text
        if self.control:
            text = _CONTROL.sub("", text)
        if self.whitespace:
            text = _BLANK_LINES.sub("\n\n", "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines()))
            text = text.strip()
        if not text:
            return False, "empty"
        doc.text = text
        return True


@dataclass
class NormalizeParams:
    form: str = "NFC"  # Unicode normal form (NFC, NFKC, NFD, NFKD) or "" to leave it
    whitespace: bool = True  # collapse spaces and tabs, trim lines, at most one blank line in a row
    control: bool = True  # drop control characters (not tab and newline)


@register_step("normalize")
class Normalize(CurateStep):
    help = "Unicode normal form (NFC), whitespace collapsed, control characters dropped; empty documents removed"
    params = NormalizeParams

    def check(self, params):
        if params.form not in ("", "NFC", "NFKC", "NFD", "NFKD"):
            raise SlimlmError(f"form must be one of NFC, NFKC, NFD, NFKD or \"\", not {params.form!r}")

    def document_steps(self, params, ctx):
        return [_Normalizer(params.form, params.whitespace, params.control, ctx.removed_writer()),
                RecountTokens(ctx.token_counter)]


class _PiiStep(BaseFilter):
    name = "pii"

    def __init__(self, kinds: list[str], action: str, phone_regions: list[str], exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.kinds, self.action, self.phone_regions = tuple(kinds), action, tuple(phone_regions)
        self._guard = None

    def filter(self, doc):
        from slimlm.data.privacy import PrivacyGuard

        if self._guard is None:
            self._guard = PrivacyGuard("redact", phone_regions=self.phone_regions, kinds=self.kinds)
        if self.action == "drop":
            found = self._guard.scan(doc.text)
            if found:
                doc.metadata["pii"] = dict(Counter(f.kind for f in found))
                return False, f"pii_{found[0].kind}"
            return True
        text, mapping = self._guard.redact(doc.text)
        if mapping:  # {"[EMAIL_1]": value}: counted by kind, the values themselves never stored
            counts = Counter(PLACEHOLDER.fullmatch(p).group(1).lower() for p in mapping)
            doc.metadata["pii"] = dict(counts)
            for kind, n in counts.items():
                self.stat_update(f"redacted_{kind}", value=n)
            doc.text = text
        return True


@dataclass
class PiiParams:
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # what counts as personal data or a secret
    action: str = "redact"  # redact: replace each item by [KIND_n]; drop: remove the document
    phone_regions: list[str] = field(default_factory=lambda: ["US", "GB", "DE", "FR"])


@register_step("pii")
class Pii(CurateStep):
    help = ("personal data and secrets (emails, cards, IBANs, national ids, phones, IPs, API and private keys), "
            "found by the server's privacy guard: redacted to [KIND_n], or the document dropped")
    params = PiiParams

    def check(self, params):
        unknown = [k for k in params.kinds if k not in KINDS]
        if unknown:
            raise SlimlmError(f"unknown kind {unknown[0]!r}: choose from {', '.join(KINDS)}")
        if params.action not in ("redact", "drop"):
            raise SlimlmError(f"action must be redact or drop, not {params.action!r}")

    def document_steps(self, params, ctx):
        return [_PiiStep(params.kinds, params.action, params.phone_regions, ctx.removed_writer()),
                RecountTokens(ctx.token_counter)]
