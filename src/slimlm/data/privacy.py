"""The privacy guard: find personal data and secrets in a request before it may leave the machine.

`slimlm serve` can send hard prompts to a large hosted model. Whatever it sends is out of the
user's hands, so before a request leaves, the guard scans it and either keeps it local
(mode "local") or replaces each sensitive item with a typed placeholder such as [EMAIL_1] and
puts the values back into the answer afterwards (mode "redact").

How detection works, and why: a regular expression only proposes *candidate spans*; a value
counts only if a real validator accepts it. Card numbers must pass the Luhn check
(stdnum.luhn), IBANs their ISO 13616 mod-97 check (stdnum.iban), national ids their own check
digits (stdnum.us.ssn, stdnum.es.dni/nie, stdnum.it.codicefiscale, stdnum.fr.nir), phone
numbers libphonenumber's numbering plans (phonenumbers, at leniency VALID) and IP addresses the
standard `ipaddress` parser. A regex alone flags every 16-digit order number as a card and
misses a phone written in a format nobody thought of; the validators were written by people
who maintain those numbering rules. Microsoft Presidio would be the usual off-the-shelf
choice, but it needs spaCy language models fetched from the Hugging Face hub at first use, so
it does not work on an offline machine; slimlm must. The UK National Insurance number is
matched by its official format only (python-stdnum has no validator for it), and API keys by
their providers' documented prefixes (they have no check digits).

Reasons and logs name kinds and counts, never a value: a guard that writes the secret it found
into a log line has leaked it.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

from slimlm.errors import SlimlmError

MODES = ("local", "redact")
KINDS = ("private_key", "api_key", "email", "iban", "card", "national_id", "ip", "phone")  # priority order
PLACEHOLDER = re.compile(r"\[(PRIVATE_KEY|API_KEY|EMAIL|IBAN|CARD|NATIONAL_ID|IP|PHONE)_(\d+)\]")
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR")

_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?"
                          r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)", re.S)
_TOKEN_EDGE = r"(?<![A-Za-z0-9_-])"
_API_KEYS = [re.compile(_TOKEN_EDGE + p + r"(?![A-Za-z0-9_-])") for p in (
    r"sk-(?:proj-|ant-|live_|test_)?[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic, Stripe-like
    r"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub classic tokens
    r"github_pat_[A-Za-z0-9_]{22,}",  # GitHub fine-grained tokens
    r"(?:AKIA|ASIA)[0-9A-Z]{16}",  # AWS access key ids
    r"xox[bpars]-[A-Za-z0-9-]{10,}",  # Slack
    r"AIza[0-9A-Za-z_-]{35}",  # Google API keys
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",  # JWT: header.payload.signature
)]
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]{1,4}){3,8}(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\d-])[2-6]\d{3}(?:[ -]?\d){9,15}(?![\d-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_SSN = re.compile(r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])")
_DNI_NIE = re.compile(r"(?<![A-Za-z0-9])(?:\d{8}|[XYZ]-?\d{7})-?[A-Z](?![A-Za-z0-9])")
_CODICE_FISCALE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{6}[0-9LMNPQRSTUV]{2}[ABCDEHLMPRST][0-9LMNPQRSTUV]{2}"
                             r"[A-Z][0-9LMNPQRSTUV]{3}[A-Z](?![A-Za-z0-9])")
_NIR = re.compile(r"(?<![\d])[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?!\d)")
_NINO = re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                   r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])")


@dataclass(frozen=True)
class Finding:
    """One sensitive item: its kind (one of KINDS) and where it is, text[start:end]."""

    kind: str
    start: int
    end: int


@dataclass
class Decision:
    """May this request leave the machine? `reason` names kinds and counts, never values."""

    allowed_to_leave: bool
    kinds: list[str]
    reason: str
    counts: dict[str, int] = field(default_factory=dict)
    needs_redaction: bool = False


def _iban_findings(text: str):
    from stdnum import iban

    pos = 0
    while (m := _IBAN.search(text, pos)) is not None:
        # The candidate may have swallowed following code-like words: drop trailing groups
        # until the checksum agrees (an IBAN never validates by accident, mod 97), then look
        # again right after what was found, as the swallowed words may start the next IBAN.
        span, pos = m.group(0), m.start() + 1
        while len(span) >= 15:
            if iban.is_valid(span):
                yield Finding("iban", m.start(), m.start() + len(span))
                pos = m.start() + len(span)
                break
            cut = max(span.rfind(" "), span.rfind("-"))
            if cut < 0:
                break
            span = span[:cut]


def _validated(pattern: re.Pattern, kind: str, text: str, valid) -> list[Finding]:
    return [Finding(kind, m.start(), m.end()) for m in pattern.finditer(text) if valid(m.group(0))]


def _ipv6_ok(value: str) -> bool:
    groups = [g for g in value.split(":") if g]
    if len(groups) < 2 or sum(len(g) for g in groups) < 4:  # "a::b", "::1" in code are not worth a redaction
        return False
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def _ipv4_ok(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


class PrivacyGuard:
    """Scan, redact and restore sensitive items; decide whether a request may leave.

    mode "local": any finding keeps the request on this machine.
    mode "redact": it may leave once `redact`/`redact_messages` has replaced the items.
    """

    def __init__(self, mode: str = "local", phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS,
                 kinds: tuple[str, ...] = KINDS) -> None:
        if mode not in MODES:
            raise SlimlmError(f"unknown privacy mode '{mode}': choose one of {', '.join(MODES)}")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise SlimlmError(f"unknown kind of personal data '{unknown[0]}': choose from {', '.join(KINDS)}")
        self.mode = mode
        self.phone_regions = tuple(phone_regions)
        self.kinds = frozenset(kinds)  # what counts (curation may keep, say, IP addresses in logs)

    # -- detection ---------------------------------------------------------------------------
    def scan(self, text: str) -> list[Finding]:
        """Every sensitive item in `text`, in order, without overlaps (the higher-priority kind
        in KINDS wins an overlap, then the longer span)."""
        from stdnum import luhn
        from stdnum.es import dni, nie
        from stdnum.fr import nir
        from stdnum.it import codicefiscale
        from stdnum.us import ssn

        if not text:
            return []
        found = [Finding("private_key", m.start(), m.end()) for m in _PRIVATE_KEY.finditer(text)]
        for pattern in _API_KEYS:
            found += [Finding("api_key", m.start(), m.end()) for m in pattern.finditer(text)]
        found += [Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
        found += list(_iban_findings(text))
        found += _validated(_CARD, "card", text, lambda v: 13 <= len(re.sub(r"\D", "", v)) <= 19
                            and luhn.is_valid(re.sub(r"\D", "", v)))
        found += _validated(_SSN, "national_id", text, ssn.is_valid)
        found += _validated(_DNI_NIE, "national_id", text, lambda v: dni.is_valid(v) or nie.is_valid(v))
        found += _validated(_CODICE_FISCALE, "national_id", text, codicefiscale.is_valid)
        found += _validated(_NIR, "national_id", text, nir.is_valid)
        found += _validated(_NINO, "national_id", text, lambda v: True)  # format only, see module docstring
        found += _validated(_IPV4, "ip", text, _ipv4_ok)
        found += _validated(_IPV6, "ip", text, _ipv6_ok)
        found += self._phones(text)
        return [f for f in _without_overlaps(found) if f.kind in self.kinds]

    def _phones(self, text: str) -> list[Finding]:
        import phonenumbers

        spans = set()
        for region in self.phone_regions:
            for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                spans.add((m.start, m.end))
        return [Finding("phone", s, e) for s, e in spans]

    # -- redaction ---------------------------------------------------------------------------
    def redact(self, text: str, mapping: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
        """`text` with each item replaced by a typed placeholder, and {placeholder: value}.

        The same value always gets the same placeholder (also across calls sharing `mapping`,
        so the messages of one conversation are redacted consistently). Numbers already used
        as literal placeholders in the text are skipped, so restoring never touches them.
        """
        mapping = dict(mapping or {})
        by_value = {v: k for k, v in mapping.items()}
        used = Counter(m.group(1) for m in PLACEHOLDER.finditer(" ".join(mapping)))
        pieces, last = [], 0
        for f in self.scan(text):
            value = text[f.start:f.end]
            if value not in by_value:
                tag = f.kind.upper()
                while True:
                    used[tag] += 1
                    placeholder = f"[{tag}_{used[tag]}]"
                    if placeholder not in text and placeholder not in mapping:
                        break
                mapping[placeholder], by_value[value] = value, placeholder
            pieces += [text[last:f.start], by_value[value]]
            last = f.end
        pieces.append(text[last:])
        return "".join(pieces), mapping

    @staticmethod
    def restore(text: str, mapping: dict[str, str]) -> str:
        """Put the values back where the answer repeats a placeholder (one pass, so a value
        that itself looks like a placeholder is never replaced again)."""
        return PLACEHOLDER.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)

    def redact_messages(self, messages: list[dict]) -> tuple[list[dict], dict[str, str]]:
        """OpenAI-style chat messages with every text part redacted, and the shared mapping."""
        mapping: dict[str, str] = {}
        redacted = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                content, mapping = self.redact(content, mapping)
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        text, mapping = self.redact(part["text"], mapping)
                        part = {**part, "text": text}
                    parts.append(part)
                content = parts
            redacted.append({**message, "content": content})
        return redacted, mapping

    # -- the decision ------------------------------------------------------------------------
    def check(self, messages: list[dict] | str) -> Decision:
        """Whether the request may go to a remote model, and why (kinds and counts only)."""
        counts: Counter = Counter()
        for text in _texts(messages):
            counts.update(f.kind for f in self.scan(text))
        kinds = [k for k in KINDS if counts[k]]
        if not kinds:
            return Decision(True, [], "no personal data or secrets found")
        found = ", ".join(f"{counts[k]} {k}" for k in kinds)
        if self.mode == "local":
            return Decision(False, kinds, f"kept local: found {found} (privacy mode 'local')", dict(counts))
        return Decision(True, kinds, f"may leave after redaction: found {found} (privacy mode 'redact')",
                        dict(counts), needs_redaction=True)


def _texts(messages: list[dict] | str) -> list[str]:
    if isinstance(messages, str):
        return [messages]
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return texts


def _without_overlaps(found: list[Finding]) -> list[Finding]:
    rank = {k: i for i, k in enumerate(KINDS)}
    kept: list[Finding] = []
    for f in sorted(found, key=lambda f: (rank[f.kind], f.start - f.end, f.start)):
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)
