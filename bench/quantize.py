#!/usr/bin/env python3
"""Quantization: slimlm's methods against llama.cpp's own quantizer, on the same reference, in one run.

Reference: the built-in SmolLM2-135M-Instruct as a dense fp32 folder (slimlm's conversion of
its GGUF). Every file is scored the same way: on llama.cpp, against the fp32 reference on torch,
over held-out python-docs text (the last 3 topics, which GPTQ's calibration never sees):
perplexity, bits per byte, mean KL divergence and top-1 agreement; plus file size, bits per
weight (file bits / all parameters), llama.cpp decode tokens/s and quantization wall time.

llama.cpp's rows come from its quantizer called through llama-cpp-python, without an importance
matrix (the bindings do not expose `imatrix`). Note that llama.cpp's Q4_0 also quantizes the
token embedding (to Q8_0 here) while slimlm keeps it in f16, so sizes differ at the same type.

    python bench/quantize.py [--methods rtn,gptq,llamacpp] [--formats Q4_0,Q8_0] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from results import append_section  # noqa: E402  (bench/results.py, beside this script)

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.compress.quantize import quantize
from slimlm.eval.loglik import make_scorer
from slimlm.eval.perplexity import run_perplexity
from slimlm.eval.sources import python_docs
from slimlm.models.backends import GenerationParams, open_backend
from slimlm.models.loading import dense_folder
from slimlm.models.reference import resolve

MODEL = "smollm2-135m-instruct"
CONTEXT = 512


def score(path: Path, reference_scorer, docs: list[str]) -> dict:
    engine = open_backend(str(path), "llamacpp", logits_all=True, n_ctx=CONTEXT)
    result = run_perplexity(make_scorer(engine), docs, source="held-out", context=CONTEXT,
                            reference=reference_scorer, reference_name=MODEL)
    engine.close()
    engine = open_backend(str(path), "llamacpp", n_ctx=CONTEXT)
    rates = []
    for prompt in ("The Python language reference", "A small language model is"):
        rates.append(engine.generate(prompt, GenerationParams(max_tokens=64), raw=True).timings.decode_tps)
    engine.close()
    return {**result.metrics, "decode_tps": sorted(rates)[len(rates) // 2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rtn,gptq,llamacpp")
    ap.add_argument("--formats", default="Q4_0,Q8_0")
    ap.add_argument("--extra-llamacpp", default="Q4_K_M", help="more llama.cpp-only types (comma-separated)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    folder = dense_folder(resolve(MODEL))
    docs = python_docs()[-3:]
    reference = open_backend(str(folder), "torch", dtype="float32")
    ref_scorer = make_scorer(reference)
    jobs = [(m, f) for f in args.formats.split(",") for m in args.methods.split(",")]
    jobs += [("llamacpp", f) for f in args.extra_llamacpp.split(",") if f]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, fmt in jobs:
            out = Path(tmp) / f"{method}-{fmt}.gguf"
            start = time.perf_counter()
            result = quantize(str(folder), out, method=method, format=f"gguf:{fmt}", check=False, record=False)
            seconds = time.perf_counter() - start
            metrics = score(out, ref_scorer, docs)
            rows.append((method, fmt, result, seconds, metrics))
            print(f"{method} {fmt}: KL {metrics['kl_mean']:.4f}, ppl {metrics['perplexity']:.3f}", flush=True)
    ref_ppl = rows[0][4]["reference_perplexity"]
    table = ["| method | type | file MiB | bits/weight | perplexity | bits/byte | KL mean | top-1 agreement "
             "| decode tok/s | quantize s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, fmt, result, seconds, m in rows:
        name = "llama.cpp quantize (peer)" if method == "llamacpp" else f"slimlm {method}"
        table.append(f"| {name} | {fmt} | {result.size_after / 2**20:.1f} | {result.bits_per_weight:.2f} | "
                     f"{m['perplexity']:.3f} | {m['bits_per_byte']:.4f} | {m['kl_mean']:.4f} | "
                     f"{m['top1_agreement']:.1%} | {m['decode_tps']:.0f} | {seconds:.1f} |")
    kl = {(method, fmt): m["kl_mean"] for method, fmt, _, _, m in rows}
    lines = []
    for fmt in args.formats.split(","):
        peer = kl.get(("llamacpp", fmt))
        ours = {k: v for k, v in kl.items() if k[1] == fmt and k[0] != "llamacpp"}
        if peer and ours:
            best = min(ours, key=ours.get)
            lines.append(f"{fmt}: best slimlm method {best[0]} has KL {ours[best]:.4f} = "
                         f"{ours[best] / peer:.2f}x llama.cpp's {peer:.4f} (no importance matrix)")
    print("\n".join(table + [""] + lines))
    print(f"reference perplexity (fp32, torch) {ref_ppl:.3f}; tokens {rows[0][4]['tokens']}")
    if args.no_write:
        return 0
    description = (f"SmolLM2-135M-Instruct, reference its dense fp32 conversion (perplexity {ref_ppl:.3f}); scored on "
                   f"llama.cpp over the last 3 python-docs topics ({rows[0][4]['tokens']} tokens, context {CONTEXT}), "
                   "KL vs the fp32 reference on torch; GPTQ/AWQ calibrated on 32 x 256 tokens of the other topics; "
                   "llama.cpp without importance matrix. Command: `python bench/quantize.py`.")
    print(f"appended to {append_section('quantize', description, table + [''] + [f'- {x}' for x in lines])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
