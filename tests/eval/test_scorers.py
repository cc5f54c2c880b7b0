"""Generation scorers: SQuAD-style normalisation, whole-word containment, regex, token F1."""

from __future__ import annotations

import pytest

from slimlm.errors import SlimlmError
from slimlm.eval.scorers import best_score, contains, exact_match, extract, get_scorer, regex, token_f1


@pytest.mark.parametrize("prediction, reference", [
    ("Paris", "paris"),  # case
    ("Paris.", "Paris"),  # punctuation
    ("The Eiffel Tower", "eiffel tower"),  # articles
    ("an apple", "apple"),
    ("  New   York\n", "new york"),  # whitespace
    ("it's", "its"),  # punctuation is deleted, not replaced by a space
])
def test_exact_match_normalises(prediction, reference):
    assert exact_match(prediction, reference) == 1.0


@pytest.mark.parametrize("prediction, reference", [
    ("Paris", "Lyon"),
    ("theatre", "atre"),  # "the" is removed only as a word
    ("New York City", "New York"),
    ("12", "1 2"),
])
def test_exact_match_rejects_different_answers(prediction, reference):
    assert exact_match(prediction, reference) == 0.0


def test_contains_is_whole_words():
    assert contains("The answer is 5.", "5") == 1.0
    assert contains("The answer is 15.", "5") == 0.0
    assert contains("the big apple pie", "Big Apple") == 1.0
    assert contains("pineapple", "apple") == 0.0
    assert contains("anything", "") == 0.0  # an empty reference matches nothing


def test_regex_reference_is_a_pattern():
    assert regex("the answer is 42", r"\b4\d\b") == 1.0
    assert regex("the answer is 142", r"\b4\d\b") == 0.0
    with pytest.raises(SlimlmError, match="regular expression"):
        regex("anything", "(unclosed")


def test_token_f1_by_hand():
    # normalised: prediction "cat sat on mat" (4 tokens), reference "cat sat" (2 tokens), 2 shared
    precision, recall = 2 / 4, 2 / 2
    expected = 2 * precision * recall / (precision + recall)
    assert token_f1("the cat sat on mat", "a cat sat") == pytest.approx(expected)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("Cat sat!", "cat sat") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


def test_token_f1_counts_repeats_once_per_occurrence():
    # "x x x y" vs "x y": shared = min(3, 1) x + min(1, 1) y = 2; P = 2/4, R = 2/2
    assert token_f1("x x x y", "x y") == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_best_score_takes_the_best_reference():
    assert best_score(exact_match, "Paris", ["Lyon", "paris", "Nice"]) == 1.0
    assert best_score(exact_match, "Paris", ["Lyon", "Nice"]) == 0.0
    assert best_score(token_f1, "cat sat", ["dog", "cat ran", "cat sat"]) == 1.0
    assert best_score(token_f1, "cat sat", ["dog", "cat ran"]) == pytest.approx(0.5)


def test_extract():
    assert extract("so the answer is 42, not 7", r"answer is (\d+)") == "42"
    assert extract("7 then 42", r"\d+") == "7"  # no group: the whole (first) match
    assert extract("no digits here", r"(\d+)") == ""
    assert extract("  keep me  ", None) == "  keep me  "
    assert extract("a=1 b=2", r"(\w)=(\d)") == "a"  # the first group of several


def test_extract_with_an_unmatched_optional_group_is_empty():
    assert extract("answer: b", r"(a)?b") == ""  # a str, never None (the scorers normalise it)


def test_get_scorer():
    assert get_scorer("token_f1") is token_f1
    with pytest.raises(SlimlmError, match="unknown scorer 'bleu'.*exact_match"):
        get_scorer("bleu")
