#!/usr/bin/env python3
"""Evaluation throughput: slimlm's perplexity against a plain transformers loop and, when it is
installed beside slimlm, lm-evaluation-harness, on the same text in one run.

The text is the built-in corpus `python-docs` (Python's reference documentation), the model the
built-in SmolLM2-135M-Instruct. All paths score the same tokens:
  plain transformers loop (peer)  the loop of Hugging Face's perplexity guide over slimlm's windows
                                   (model(input_ids, labels=...) per window, fp32, batch 1)
  slimlm torch                     slimlm.eval's scorer (LM head only on scored positions), asked
                                   for fp32 so both compute the same numbers; its kernels are
                                   the backend's choice for this CPU (e.g. packed oneDNN weights)
  slimlm llamacpp                  the same windows through llama.cpp on the GGUF file
  lm-evaluation-harness (peer)     `lm_eval` with a local JSONL task (loglikelihood_rolling), if
                                   build/lmeval-venv exists (it is not a dependency of slimlm)
Prints tokens/s and the ratio to the plain loop, checks the perplexities agree, and appends a
dated table to bench/RESULTS.md.

    python bench/eval.py [--limit 20] [--context 2048] [--stride N] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import append_section  # noqa: E402  (bench/results.py, beside this script)

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.data import python_docs
from slimlm.eval.loglik import make_scorer
from slimlm.eval.perplexity import run_perplexity, sliding_windows
from slimlm.hardware import default_threads
from slimlm.models.backends import open_backend
from slimlm.models.loading import dense_folder
from slimlm.models.reference import resolve

ROOT = Path(__file__).resolve().parents[1]
LMEVAL_PY = ROOT / "build" / "lmeval-venv" / "bin" / "python"
MODEL = "smollm2-135m-instruct"


def plain_transformers(folder: Path, docs: list[str], context: int, stride: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(default_threads())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    windows = [w for d in docs for w in sliding_windows(tok(d, add_special_tokens=False)["input_ids"], prefix,
                                                        context, stride)]
    nll, count = 0.0, 0
    with torch.no_grad():  # one untimed window, as slimlm's path gets, so neither pays first-call costs
        model(input_ids=torch.tensor([windows[0].ids[:64]]))
    start = time.perf_counter()
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w.ids])
            labels = ids.clone()
            labels[0, :w.start] = -100
            n = len(w.ids) - w.start
            nll += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    seconds = time.perf_counter() - start
    return {"ppl": math.exp(nll / count), "tokens": count, "seconds": seconds}


def slimlm_path(model: str, backend: str, docs: list[str], context: int, stride: int) -> dict:
    # fp32 on torch: the default on a CPU with native bf16 would be bf16, and other numbers.
    kwargs = {"logits_all": True, "n_ctx": context} if backend == "llamacpp" else {"dtype": "float32"}
    engine = open_backend(model, backend, **kwargs)
    kernels = engine.describe()  # torch: the precision plan; llama.cpp: the file type and build
    scorer = make_scorer(engine)
    run_perplexity(scorer, [docs[0][:300]], source="warm-up", context=context, stride=stride)  # untimed
    start = time.perf_counter()
    result = run_perplexity(scorer, docs, source="python-docs", context=context, stride=stride)
    seconds = time.perf_counter() - start
    engine.close()
    return {"ppl": result.metrics["perplexity"], "tokens": result.metrics["tokens"], "seconds": seconds,
            "bpb": result.metrics["bits_per_byte"], "kernels": kernels}


LMEVAL_TASK = """task: slimlm_python_docs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
"""


def lm_eval_path(folder: Path, docs: list[str], context: int) -> dict | None:
    if not LMEVAL_PY.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "python_docs.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        (Path(tmp) / "task.yaml").write_text(LMEVAL_TASK.format(data=data))
        cmd = [str(LMEVAL_PY), "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={folder},dtype=float32,max_length={context}", "--tasks", "slimlm_python_docs",
               "--include_path", tmp, "--batch_size", "1", "--device", "cpu", "--output_path", str(Path(tmp) / "out")]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_CACHE=str(Path(tmp) / "ds"), OMP_NUM_THREADS=str(default_threads()))
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print("lm-evaluation-harness failed:", proc.stderr.strip().splitlines()[-1:], file=sys.stderr)
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200], "seconds": seconds}
        found = re.search(r"bits_per_byte\S*\s*\|\s*[↓↑]?\s*\|?\s*([0-9.]+)", proc.stdout)
        return {"bpb": float(found.group(1)) if found else None, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=20, help="documents of python-docs (of 79)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=None, help="default: --context (no overlap)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-lm-eval", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    stride = args.stride or args.context
    docs = python_docs()[:args.limit]
    ref = resolve(MODEL)
    folder = dense_folder(ref)

    rows = []
    plain = plain_transformers(folder, docs, args.context, stride)
    rows.append(("plain transformers loop (peer)", plain))
    rows.append(("slimlm torch", slimlm_path(str(folder), "torch", docs, args.context, stride)))
    if not args.no_llamacpp:
        rows.append(("slimlm llamacpp (GGUF Q4_1)", slimlm_path(str(ref.path), "llamacpp", docs, args.context, stride)))
    lm = None if args.no_lm_eval else lm_eval_path(folder, docs, args.context)
    if lm:
        lm["tokens"] = plain["tokens"]
        rows.append(("lm-evaluation-harness (peer, wall incl. load)", lm))

    table = ["| path | tokens/s | seconds | perplexity | bits/byte | throughput vs plain loop |",
             "|---|---:|---:|---:|---:|---:|"]
    base = plain["tokens"] / plain["seconds"]
    for name, r in rows:
        tps = r["tokens"] / r["seconds"]
        ppl = f"{r['ppl']:.4f}" if r.get("ppl") else "–"
        bpb = f"{r['bpb']:.4f}" if r.get("bpb") else ("failed: " + r["error"] if r.get("error") else "–")
        ratio = "peer" if r is plain else f"{tps / base:.2f}x"
        table.append(f"| {name} | {tps:.0f} | {r['seconds']:.1f} | {ppl} | {bpb} | {ratio} |")
    print("\n".join(table))
    torch_row = rows[1][1]
    agree = abs(torch_row["ppl"] / plain["ppl"] - 1)
    print(f"slimlm torch vs plain loop perplexity: relative difference {agree:.2e}")
    if args.no_write:
        return 0
    description = (f"Perplexity of SmolLM2-135M-Instruct on python-docs (first {args.limit} of 79 documents, "
                   f"{plain['tokens']} tokens), context {args.context}, stride {stride}; torch paths fp32 on the dense "
                   f"conversion (slimlm torch: {torch_row['kernels']}); perplexity agreement slimlm torch vs plain "
                   f"loop {agree:.1e}. "
                   f"Command: `python bench/eval.py --limit {args.limit} --context {args.context}"
                   f"{'' if stride == args.context else f' --stride {stride}'}`.")
    print(f"appended to {append_section('eval', description, table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
