"""The shrink search end to end on a tiny random llama: the result, proxy pruning, the winner's
score reproduced by an independent evaluation, resume after a kill, the no-candidate case and the
bad inputs of the issue. Every model here is built by the real verbs and scored by llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

PRESET = """
limit: 6
candidates:
  - {kind: quantize, method: rtn, format: gguf:Q8_0}
  - {kind: quantize, method: rtn, format: gguf:Q8_0, label: rtn Q8_0 again}
  - {kind: quantize, method: rtn, format: gguf:Q4_0}
  - {kind: quantize, method: rtn, format: gguf:Q5_0}
  - {kind: quantize, method: rtn, format: gguf:Q5_0, label: rtn Q5_0 baseline, baseline: true}
  - {kind: finetune, format: gguf:Q8_0, train_steps: 2}
"""
QUESTIONS = [("What is two plus two?", ["four", "five", "six"], 0),
             ("Which one is a colour?", ["table", "blue", "seven"], 1),
             ("Which animal barks?", ["cat", "fish", "dog"], 2),
             ("What does a function return?", ["a value", "a loop", "a file"], 0),
             ("Which keyword defines a class?", ["def", "class", "with"], 1),
             ("Which is a number?", ["three", "green", "house"], 0)]


@pytest.fixture(scope="module")
def job(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("shrink")
    task = root / "quiz.jsonl"
    task.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    preset = root / "preset.yaml"
    preset.write_text(PRESET)
    return {"model": tiny_models("llama"), "task": f"multiple_choice:{task}", "preset": preset, "root": root}


def _args(job, out, *extra):
    return ["shrink", job["model"], "--task", job["task"], "--preset", job["preset"], "--out", out,
            "--quality-floor", "0.5", *extra]


@pytest.fixture(scope="module")
def finished(job):
    """One full search, shared by the tests that read its result."""
    capture = pytest.CaptureFixture  # noqa: F841 - run in a subprocess instead: isolation of the module fixture
    out = job["root"] / "out"
    proc = subprocess.run([sys.executable, "-m", "slimlm", *map(str, _args(job, out))], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "SLIMLM_PROGRESS": "1"})
    return out, proc


def test_search_writes_the_winner_report_and_every_candidate(finished):
    out, proc = finished
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "shrink.json").read_text())
    cands = {c["name"]: c for c in result["candidates"]}
    assert set(cands) == {"rtn Q8_0", "rtn Q8_0 again", "rtn Q4_0", "rtn Q5_0", "rtn Q5_0 baseline",
                          "finetune lora2 Q8_0"}
    # a baseline is evaluated in full even where the proxies would prune it (it equals rtn Q5_0)
    assert cands["rtn Q5_0 baseline"]["scores"] and cands["rtn Q5_0 baseline"]["status"] != "pruned"
    # without --data the fine-tune candidate does not apply: skipped, saying what would make it run
    assert cands["finetune lora2 Q8_0"]["status"] == "skipped" and "--data" in cands["finetune lora2 Q8_0"]["reasons"][0]
    # the second Q8_0 is the same file by another name: the proxies prune it, it is never evaluated
    assert cands["rtn Q8_0 again"]["status"] == "pruned" and not cands["rtn Q8_0 again"].get("scores")
    assert result["fully_evaluated"] < result["built"] == 5 and result["proposed"] == 6
    # sizes and fidelity are measured, not estimated: Q4_0 < Q5_0 < Q8_0 on disk
    assert cands["rtn Q4_0"]["size_bytes"] < cands["rtn Q5_0"]["size_bytes"] < cands["rtn Q8_0"]["size_bytes"]
    for c in result["candidates"]:
        if c["status"] != "skipped":
            assert c["fidelity"]["kl_mean"] >= 0 and Path(c["artifact"]).exists()
    # --prefer size: the chosen one is the smallest of those that qualify
    qualifying = [c for c in result["candidates"] if c["status"] in ("chosen", "qualifies")]
    chosen = next(c for c in result["candidates"] if c["status"] == "chosen")
    assert chosen["size_bytes"] == min(c["size_bytes"] for c in qualifying)
    assert (out / "model.gguf").read_bytes() == Path(chosen["artifact"]).read_bytes()
    page = (out / "report.html").read_text()
    assert f"slimlm serve {out / 'model.gguf'}" in page and "data:image/png;base64," in page
    assert f"serve it: slimlm serve {out / 'model.gguf'}" in proc.stdout
    assert not list(out.parent.glob(f".{out.name}*")), "the work folder is moved into the result"


def test_the_winner_scores_in_llama_cpp_as_shrink_says(finished, job):
    from slimlm.eval import evaluate

    out, _ = finished
    result = json.loads((out / "shrink.json").read_text())
    chosen = next(c for c in result["candidates"] if c["status"] == "chosen")
    again = evaluate(str(out / "model.gguf"), job["task"], backend="llamacpp", limit=6, systems=False, record=False)
    assert again.score == pytest.approx(chosen["scores"][job["task"]]["score"])


def test_no_candidate_meets_the_floor_still_writes_the_report(finished, job, capfd):
    out, _ = finished
    code, stdout, stderr = run_cli(capfd, *_args(job, out, "--force", "--min-score", "2"))
    assert code == 2
    line = next(x for x in stderr.splitlines() if x.startswith("no candidate meets the floor"))
    assert "closest:" in line and "misses --min-score 2" in line
    assert "built before, reused" in stderr and "building rtn" not in stderr  # nothing rebuilt
    result = json.loads((out / "shrink.json").read_text())
    assert result["chosen"] is None and result["closest"] and (out / "report.html").exists()
    assert not (out / "model.gguf").exists()


def test_a_killed_search_resumes_without_rebuilding(job, capfd):
    """Killed (SIGKILL) while a candidate is being evaluated in its child process: nothing at OUT,
    the child ends with its parent, and a rerun reuses every finished candidate."""
    import psutil

    out = job["root"] / "killed"
    work = out.parent / f".{out.name}.shrink-work"
    proc = subprocess.Popen([sys.executable, "-m", "slimlm", *map(str, _args(job, out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SLIMLM_PROGRESS": "1"})
    deadline = time.time() + 300
    for line in proc.stderr:  # progress lines, one per step
        if "evaluating rtn" in line or time.time() > deadline:
            break
    time.sleep(1.0)  # the evaluation's child process is up
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert children, "an evaluation runs in a child process"
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"children left running after the search was killed: {alive}"
    finished_before = {p.parent.name for p in work.glob("candidates/*/build.json")}
    assert len(finished_before) >= 3, "the parent and the candidates were built before the kill"
    assert not out.exists(), "nothing half-written at the output path"
    code, stdout, stderr = run_cli(capfd, *_args(job, out))
    assert code == 0, stderr
    assert stderr.count("built before, reused") >= len(finished_before) - 1  # the parent says it differently
    assert "building rtn" not in stderr
    assert (out / "model.gguf").exists() and not work.exists()


@pytest.mark.parametrize("extra, expected", [
    (["--task", "multiple_choice:missing.jsonl"], "missing.jsonl: no such file"),
    (["--max-size", "0.0001"], "below the smallest file this preset can build"),
    (["--quality-floor", "2"], "--quality-floor 2"),
    (["--prefer", "cheap"], "--prefer cheap"),
])
def test_bad_input_is_one_line_and_writes_nothing(job, capfd, extra, expected):
    out = job["root"] / "bad"
    args = _args(job, out) + extra
    if extra[0] == "--task":  # replace the task, not add one
        args = ["shrink", job["model"], *extra, "--preset", job["preset"], "--out", out]
    code, _, stderr = run_cli(capfd, *args)
    assert code == 1 and expected in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_an_existing_output_needs_force(job, capfd, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    code, _, stderr = run_cli(capfd, *_args(job, out))
    assert code == 1 and "already exists" in stderr and "--force" in stderr


def test_with_data_a_lora_fine_tune_is_a_candidate_judged_on_the_task_not_on_kl(job, capfd):
    """A fine-tune moves away from the parent on purpose: it is evaluated even where its KL is the
    largest, and its merged Hugging Face folder ships beside the GGUF if it wins."""
    data = job["root"] / "train.txt"
    data.write_text("\n\n".join(f"Question: {q} Answer: {c[a]}." for q, c, a in QUESTIONS) * 4)
    preset = job["root"] / "ft.yaml"
    preset.write_text("limit: 6\ncandidates:\n  - {kind: quantize, method: rtn, format: gguf:Q8_0}\n"
                      "  - {kind: finetune, format: gguf:Q8_0, train_steps: 5}\n")
    out = job["root"] / "ft"
    code, stdout, stderr = run_cli(capfd, "shrink", job["model"], "--task", job["task"], "--preset", preset,
                                   "--out", out, "--quality-floor", "0.01", "--data", data, "--prefer", "quality")
    assert code == 0, stderr
    result = json.loads((out / "shrink.json").read_text())
    ft = next(c for c in result["candidates"] if c["spec"]["kind"] == "finetune")
    rtn = next(c for c in result["candidates"] if c["spec"]["kind"] == "quantize")
    assert ft["status"] in ("chosen", "qualifies") and ft["scores"], ft["reasons"]
    # the same size as plain Q8_0 (to 1%) and further from the parent: KL says nothing of its task score
    assert abs(ft["size_bytes"] - rtn["size_bytes"]) < 0.01 * rtn["size_bytes"]
    assert ft["fidelity"]["kl_mean"] > rtn["fidelity"]["kl_mean"]
    assert (Path(ft["hf_folder"]) / "config.json").exists()
    if result["chosen"] == ft["id"]:
        assert (out / "model-hf" / "config.json").exists()


MOE_PRESET = """
limit: 6
candidates:
  - {kind: quantize, method: rtn, format: gguf:Q8_0}
  - {kind: quantize, method: gptq, format: gguf:Q4_K_M}
  - {kind: quantize, method: rtn, target_bpw: 6.0}
  - {kind: quantize, method: llamacpp, format: gguf:Q4_K_M, baseline: true}
"""


def test_shrink_of_an_moe_builds_and_measures_its_candidates(job, tiny_models, tmp_path, capfd):
    """A Mixtral parent: its GGUF candidates are built with every expert quantized (GPTQ's from the
    tokens routed to each) and measured like a dense model's, the per-tensor mix too (one type per
    stacked expert tensor, within its budget)."""
    from gguf import GGUFReader

    preset = tmp_path / "moe.yaml"
    preset.write_text(MOE_PRESET)
    out = tmp_path / "out"
    code, _, err = run_cli(capfd, "shrink", tiny_models("mixtral"), "--task", job["task"], "--preset", preset,
                           "--out", out, "--quality-floor", "0.5")
    assert code == 0, err
    cands = {c["name"]: c for c in json.loads((out / "shrink.json").read_text())["candidates"]}
    mixed = next(c for name, c in cands.items() if "6" in name and "bpw" in name)
    assert mixed["status"] != "failed" and mixed["fidelity"]["kl_mean"] >= 0, mixed["reasons"]
    stacks = [t for t in GGUFReader(mixed["artifact"]).tensors if t.name.endswith("_exps.weight")]
    assert stacks and all(t.tensor_type.name != "F32" for t in stacks)
    gptq = cands["gptq Q4_K_M"]
    assert gptq["status"] != "failed" and gptq["fidelity"]["kl_mean"] >= 0
    types = {t.name: t.tensor_type.name for t in GGUFReader(gptq["artifact"]).tensors}
    assert types["blk.0.ffn_down_exps.weight"] in ("Q4_K", "Q6_K", "Q5_0", "Q8_0")  # quantized, not f16
