"""The labelled corpus bench/curate.py measures curation on: good documents from two offline
sources, and bad ones generated with known labels.

Good: paragraphs of Python's reference documentation (python-docs, 30+ words) and the English
prose of slimlm's calibration mix (science abstracts, the IDLE manual, licences, reference text;
data/calibration_mix.py documents each source). Bad, each labelled:
- exact_dup: a good document again, byte for byte;
- near_dup: a good document with one word in 40 replaced (at least one): small edits;
- boilerplate: navigation menus, cookie banners and footers;
- spam: keyword lists;
- salad: words of the good documents in random order (the vocabulary is right, the text is not);
- non_english: the calibration mix's documents in other languages;
- contaminated: a paragraph of the same sources (kept out of the good ones, so it has no clean twin)
  with an eval item inside (a HumanEval prompt or a pydoc question).
A duplicate's `group` names its original, so a dedup that keeps the copy and drops the original
is not counted as a mistake.
"""

from __future__ import annotations

import random
import re

LABELS = ("good", "exact_dup", "near_dup", "boilerplate", "spam", "salad", "non_english", "contaminated")
NAV = ["Home", "About us", "Products", "Pricing", "Blog", "Careers", "Contact", "Login", "Sign up", "Cart",
       "Help center", "Terms of service", "Privacy policy", "Cookie settings", "Sitemap", "Newsletter"]
BANNERS = ["We use cookies to improve your experience. Accept all cookies?", "Subscribe to our newsletter!",
           "Copyright 2024 Example Corp. All rights reserved.", "Follow us on social media",
           "Click here to learn more", "Back to top", "Share this page", "Related posts", "Read more »"]
SPAM_WORDS = ["cheap", "best", "buy", "discount", "free", "shipping", "deal", "offer", "sale", "watches",
              "pills", "casino", "bonus", "win", "online", "now", "top", "rated", "review", "price"]


def good_documents(limit: int) -> list[str]:
    from slimlm.data import python_docs
    from slimlm.data.calibration_mix import mix_by_kind

    paragraphs = [" ".join(p.split()) for doc in python_docs() for p in doc.split("\n\n") if len(p.split()) >= 30]
    prose = [d for kind, docs in mix_by_kind().items() if kind.startswith("prose") for d in docs]
    docs = list(dict.fromkeys(paragraphs + prose))
    random.Random(0).shuffle(docs)
    return distinct(docs, 0.3)[:limit]


def _shingles(text: str, n: int = 5) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def distinct(docs: list[str], max_jaccard: float) -> list[str]:
    """The documents, less any whose word 5-gram Jaccard similarity with an earlier one reaches
    `max_jaccard` (computed exactly, with an inverted index): the sources repeat themselves (the
    licence texts, the reference's shared paragraphs), and a repeat labelled good would make a
    right removal look like a mistake."""
    from collections import defaultdict

    kept, sets, index = [], [], defaultdict(set)
    for doc in docs:
        s = _shingles(doc)
        shared = defaultdict(int)
        for g in s:
            for j in index[g]:
                shared[j] += 1
        if any(c / (len(s) + len(sets[j]) - c) >= max_jaccard for j, c in shared.items()):
            continue
        for g in s:
            index[g].add(len(sets))
        sets.append(s)
        kept.append(doc)
    return kept


def _boilerplate(rng: random.Random) -> str:
    lines = [" | ".join(rng.sample(NAV, rng.randint(4, 9))) for _ in range(rng.randint(2, 5))]
    lines += rng.sample(BANNERS, rng.randint(2, 5))
    rng.shuffle(lines)
    return "\n".join(lines)


def _spam(rng: random.Random) -> str:
    return " ".join(rng.choice(SPAM_WORDS) for _ in range(rng.randint(40, 120)))


def _salad(rng: random.Random, vocab: list[str]) -> str:
    words = [rng.choice(vocab) for _ in range(rng.randint(60, 160))]
    for i in range(rng.randint(4, 10), len(words), rng.randint(8, 16)):
        words[i] += "."
    return " ".join(words).capitalize()


def _near(rng: random.Random, text: str, vocab: list[str]) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, len(words) // 40)):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def labelled_corpus(n_good: int = 1000, seed: int = 0) -> list[dict]:
    """[{text, label, group}] in a shuffled order: n_good good documents and about half as many bad."""
    from slimlm.curate.steps.decontaminate import task_texts
    from slimlm.data.calibration_mix import _other_languages

    rng = random.Random(seed)
    pool = good_documents(n_good + max(20, n_good // 10))
    good, hosts = pool[:-max(20, n_good // 10)], pool[-max(20, n_good // 10):]  # hosts: only ever contaminated
    vocab = [w for d in good for w in d.split() if w.isalpha()]
    rows = [{"text": t, "label": "good", "group": i} for i, t in enumerate(good)]
    n = max(20, n_good // 10)
    for i in rng.sample(range(len(good)), n):
        rows.append({"text": good[i], "label": "exact_dup", "group": i})
    for i in rng.sample(range(len(good)), n):
        rows.append({"text": _near(rng, good[i], vocab), "label": "near_dup", "group": i})
    rows += [{"text": _boilerplate(rng), "label": "boilerplate", "group": None} for _ in range(n)]
    rows += [{"text": _spam(rng), "label": "spam", "group": None} for _ in range(n)]
    rows += [{"text": _salad(rng, vocab), "label": "salad", "group": None} for _ in range(n)]
    rows += [{"text": t, "label": "non_english", "group": None} for t in _other_languages()[:n]]
    items = [t for t in task_texts("humaneval") + task_texts("multiple_choice:pydoc") if len(t.split()) >= 20]
    for k in range(n):
        host = hosts[k % len(hosts)].split(". ")
        host.insert(rng.randint(0, len(host)), " ".join(rng.choice(items).split()))
        rows.append({"text": ". ".join(host), "label": "contaminated", "group": None})
    rng.shuffle(rows)
    return rows
