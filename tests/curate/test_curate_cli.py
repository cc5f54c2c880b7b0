"""`slimlm curate` and `slimlm curate inspect` through the real entry point."""

from __future__ import annotations

import json

from tests.conftest import run_cli
from tests.curate.test_steps import PROSE


def test_curate_with_a_preset_then_inspect(tmp_path, capfd):
    docs = [PROSE, PROSE, "Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft auf dem Sofa."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    code, out, err = run_cli(capfd, "curate", "--preset", "chat", tmp_path / "in.jsonl", "--field", "body",
                             "--out", tmp_path / "out", "--tokenizer", "words", "--tasks", "1")
    assert code == 0, err
    assert "3 -> 1 documents" in out and "language_de 1" in out and "exact_dedup 1" in out
    assert f"slimlm curate inspect {tmp_path / 'out'}" in out
    code, out, err = run_cli(capfd, "curate", "inspect", tmp_path / "out", "--step", "language")
    assert code == 0 and "removed for language_de" in out and "Der schnelle" in out
    assert "removed for exact_dedup" not in out  # --step shows that step only


def test_curate_errors_are_one_line(tmp_path, capfd):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - normalize\n  - gopher_quality: {min_words: 3}\n")
    (tmp_path / "in.txt").write_text(PROSE)
    code, out, err = run_cli(capfd, "curate", recipe, tmp_path / "in.txt", "--out", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1
    assert "steps[1] (gopher_quality): unknown key 'min_words'" in err and "Traceback" not in err
    code, _, err = run_cli(capfd, "curate", "inspect", tmp_path / "nothing")
    assert code == 1 and "not a curated folder" in err
