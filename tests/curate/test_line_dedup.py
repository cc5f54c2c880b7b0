"""`line_dedup`: lines that repeat across documents (menus, banners, footers) survive in one
document only; a page made of nothing else is dropped and says why; pages that only lose their
footer are kept, shortened, and are not listed as removed."""

from __future__ import annotations

import json

from slimlm.curate import RunOptions, curate, removed_samples
from slimlm.curate.ingest import read_shards
from tests.curate.test_run import _paragraphs

NAV = "Home | About us | Products | Contact | Careers"
FOOTER = ["Subscribe to our newsletter for weekly updates!", "Copyright 2024 Example Corp. All rights reserved."]


def _pages(tmp_path):
    articles = _paragraphs(4)
    pages = [[NAV, a, *FOOTER] for a in articles[:3]]
    pages.insert(1, [NAV, *FOOTER, "Back to top of this page, please."])  # boilerplate, and one line of its own
    pages.append([articles[3]])
    src = tmp_path / "pages.jsonl"
    src.write_text("".join(json.dumps({"text": "\n".join(p)}) + "\n" for p in pages))
    return src, pages


def test_repeated_lines_survive_once_and_a_page_of_boilerplate_goes(tmp_path):
    src, pages = _pages(tmp_path)
    recipe = {"tokenizer": "words", "steps": [{"line_dedup": {"min_doc_words": 20, "min_sentences": 1}}]}
    result = curate(recipe, [src], tmp_path / "out", RunOptions(tasks=1), say=lambda _: None)
    kept = {int(r["id"].rpartition(":")[2]) - 1: r for r in read_shards(tmp_path / "out" / "data")}

    # the expected fate, computed directly: a line is cut when an earlier page had it
    seen, expected = set(), {}
    for i, page in enumerate(pages):
        left = [line for line in page if line not in seen]
        seen.update(page)
        if len(" ".join(left).split()) >= 20:
            expected[i] = "\n".join(left)
    assert 1 not in expected and len(expected) == 4  # the boilerplate page is left with 6 words
    assert {i: r["text"] for i, r in kept.items()} == expected
    assert all(r["metadata"]["token_count"] == len(r["text"].split()) for r in kept.values())  # recounted

    # only the dropped page is listed as removed, with the whole text it had
    assert result.funnel[0]["removed"] == {"line_dedup": 1}
    (sample,) = removed_samples(tmp_path / "out")["01-line_dedup"]["line_dedup"]
    assert sample["text"] == "\n".join(pages[1])
