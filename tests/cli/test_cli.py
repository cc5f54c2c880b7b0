"""The CLI as a user meets it: verbs, help, output, and one-line errors with exit code 1."""

from __future__ import annotations

import json
import sys

import pytest

from slimlm import cli
from tests.conftest import run_cli


def run(capsys, *args):
    return run_cli(capsys, *args)


def test_verbs_are_the_cli_commands():
    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    names |= {g.name for g in cli.app.registered_groups}
    assert names == set(cli.VERBS)


@pytest.mark.parametrize("verb", cli.VERBS)
def test_every_verb_has_help(capsys, verb):
    code, out, _ = run(capsys, verb, "--help")
    assert code == 0 and "Usage" in out and len(out) > 200


def test_info_json(capsys, tiny_models):
    code, out, err = run(capsys, "info", tiny_models("mixtral"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["architecture"] == "mixtral" and data["experts"] == 4 and data["experts_per_token"] == 2
    assert data["params_active"] < data["params_total"]


def test_info_table_for_gguf(capsys, smollm2_gguf):
    code, out, _ = run(capsys, "info", "smollm2-135m-instruct")
    assert code == 0 and "llama" in out and "chat template" in out and "Q4_1" in out


def test_generate_streams_and_records_a_run(capsys, tiny_models):
    code, out, err = run(capsys, "generate", tiny_models("qwen2"), "Hello there", "--max-tokens", "5",
                         "--backend", "torch", "--stats")
    assert code == 0, err
    assert "generated tokens" in err
    code, out, _ = run(capsys, "runs", "--json")
    runs = json.loads(out)
    assert runs[0]["command"] == "generate" and runs[0]["params"]["max_tokens"] == 5
    code, out, _ = run(capsys, "runs", "show", runs[0]["id"])
    assert json.loads(out)["id"] == runs[0]["id"]


@pytest.mark.parametrize("args, fragment", [
    (["generate", "/no/such/dir", "hi"], "no such model"),
    (["generate", "acme/llama-7b", "hi"], "hf download"),
    (["generate", "smollm2-135m-instruct", "   "], "prompt is empty"),
    (["generate", "smollm2-135m-instruct", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "smollm2-135m-instruct", "hi", "--backend", "vllm"], "unknown backend"),
    (["info", "/no/such/file.gguf"], "no such model"),
    (["runs", "show", "999999"], "no run with id"),
])
def test_bad_input_is_one_line_without_traceback(capsys, args, fragment):
    code, out, err = run(capsys, *args)
    assert code == 1
    assert fragment in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert out == ""


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "architectures": ["X"]}))
    code, _, err = run(capsys, "generate", tmp_path, "hi", "--backend", "torch")
    assert code == 1 and "no_such_arch" in err and "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="no such model"):
        old = sys.argv
        sys.argv = ["slimlm", "--debug", "info", "/no/such/dir"]
        try:
            cli.main()
        finally:
            sys.argv = old


def test_convert_refuses_existing_output(capsys, smollm2_gguf, tmp_path):
    code, _, err = run(capsys, "convert", smollm2_gguf, tmp_path)
    assert code == 1 and "--force" in err


def test_lineage_of_a_converted_model(capsys, smollm2_dense):
    code, out, _ = run(capsys, "lineage", smollm2_dense, "--json")
    chain = json.loads(out)
    assert code == 0 and chain[0]["operation"] == "convert"


def test_runs_db_option_moves_the_registry(capsys, tiny_models, tmp_path):
    db = tmp_path / "mine.db"
    code, _, err = run(capsys, "--runs-db", db, "generate", tiny_models("llama"), "hi", "-n", "2", "-b", "torch")
    assert code == 0, err
    code, out, _ = run(capsys, "--runs-db", db, "runs", "--json")
    assert db.exists() and len(json.loads(out)) == 1


def test_the_cli_starts_without_importing_torch():
    """Every command pays the CLI's import time: torch (over a second) is imported only by the
    commands that run a model, not to build the help or parse arguments."""
    import subprocess
    import sys

    code = "import sys, slimlm.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
