"""A recipe run end to end: the funnel adds up, outputs carry provenance and token counts, chat
and Parquet round-trip, bad input fails with file:line before any work, and a killed run
continues without losing or duplicating a document."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimlm.curate import RunOptions, curate, load_run, removed_samples
from slimlm.curate.ingest import read_shards
from slimlm.errors import SlimlmError
from tests.curate.test_steps import PROSE

RECIPE = {"tokenizer": "words",
          "steps": ["normalize", {"language": {"languages": ["en"]}},
                    {"gopher_quality": {"min_doc_words": 20, "max_non_alpha_words_ratio": 0.5}},
                    "pii", "exact_dedup", "near_dedup", "decontaminate"]}


def _paragraphs(n: int) -> list[str]:
    """Distinct English paragraphs of 40+ words from Python's reference docs: mostly words, with
    common English function words (what every quality rule set expects of prose)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            words = p.split()
            function_words = {w.lower() for w in words} & {"the", "to", "of", "and", "that", "with", "is", "a"}
            if len(words) >= 40 and sum(w.isalpha() for w in words) > 0.8 * len(words) and len(function_words) >= 4:
                out.append(" ".join(words))
    return list(dict.fromkeys(out))[:n]


def _corpus(folder: Path, n_good: int = 30) -> dict[str, str]:
    """JSONL input with known fates: {id: expected reason or 'kept'}."""
    from slimlm.curate.steps.decontaminate import task_texts

    good = _paragraphs(n_good)
    near = good[1].split()
    near[10] = "different"
    humaneval = next(t for t in task_texts("humaneval") if len(t.split()) > 30)
    rows = [(g, "kept") for g in good] + [
        (good[0], "exact_dedup"),
        (" ".join(near), "near_dedup"),
        ("Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft auf dem Sofa. " * 3,
         "language_de"),
        ("This sentence is written in plain English, and it is short.", "gopher_short_doc"),
        (PROSE + " " + " ".join(humaneval.split()[:30]), "decontaminate_humaneval"),
        ("Write to jane.roe@example.org for details. " + PROSE, "kept"),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w") as f:
        for text, _ in rows:
            f.write(json.dumps({"text": text}) + "\n")
    return {f"{folder / 'docs.jsonl'}:{i}": fate for i, (_, fate) in enumerate(rows, start=1)}


def _kept(out: Path) -> list[dict]:
    return list(read_shards(out / "data"))


def test_a_recipe_keeps_the_good_and_says_why_it_removed_the_rest(tmp_path):
    fates = _corpus(tmp_path / "in")
    result = curate(RECIPE, [tmp_path / "in"], tmp_path / "out", RunOptions(tasks=2), say=lambda _: None)
    kept = _kept(tmp_path / "out")
    assert sorted(r["id"] for r in kept) == sorted(i for i, f in fates.items() if f == "kept")
    # the funnel adds up, step by step, and matches what was written
    for step in result.funnel:
        assert step["docs_in"] - step["docs_out"] == sum(step["removed"].values())
    assert result.funnel[-1]["docs_out"] == len(kept)
    assert result.funnel[-1]["tokens_out"] == sum(r["metadata"]["token_count"] for r in kept)
    assert sum(len(r["text"].split()) for r in kept) == result.funnel[-1]["tokens_out"]  # words, recounted
    removed = {r: n for s in result.funnel for r, n in s["removed"].items()}
    assert removed == {"language_de": 1, "gopher_short_doc": 1, "exact_dedup": 1, "near_dedup": 1,
                       "decontaminate_humaneval": 1}
    # provenance, redaction, and what inspect shows
    redacted = next(r for r in kept if "[EMAIL_1]" in r["text"])
    assert redacted["metadata"]["source"].endswith("docs.jsonl") and redacted["metadata"]["pii"] == {"email": 1}
    samples = removed_samples(tmp_path / "out")
    assert samples["07-decontaminate"]["decontaminate_humaneval"][0]["task"] == "humaneval"
    assert load_run(tmp_path / "out")["funnel"] == result.funnel
    assert "data:image/png;base64," in (tmp_path / "out" / "report.html").read_text()
    assert not (tmp_path / ".out.work").exists()


def test_tokens_are_counted_with_the_recipes_tokenizer(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    texts = _paragraphs(5)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = curate({"tokenizer": str(tiny_tokenizer_dir), "steps": ["exact_dedup"]}, [tmp_path / "in.jsonl"],
                    tmp_path / "out", RunOptions(tasks=1), say=lambda _: None)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert result.input["tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def test_chat_records_come_back_as_messages_and_parquet_round_trips(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [{"messages": [{"role": "user", "content": f"My card is 4111 1111 1111 1111, question {i}?"},
                           {"role": "assistant", "content": "Thanks, I will not repeat it."}]} for i in range(3)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    pq.write_table(pa.table({"body": ["A plain paragraph of text about rivers and hills.", "Another one."]}),
                   tmp_path / "docs.parquet")
    curate({"tokenizer": "words", "steps": ["pii"]}, [tmp_path / "chat.jsonl"], tmp_path / "out",
           RunOptions(tasks=1), say=lambda _: None)
    kept = _kept(tmp_path / "out")
    assert [m["role"] for m in kept[0]["messages"]] == ["user", "assistant"]
    assert "[CARD_1]" in kept[0]["messages"][0]["content"] and "4111" not in json.dumps(kept)
    curate({"tokenizer": "words", "steps": ["normalize"]}, [tmp_path / "docs.parquet"], tmp_path / "pq",
           RunOptions(tasks=1, text_field="body", output_format="parquet"), say=lambda _: None)
    table = pq.read_table(next((tmp_path / "pq" / "data").glob("*.parquet")))
    assert sorted(table.column("text").to_pylist()) == ["A plain paragraph of text about rivers and hills.",
                                                         "Another one."]


def test_bad_records_fail_naming_file_and_line_or_are_skipped_by_flag(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": broken\n{"body": "no text"}\n{"text": "caf\xe9"}\n')
    recipe = {"tokenizer": "words", "steps": ["normalize"]}
    with pytest.raises(SlimlmError, match=rf"{bad}:2: not valid JSON .*--on-error skip"):
        curate(recipe, [bad], tmp_path / "out", say=lambda _: None)
    assert not (tmp_path / "out").exists()
    result = curate(recipe, [bad], tmp_path / "out", RunOptions(tasks=1, on_error="skip"), say=lambda _: None)
    assert [s.split(": ")[0] for s in result.skipped] == [f"{bad}:2", f"{bad}:3", f"{bad}:4"]
    assert "not UTF-8" in result.skipped[2] and result.funnel[-1]["docs_out"] == 1
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SlimlmError, match="broken.parquet: not a readable Parquet file"):
        curate(recipe, [tmp_path / "broken.parquet"], tmp_path / "out2", say=lambda _: None)


def test_an_existing_output_needs_force_and_unknown_steps_fail_before_any_work(tmp_path):
    (tmp_path / "in.txt").write_text(PROSE)
    (tmp_path / "out").mkdir()
    with pytest.raises(SlimlmError, match="already exists: .*--force"):
        curate({"tokenizer": "words", "steps": ["normalize"]}, [tmp_path / "in.txt"], tmp_path / "out")
    with pytest.raises(SlimlmError, match="unknown step 'gopher'"):
        curate({"steps": ["gopher"]}, [tmp_path / "in.txt"], tmp_path / "new")
    assert not (tmp_path / "new").exists() and not (tmp_path / ".new.work").exists()


def test_a_killed_run_continues_without_losing_or_duplicating_documents(tmp_path):
    fates = _corpus(tmp_path / "in", n_good=60)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    script = ("import json, sys; from slimlm.curate import curate, RunOptions; "
              "curate(json.load(open(sys.argv[1])), [sys.argv[2]], sys.argv[3], RunOptions(tasks=4, workers=1))")
    cmd = [sys.executable, "-c", script, str(recipe), str(tmp_path / "in"), str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL)
    done = tmp_path / ".out.work" / "logs" / "01-documents" / "completions"
    deadline = time.time() + 120
    while time.time() < deadline and not (done.exists() and any(done.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-stage
    proc.wait()
    assert done.exists() and not (tmp_path / "out").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=300)
    kept = [r["id"] for r in _kept(tmp_path / "out")]
    assert len(kept) == len(set(kept))
    assert sorted(kept) == sorted(i for i, f in fates.items() if f == "kept")
    run = load_run(tmp_path / "out")
    assert run["funnel"][0]["docs_in"] == len(fates)
    for step in run["funnel"]:
        assert step["docs_in"] - step["docs_out"] == sum(step["removed"].values())
    assert not (tmp_path / ".out.work").exists()


def test_an_unreadable_file_is_named(tmp_path):
    import gzip as gz

    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gz.compress(b'{"text": "fine"}\n')[:-12])  # cut short: the stream ends early
    with pytest.raises(SlimlmError, match=rf"{broken}: cannot be read"):
        curate({"tokenizer": "words", "steps": ["normalize"]}, [broken], tmp_path / "out", say=lambda _: None)
