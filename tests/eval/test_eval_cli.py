"""The measuring verbs as a user meets them: `slimlm eval`, `bench`, `compare` and `report`.

Everything runs through the real entry point (cli.main, error handling included) on the tiny
random models from conftest, with small limits. Output is captured at the file-descriptor
level (capfd), so anything a library writes straight to stdout would break the `--json` tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slimlm.eval.tasks import TASK_KINDS
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "examples" / "tasks"
PPL = "perplexity:python-docs"


def run(capfd, *args):
    return run_cli(capfd, *args)


def run_json(capfd, *args):
    """Run a command that ends in --json; stdout must be exactly one JSON object and nothing else."""
    code, out, err = run(capfd, *args, "--json")
    assert code == 0, err
    assert out.strip().count("\n") == 0, f"stdout has more than the JSON object:\n{out}"
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def assert_one_line_error(code, out, err, *fragments):
    """A user error: non-zero exit, one `error: ...` line on stderr naming the problem, no traceback."""
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert out == ""


@pytest.fixture
def model(tiny_models):
    return tiny_models("llama")


def _task_file(folder: Path, kind: str, lines: list[str], **extra) -> Path:
    """A task YAML and its JSONL (one line each of `lines`, written as is) in `folder`."""
    (folder / "data.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    spec = {"kind": kind, "data": "data.jsonl", **extra}
    path = folder / "task.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in spec.items()), encoding="utf-8")
    return path


CHOICE_LINES = [
    '{"question": "What is the capital of France?", "choices": ["Lyon", "Paris"], "answer": 1}',
    '{"question": "What is the capital of Japan?", "choices": ["Tokyo", "Osaka"], "answer": 0}',
    '{"question": "What is the capital of Italy?", "choices": ["Milan", "Rome"], "answer": 1}',
]


# --- eval: JSON output per task kind ---------------------------------------------------------

def test_eval_perplexity_json_is_one_object(capfd, model):
    data = run_json(capfd, "eval", model, "--task", PPL, "--limit", 2, "--context", 64, "--no-systems")
    assert data["kind"] == "perplexity" and data["task"] == PPL
    assert data["primary"] == "perplexity" and data["higher_is_better"] is False
    assert data["metrics"]["perplexity"] > 1
    assert isinstance(data["params"]["run_id"], int)
    assert data["params"]["skipped_lines"] == 0


def test_eval_two_tasks_give_a_list_of_results(capfd, model):
    data = run_json(capfd, "eval", model, "--task", PPL, "--task", TASKS / "capitals.yaml",
                    "--limit", 2, "--context", 64, "--no-systems")
    assert set(data) == {"results"}
    assert [r["kind"] for r in data["results"]] == ["perplexity", "multiple_choice"]
    ids = [r["params"]["run_id"] for r in data["results"]]
    assert len(set(ids)) == 2  # each task is its own run


def test_eval_multiple_choice(capfd, model):
    data = run_json(capfd, "eval", model, "--task", TASKS / "capitals.yaml", "--limit", 4, "--no-systems")
    assert data["kind"] == "multiple_choice" and data["examples"] == 4
    assert 0 <= data["metrics"]["acc"] <= 1


def test_eval_classification(capfd, model):
    data = run_json(capfd, "eval", model, "--task", TASKS / "sentiment.yaml", "--limit", 4, "--no-systems")
    assert data["kind"] == "classification" and data["examples"] == 4
    assert 0 <= data["metrics"]["acc"] <= 1
    assert 0 <= data["metrics"]["macro_f1"] <= 1


def test_eval_generation(capfd, model):
    data = run_json(capfd, "eval", model, "--task", TASKS / "arithmetic.yaml", "--limit", 2, "--no-systems")
    assert data["kind"] == "generation" and data["examples"] == 2
    assert 0 <= data["metrics"]["exact_match"] <= 1


def test_eval_details_writes_one_row_per_example(capfd, model, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    details = folder / "details.jsonl"
    data = run_json(capfd, "eval", model, "--task", TASKS / "capitals.yaml", "--limit", 4, "--no-systems",
                    "--details", details)
    rows = [json.loads(line) for line in details.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == data["examples"] == 4
    assert all(row["task"] == str(TASKS / "capitals.yaml") for row in rows)
    assert [p.name for p in folder.iterdir()] == ["details.jsonl"]  # no temporary file left behind


def test_eval_table_names_the_metric_and_the_run(capfd, model):
    code, out, err = run(capfd, "eval", model, "--task", TASKS / "capitals.yaml", "--limit", 2, "--no-systems")
    assert code == 0, err
    assert "acc" in out and "recorded as run" in out


def test_help_lists_every_task_kind(capfd):
    code, out, _ = run(capfd, "eval", "--help")
    assert code == 0
    text = " ".join(out.split())  # help is wrapped to the terminal width
    missing = [kind for kind in TASK_KINDS if kind not in text]
    assert not missing, f"`slimlm eval --help` does not mention {missing}"
# (every verb in cli.VERBS being a registered command is checked in tests/test_cli.py)


# --- bad input: one line on stderr, exit code != 0 --------------------------------------------

def test_unknown_task(capfd, model):
    assert_one_line_error(*run(capfd, "eval", model, "--task", "nonsense"), "unknown task 'nonsense'")


def test_malformed_jsonl_line_names_the_line_and_can_be_skipped(capfd, model, tmp_path):
    task = _task_file(tmp_path, "multiple_choice", [CHOICE_LINES[0], '{"question": "broken', *CHOICE_LINES[1:]])
    assert_one_line_error(*run(capfd, "eval", model, "--task", task, "--no-systems"),
                          "data.jsonl:2", "--skip-bad-lines")
    data = run_json(capfd, "eval", model, "--task", task, "--no-systems", "--skip-bad-lines")
    assert data["params"]["skipped_lines"] == 1 and data["examples"] == 3


def test_missing_field(capfd, model, tmp_path):
    task = _task_file(tmp_path, "multiple_choice", [CHOICE_LINES[0], '{"question": "Q?", "choices": ["a", "b"]}'])
    assert_one_line_error(*run(capfd, "eval", model, "--task", task, "--no-systems"),
                          "data.jsonl:2", "missing field 'answer'")


@pytest.mark.parametrize("args, fragment", [
    (["--task", "examples/tasks/capitals.yaml", "--reference", "MODEL"], "--reference"),
    (["--task", PPL, "--limit", "0"], "--limit"),
    (["--task", PPL, "--batch-size", "0"], "--batch-size"),
])
def test_bad_eval_options(capfd, model, args, fragment):
    args = [str(ROOT / a) if a.startswith("examples/") else str(model) if a == "MODEL" else a for a in args]
    assert_one_line_error(*run(capfd, "eval", model, *args, "--no-systems"), fragment)


def test_context_longer_than_the_model(capfd, model):
    longest = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    assert_one_line_error(*run(capfd, "eval", model, "--task", PPL, "--limit", 1, "--context", longest + 1,
                               "--no-systems"), f"--context {longest + 1}", str(longest))


def test_chat_on_a_model_without_a_chat_template(capfd, model, tmp_path):
    plain = shutil.copytree(model, tmp_path / "no-template")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config_path = plain / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    assert_one_line_error(*run(capfd, "eval", plain, "--task", TASKS / "capitals.yaml", "--limit", 1, "--chat",
                               "--no-systems"), "chat template")


def test_compare_unknown_run(capfd):
    assert_one_line_error(*run(capfd, "compare", 999999), "no run with id 999999")


@pytest.mark.parametrize("args, fragment", [
    (["--repeat", "0"], "--repeat"),
    (["--prompt-lengths", "abc"], "--prompt-lengths"),
])
def test_bad_bench_options(capfd, model, args, fragment):
    assert_one_line_error(*run(capfd, "bench", model, *args), fragment)


# --- compare, report and bench end to end ----------------------------------------------------

def test_compare_and_report_two_families(capfd, tiny_models, tmp_path):
    first = run_json(capfd, "eval", tiny_models("llama"), "--task", PPL, "--limit", 1, "--context", 32)
    second = run_json(capfd, "eval", tiny_models("qwen2"), "--task", PPL, "--limit", 1, "--context", 32,
                      "--no-systems")
    systems = first["systems"]
    assert systems["decode_tps"]["median"] > 0 and systems["peak_rss_bytes"] > 0
    assert isinstance(systems["energy_source"], str) and systems["energy_source"]
    assert isinstance(systems["api_cost_per_1m"], dict) and systems["api_cost_per_1m"]
    assert second["systems"] == {}
    ids = [first["params"]["run_id"], second["params"]["run_id"]]

    comparison = run_json(capfd, "compare", *ids)
    assert [c["id"] for c in comparison["columns"]] == ids
    assert comparison["baseline"] == ids[0]

    code, out, err = run(capfd, "compare", *ids)
    assert code == 0, err
    assert f"#{ids[0]}" in out and f"#{ids[1]}" in out

    report_dir = tmp_path / "report"
    code, out, err = run(capfd, "report", *ids, "--out", report_dir)
    assert code == 0, err
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64" in page
    assert "http://" not in page and "https://" not in page  # opens offline
    pngs = ["quality_vs_size.png", "quality_vs_speed.png", "cost_local_vs_api.png"]
    assert sorted(p.name for p in report_dir.glob("*.png")) == sorted(pngs)
    assert all((report_dir / name).read_bytes().startswith(b"\x89PNG") for name in pngs)


def test_bench_json(capfd, model):
    data = run_json(capfd, "bench", model, "--prompt-lengths", "16,32", "--gen-tokens", 4, "--repeat", 2)
    assert set(data["decode_tps"]) == {"median", "min", "max"}
    assert data["decode_tps"]["min"] <= data["decode_tps"]["median"] <= data["decode_tps"]["max"]
    assert set(data["prefill_tps"]) == {"16", "32"}
    assert isinstance(data["run_id"], int)
