"""The diverse calibration set `mix` and the out-of-domain held-out corpora (data/calibration_mix.py)."""

from __future__ import annotations

import pytest

from slimlm.data import (
    BUILTIN_CORPORA,
    DEFAULT_CALIB,
    calibration_corpus,
    calibration_docs,
    held_out_corpora,
    held_out_docs,
    mix_docs,
    ngram_overlap,
    text_documents,
)
from slimlm.data import calibration_mix as cm
from slimlm.errors import SlimlmError


def test_mix_holds_every_kind_of_text():
    kinds = cm.mix_by_kind()
    assert set(kinds) == set(cm.MIX_KINDS)
    assert all(kinds[k] for k in cm.MIX_KINDS), {k: len(v) for k, v in kinds.items()}
    assert all(d.startswith("<|im_start|>") and "<|im_start|>assistant\n" in d for d in kinds["chat"])
    assert sum("def " in d for d in kinds["code"]) > len(kinds["code"]) // 2
    other = "".join(kinds["other languages"])
    assert any("\uac00" <= c <= "\ud7a3" for c in other) and "ğ" in other  # Korean and Turkish at least
    chars = sum(map(len, mix_docs()))
    assert chars > 500_000  # far more than a 128 x 256-token calibration run reads
    assert max(sum(map(len, v)) for v in kinds.values()) < 0.3 * chars  # no kind dominates


def test_mix_is_deterministic():
    first = mix_docs()
    for f in (cm._split, cm._sources, cm._abstracts, cm._stdlib_modules, cm._humaneval):
        f.cache_clear()
    assert mix_docs() == first
    assert first[:len(cm.MIX_KINDS)] != sorted(first[:len(cm.MIX_KINDS)]) or len(set(first)) == len(first)


@pytest.mark.parametrize("corpus", ["python-docs", "prose", "chat"])
def test_no_calibration_set_shares_a_13_gram_with_held_out_text(corpus):
    held = held_out_corpora()[corpus]
    assert held
    assert ngram_overlap(mix_docs(), held) == 0
    if corpus != "python-docs":
        assert ngram_overlap(calibration_docs(), held) == 0  # python-docs calibration never saw the new corpora
    assert ngram_overlap(held, held) > 0  # the check does find shared runs where there are some


def test_python_docs_own_split_leaks_and_mix_leaves_the_leak_out():
    """The python-docs split (kept as it was) is not clean: its 'compound' topic quotes the held-out
    'while' and 'with' statements whole (and 'async', 'for', 'context-managers', 'specialnames' share
    runs), so calibrating on python-docs sees part of its in-domain held-out text. `mix` drops them."""
    assert ngram_overlap(calibration_docs(), held_out_docs()) > 500
    assert not any(d.startswith("Compound statements") for d in mix_docs())


def test_held_out_corpora_are_big_enough_and_of_their_kind():
    corpora = held_out_corpora()
    assert corpora["python-docs"] == held_out_docs()  # the in-domain split unchanged
    assert sum(map(len, corpora["prose"])) > 12_000 and "<|im_start|>" not in "".join(corpora["prose"])
    assert sum(map(len, corpora["chat"])) > 12_000
    assert all(d.startswith("<|im_start|>user\n") for d in corpora["chat"])
    assert not set(mix_docs()) & set(corpora["prose"] + corpora["chat"])


def test_names_resolve_as_built_in_corpora():
    assert DEFAULT_CALIB == "mix" and {"mix", "held-out-prose", "held-out-chat", "python-docs"} <= set(BUILTIN_CORPORA)
    assert calibration_corpus("mix") == mix_docs()
    assert calibration_corpus("python-docs") == calibration_docs()
    assert text_documents("held-out-prose") == held_out_corpora()["prose"]
    assert text_documents("held-out-chat") == held_out_corpora()["chat"]
    with pytest.raises(SlimlmError, match="held out from calibration"):
        calibration_corpus("held-out-chat")


def test_chat_wraps_turns_in_chatml():
    assert cm.chat(("user", "hi "), ("assistant", "hello")) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
