"""The privacy guard: what it must catch, what it must leave alone, and that it never leaks."""

from __future__ import annotations

import pytest

from slimlm.data.privacy import KINDS, Decision, Finding, PrivacyGuard
from slimlm.errors import SlimlmError

PRIVATE_KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAA\n"
               "-----END OPENSSH PRIVATE KEY-----")
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"

# (kind, text around the value, the value that must be found)
POSITIVE = [
    ("email", "write to {} today", "jane.doe+work@mail.example.co.uk"),
    ("email", "({})", "a_b@x-y.io"),
    ("phone", "call {} tomorrow", "+1 415-555-2671"),
    ("phone", "phone: {}", "(415) 555-2671"),
    ("phone", "ring {} please", "020 7946 0018"),
    ("phone", "Tel. {}", "+49 30 901820"),
    ("card", "card {} exp 12/29", "4111 1111 1111 1111"),
    ("card", "card {}", "5500-0000-0000-0004"),
    ("card", "amex {}", "378282246310005"),
    ("iban", "IBAN {}.", "DE89 3704 0044 0532 0130 00"),
    ("iban", "pay to {}", "GB82WEST12345698765432"),
    ("iban", "compte {}", "FR14 2004 1010 0505 0001 3M02 606"),
    ("national_id", "SSN {}", "536-90-4399"),
    ("national_id", "DNI {}", "54362315K"),
    ("national_id", "NIE {}", "X2482300W"),
    ("national_id", "codice fiscale {}", "RSSMRA85T10A562S"),
    ("national_id", "NIR {}", "2 55 08 14 168 025 38"),
    ("national_id", "NI number {}", "AB 12 34 56 C"),
    ("ip", "server at {}.", "192.168.1.20"),
    ("ip", "host {} is down", "2001:db8::8a2e:370:7334"),
    ("ip", "link-local {}", "fe80::1ff:fe23:4567:890a"),
    ("api_key", "key={}", "sk-proj-Abcdefghijklmnopqrstuvwx12"),
    ("api_key", "token {}", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("api_key", "token {}", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("api_key", "aws {}", "AKIAIOSFODNN7EXAMPLE"),
    ("api_key", "slack {}", "xoxb-1234567890-abcdefghijklm"),
    ("api_key", "google {}", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    ("api_key", "HF_TOKEN={}", "hf_abcdefghijklmnopqrstuvwxyzABCDEF"),
    ("api_key", "Bearer {}", JWT),
    ("private_key", "here:\n{}\nthanks", PRIVATE_KEY),
    ("private_key", "truncated: {}", "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC"),
]

NEGATIVE = [
    ("card", "card 4111 1111 1111 1112 (Luhn fails)"),
    ("card", "order number 1234567812345678"),
    ("iban", "IBAN DE89 3704 0044 0532 0130 01 (checksum fails)"),
    ("iban", "model GB12 ABCD 1234 5678 9012 34"),
    ("national_id", "SSN 000-12-3456 has no area 000"),
    ("national_id", "DNI 54362315A has the wrong letter"),
    ("ip", "released version 1.2.3.4.5 today"),
    ("ip", "octets 300.1.1.1 are out of range"),
    ("ip", "it is 12:30:45 now, MAC 00:1A:2B:3C:4D:5E"),
    ("ip", "C++ uses std::vector and a::b"),
    ("phone", "order 12345 shipped in 2024 for 1234567 dollars"),
    ("phone", "pi is 3.14159265, the date is 2024-05-01"),
    ("email", "not an address: user@localhost or @handle"),
    ("api_key", "sk-short and ghp_tooShort and the word AKIAfoo"),
    ("private_key", "-----BEGIN PUBLIC KEY----- is fine to share"),
]


@pytest.fixture(scope="module")
def guard():
    return PrivacyGuard("redact")


@pytest.mark.parametrize("kind,template,value", POSITIVE, ids=[f"{k}-{v[:14]}" for k, _, v in POSITIVE])
def test_finds_each_kind(guard, kind, template, value):
    text = template.format(value)
    found = guard.scan(text)
    assert [(f.kind, text[f.start:f.end]) for f in found] == [(kind, value)]


@pytest.mark.parametrize("kind,text", NEGATIVE, ids=[f"{k}-{i}" for i, (k, _) in enumerate(NEGATIVE)])
def test_leaves_lookalikes_alone(guard, kind, text):
    assert [f for f in guard.scan(text) if f.kind == kind] == []


def test_plain_prose_has_nothing(guard):
    text = "Explain the difference between a list and a tuple in Python 3.12, with 2 examples."
    assert guard.scan(text) == []
    assert guard.check([{"role": "user", "content": text}]) == Decision(True, [], "no personal data or secrets found")


def test_findings_do_not_overlap_and_priority_wins(guard):
    text = "mail 4155552671@example.com, then 4111111111111111"
    found = guard.scan(text)
    assert [f.kind for f in found] == ["email", "card"]  # not a phone inside the address
    assert all(a.end <= b.start for a, b in zip(found, found[1:]))


def test_redact_restore_round_trip(guard):
    text = (f"I am jane@example.com (again: jane@example.com), card 4111 1111 1111 1111, "
            f"server 10.0.0.7, token {JWT}.\n{PRIVATE_KEY}")
    redacted, mapping = guard.redact(text)
    assert redacted.count("[EMAIL_1]") == 2 and "[EMAIL_2]" not in redacted  # same value, same placeholder
    for placeholder in ("[CARD_1]", "[IP_1]", "[API_KEY_1]", "[PRIVATE_KEY_1]"):
        assert placeholder in redacted
    for value in mapping.values():
        assert value not in redacted
    assert guard.scan(redacted) == []
    assert guard.restore(redacted, mapping) == text
    answer = "Sure, I will email [EMAIL_1] and never print [CARD_1]; [PHONE_9] is unknown."
    assert guard.restore(answer, mapping) == ("Sure, I will email jane@example.com and never print "
                                             "4111 1111 1111 1111; [PHONE_9] is unknown.")


def test_redact_avoids_placeholders_already_in_the_text(guard):
    text = "the template says [EMAIL_1]; my address is bob@example.org"
    redacted, mapping = guard.redact(text)
    assert list(mapping) == ["[EMAIL_2]"]
    assert guard.restore(redacted, mapping) == text


def test_redact_messages_share_one_mapping(guard):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "my mail is bob@example.org"},
                {"role": "assistant", "content": "Noted, bob@example.org."},
                {"role": "user", "content": [{"type": "text", "text": "and call +1 415-555-2671"},
                                             {"type": "image_url", "image_url": {"url": "x"}}]}]
    redacted, mapping = guard.redact_messages(messages)
    assert redacted[1]["content"] == "my mail is [EMAIL_1]"
    assert redacted[2]["content"] == "Noted, [EMAIL_1]."
    assert redacted[3]["content"][0]["text"] == "and call [PHONE_1]"
    assert redacted[3]["content"][1] == messages[3]["content"][1]
    assert messages[1]["content"] == "my mail is bob@example.org"  # the input is not modified
    assert set(mapping) == {"[EMAIL_1]", "[PHONE_1]"}


@pytest.mark.parametrize("mode", ["local", "redact"])
def test_decision_names_kinds_and_counts_never_values(mode):
    secrets = ["jane@example.com", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "536-90-4399",
               "192.168.1.20", "sk-proj-Abcdefghijklmnopqrstuvwx12", "+1 415-555-2671"]
    messages = [{"role": "user", "content": " and ".join(secrets)},
                {"role": "user", "content": [{"type": "text", "text": "also bob@example.org"}]}]
    decision = PrivacyGuard(mode).check(messages)
    assert decision.allowed_to_leave is (mode == "redact")
    assert decision.needs_redaction is (mode == "redact")
    assert decision.kinds == ["api_key", "email", "iban", "card", "national_id", "ip", "phone"]
    assert decision.counts["email"] == 2
    assert "2 email" in decision.reason and "1 card" in decision.reason
    for value in secrets + ["bob@example.org", "4111", "example", "415"]:
        assert value not in decision.reason
        assert value not in repr(decision)


def test_unknown_mode_is_a_user_error():
    with pytest.raises(SlimlmError, match="privacy mode"):
        PrivacyGuard("cloud")


def test_kinds_and_findings_are_public():
    assert set(KINDS) == {"private_key", "api_key", "email", "iban", "card", "national_id", "ip", "phone"}
    assert Finding("email", 0, 3).end == 3
