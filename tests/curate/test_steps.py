"""Each document step on small hand-made documents whose fate is known."""

from __future__ import annotations

import pytest

from slimlm.curate.steps.dedup import optimal_bands
from slimlm.errors import SlimlmError
from tests.curate.helpers import apply_step

PROSE = ("The history of the town is told in the records of its church and its market. In the spring the "
         "farmers brought their animals to the square, and the traders came from the coast with salt and "
         "cloth. Most of the houses were built of stone from the hills, and many of them are still standing "
         "today. The old bridge was rebuilt twice after floods, and the mill beside it ground flour for the "
         "whole valley until the railway came. The end came quietly.")


def test_normalize_composes_unicode_collapses_whitespace_and_drops_empty(tmp_path):
    kept, removed = apply_step("normalize", ["Cafe\u0301  au\t lait\x07\n\n\n\n next   line  ", " \n\t "], tmp_path)
    assert [d.text for d in kept] == ["Café au lait\n\nnext line"]
    assert kept[0].metadata["token_count"] == 5  # recounted after the rewrite (words)
    assert [d.metadata["filter_reason"] for d in removed] == ["empty"]


def test_normalize_can_keep_whitespace_for_code(tmp_path):
    code = "def f(x):\n    return x  # two spaces\n"
    kept, _ = apply_step("normalize", [code], tmp_path, whitespace=False)
    assert kept[0].text == code


def test_language_keeps_the_listed_languages_and_names_the_others(tmp_path):
    german = "Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft auf dem Sofa im Haus."
    kept, removed = apply_step("language", [PROSE, german], tmp_path)
    assert [d.id for d in kept] == ["0"] and kept[0].metadata["language"] == "en"
    assert removed[0].metadata["filter_reason"] == "language_de"
    kept, _ = apply_step("language", [PROSE, german], tmp_path / "any", languages=[])
    assert len(kept) == 2


def test_language_refuses_a_code_it_does_not_know(tmp_path):
    with pytest.raises(SlimlmError, match="'english' is not one py3langid knows"):
        apply_step("language", [PROSE], tmp_path, languages=["english"])


def test_gopher_quality_takes_its_published_defaults_and_the_recipe_overrides(tmp_path):
    short = "Too short to be a document of any use."
    kept, removed = apply_step("gopher_quality", [PROSE, short], tmp_path)
    assert [d.id for d in kept] == ["0"]
    assert removed[0].metadata["filter_reason"] == "gopher_short_doc"  # Gopher: at least 50 words
    kept, _ = apply_step("gopher_quality", [PROSE, short], tmp_path / "lenient", min_doc_words=5)
    assert len(kept) == 2


def test_gopher_repetition_removes_a_repeated_line_document(tmp_path):
    spam = "\n".join(["Buy cheap watches online now"] * 30)
    kept, removed = apply_step("gopher_repetition", [PROSE, spam], tmp_path)
    assert [d.id for d in kept] == ["0"] and removed[0].id == "1"


def test_c4_removes_javascript_and_lorem_ipsum(tmp_path):
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " + PROSE
    kept, removed = apply_step("c4_quality", [PROSE, lorem], tmp_path)
    assert [d.id for d in kept] == ["0"] and removed[0].metadata["filter_reason"] == "lorem_ipsum"


def test_pii_redacts_validated_items_only(tmp_path):
    text = "Mail jane.roe@example.org, card 4111 1111 1111 1111, order 1234 5678 9012 3456. " + PROSE
    kept, _ = apply_step("pii", [text], tmp_path)
    assert "[EMAIL_1]" in kept[0].text and "[CARD_1]" in kept[0].text
    assert "jane.roe" not in kept[0].text and "1234 5678 9012 3456" in kept[0].text  # fails Luhn: not a card
    assert kept[0].metadata["pii"] == {"email": 1, "card": 1}


def test_pii_drop_mode_and_kinds(tmp_path):
    text = "Reach me at jane.roe@example.org. " + PROSE
    kept, removed = apply_step("pii", [text, PROSE], tmp_path, action="drop")
    assert [d.id for d in kept] == ["1"] and removed[0].metadata["filter_reason"] == "pii_email"
    kept, _ = apply_step("pii", [text], tmp_path / "cards", kinds=["card"])
    assert "jane.roe@example.org" in kept[0].text  # emails not asked for


def test_pii_refuses_an_unknown_kind(tmp_path):
    with pytest.raises(SlimlmError, match="unknown kind 'ssn'"):
        apply_step("pii", [PROSE], tmp_path, kinds=["ssn"])


def test_decontaminate_removes_documents_quoting_a_task_item(tmp_path):
    from slimlm.curate.steps.decontaminate import task_texts

    humaneval = next(t for t in task_texts("humaneval") if len(t.split()) > 30)
    quoted = PROSE + " " + " ".join(humaneval.split()[5:25])  # 20 words of HumanEval/0, reflowed
    pydoc = next(t for t in task_texts("multiple_choice:pydoc") if len(t.split()) > 15)
    quiz = "Quiz time! " + pydoc.replace("\n", " ").upper()  # case and line breaks do not hide it
    kept, removed = apply_step("decontaminate", [PROSE, quoted, quiz], tmp_path)
    assert [d.id for d in kept] == ["0"]
    assert {d.id: d.metadata["contaminated_by"] for d in removed} == {"1": "humaneval", "2": "multiple_choice:pydoc"}


def test_decontaminate_reads_the_users_task_file(tmp_path):
    import json

    data = tmp_path / "tickets.jsonl"
    data.write_text(json.dumps({"question": "Why was my invoice charged twice this month for the premium plan?",
                                "choices": ["bug", "billing"], "answer": 1}) + "\n")
    task = tmp_path / "tickets.yaml"
    task.write_text(f"kind: multiple_choice\ndata: {data}\n")
    doc = "Customer wrote: why was my invoice charged twice this month for the premium plan? Please help."
    kept, removed = apply_step("decontaminate", [doc, PROSE], tmp_path / "run", tasks=[str(task)], shipped=False)
    assert [d.id for d in kept] == ["1"] and removed[0].metadata["contaminated_by"] == str(task)


def test_decontaminate_refuses_a_task_without_items(tmp_path):
    with pytest.raises(SlimlmError, match="no items to decontaminate against"):
        apply_step("decontaminate", [PROSE], tmp_path, tasks=["perplexity:python-docs"])


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_near_dedup_bands_for_a_threshold_match_datasketch(threshold):
    from datasketch.lsh import _optimal_param  # datasketch's own choice, the independent reference

    assert optimal_bands(threshold, 112) == _optimal_param(threshold, 112, 0.5, 0.5)
