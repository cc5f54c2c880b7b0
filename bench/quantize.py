#!/usr/bin/env python3
"""Quantization: slimlm's methods against llama.cpp's own tools, on the same references, in one run.

References: the built-in SmolLM2-135M-Instruct and Gemma 3 270M, each as a dense fp32 folder
(slimlm's conversion of its GGUF). The peer is llama.cpp's own command-line tools, built for this
CPU from the llama.cpp that llama-cpp-python vendors (bench/llama_tools.py): `llama-quantize`
without and with an importance matrix from `llama-imatrix` on the calibration text, and
`llama-perplexity` as the yardstick.

Every file is scored twice on the held-out text (the last 3 python-docs topics, which calibration
never sees), and, by `llama-perplexity --kl-divergence` against the f32 GGUF, on each out-of-domain
held-out corpus (`--corpora`: general English prose and ChatML chat turns, data/calibration_mix.py)
as well, one KL column per corpus. Before anything runs, the calibration text (`--calib`) is checked
to share no 13-word run with any evaluation corpus.

1. by slimlm (`slimlm eval`'s perplexity with --reference): the file on llama.cpp against the fp32
   reference on torch, sliding windows of 512 tokens: perplexity, bits per byte, mean KL, top-1
   agreement; plus file size, bits per weight, llama.cpp decode tokens/s and quantize wall time;
2. by `llama-perplexity --kl-divergence` against the f32 GGUF, and by slimlm on the very same
   tokens with llama-perplexity's protocol (chunks of 512, the first token replaced by BOS, the
   second half of each chunk scored) against the same f32 GGUF on llama.cpp: the two must agree
   within 2%.

    python bench/quantize.py [--models smollm2-135m-instruct,gemma3-270m] [--no-write]
    python bench/quantize.py --calib mix --corpora python-docs,prose,chat --jobs rtn:Q4_0,gptq:Q4_0
    python bench/quantize.py --packed     # packed Hugging Face folders: bits 8/4/3/2 and ternary, on torch
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from llama_tools import build as build_llama_tools  # noqa: E402  (bench/, beside this script)
from results import append_section  # noqa: E402

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.compress.calibration import CALIB_SAMPLES, CALIB_SEQ_LEN
from slimlm.compress.gguf_export import export_gguf
from slimlm.compress.quantize import quantize
from slimlm.data import calibration_corpus, held_out_corpora, held_out_docs, ngram_overlap
from slimlm.eval.loglik import Request, make_scorer
from slimlm.eval.perplexity import run_perplexity
from slimlm.models.backends import GenerationParams, open_backend
from slimlm.models.loading import dense_folder
from slimlm.models.reference import resolve

CONTEXT = 512
# llama-perplexity's settings for every call: slimlm's chunking, 2 threads, and flash attention
# off, as llama-cpp-python opens models (flash_attn=False). The tool's default "auto" turns it on
# on a CPU; its f16 attention then moved KL by up to 5.6% on Q8_0 files (0.00302 vs 0.00319),
# while with it off slimlm and the tool agree within 0.5% on every file of both models
# (`--agreement`, bench/RESULTS.md, 2026-12-01).
PPL_ARGS = ("-c", CONTEXT, "-b", CONTEXT, "-t", 2, "-fa", "off")
# slimlm's GPTQ/AWQ and llama-imatrix get the same budget: the calibrated methods' default (128 x 256)
CALIB = dict(calib_samples=CALIB_SAMPLES, calib_seq_len=CALIB_SEQ_LEN)
SLIMLM_JOBS = [("rtn", "Q4_0"), ("gptq", "Q4_0"), ("awq", "Q4_0"), ("rtn", "Q8_0"), ("gptq", "Q8_0")]
PEER_JOBS = [("Q4_0", False), ("Q4_0", True), ("Q4_K_M", False), ("Q4_K_M", True), ("Q8_0", False)]
JOBS = ([f"{m}:{f}" for m, f in SLIMLM_JOBS]
        + [f"llamacpp{'-imat' if imat else ''}:{f}" for f, imat in PEER_JOBS])  # --jobs, in this order
CORPORA = ("python-docs", "prose", "chat")  # --corpora: the held-out corpora scored, one KL column each


def parse_jobs(text: str) -> list[tuple[str, object]]:
    """'rtn:Q4_0,llamacpp-imat:Q4_K_M' -> [("rtn", "Q4_0"), ("llamacpp", ("Q4_K_M", True))]."""
    jobs = []
    for item in text.split(","):
        method, _, fmt = item.strip().partition(":")
        if not fmt:
            raise SystemExit(f"--jobs: '{item}' is not METHOD:TYPE (e.g. gptq:Q4_0, llamacpp-imat:Q4_K_M)")
        jobs.append(("llamacpp", (fmt, method == "llamacpp-imat")) if method.startswith("llamacpp") else (method, fmt))
    return jobs


def eval_corpora(names: list[str], calib_docs: list[str]) -> dict[str, list[str]]:
    """The held-out corpora to score, after checking that the calibration text shares no 13-word
    run with any of them (a shared run would let a method fit the text it is judged on)."""
    corpora = held_out_corpora()
    unknown = [n for n in names if n not in corpora]
    if unknown:
        raise SystemExit(f"--corpora: unknown {', '.join(unknown)}; choose from {', '.join(corpora)}")
    for name in names:
        shared = ngram_overlap(calib_docs, corpora[name])
        if shared:
            why = (" (python-docs' 'compound' topic quotes the held-out 'while' and 'with' statements: use "
                   "--calib mix, or leave python-docs out of --corpora)" if name == "python-docs" else "")
            raise SystemExit(f"the calibration text shares {shared} 13-word runs with held-out {name}{why}: "
                             "calibrate on other text")
    return {name: corpora[name] for name in names}


def run_tool(tools: Path, name: str, *args) -> str:
    done = subprocess.run([str(tools / name), *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed: {done.stderr[-2000:]}")
    return done.stdout + done.stderr


def llama_perplexity(tools: Path, path: Path, text: Path, base_kld: Path, *extra) -> dict:
    """llama.cpp's own perplexity and KL divergence of `path` against the saved f32 logits."""
    log = run_tool(tools, "llama-perplexity", "-m", path, "-f", text, *PPL_ARGS, *extra,
                   "--kl-divergence-base", base_kld, "--kl-divergence")
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", log)
    kld = re.search(r"Mean\s+KLD:\s*([-\d.]+)", log)
    top = re.search(r"Same top p:\s*([\d.]+)", log)
    if not (ppl and kld):
        raise RuntimeError(f"could not read llama-perplexity's output:\n{log[-1500:]}")
    return {"perplexity": float(ppl.group(1)), "kl_mean": float(kld.group(1)),
            "top1_agreement": float(top.group(1)) / 100 if top else float("nan")}


def protocol_ids(path: Path, text: str) -> list[list[int]]:
    """llama-perplexity's chunks: the text tokenized as the model's vocabulary says (BOS first only
    if it asks for one), cut into n_ctx pieces; only where the vocabulary adds BOS is each piece's
    first token replaced by BOS (SmolLM2's does not, Gemma's does)."""
    from llama_cpp import Llama  # the peer's own tokenizer, read directly: this is its protocol, not slimlm's

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode(), add_bos=True)  # llama_tokenize adds BOS only if the vocab wants it
    bos = vocab.token_bos()
    vocab.close()
    adds_bos = bool(ids) and ids[0] == bos
    return [([bos] + ids[i * CONTEXT + 1:(i + 1) * CONTEXT]) if adds_bos else ids[i * CONTEXT:(i + 1) * CONTEXT]
            for i in range(len(ids) // CONTEXT)]


def slimlm_protocol(path: Path, chunks: list[list[int]], reference) -> dict:
    """slimlm's scorers on llama-perplexity's tokens: positions n_ctx/2+1 .. n_ctx-1 of each chunk."""
    import torch

    engine = open_backend(str(path), "llamacpp", logits_all=True, n_ctx=CONTEXT)
    requests = [Request(ids=c, start=CONTEXT // 2 + 1) for c in chunks]
    got = make_scorer(engine).score(requests, want_rows=True)
    engine.close()
    ref = reference.score(requests, want_rows=True)
    nll = np.concatenate([-g.logprobs for g in got])
    kl = torch.cat([(r.rows.exp() * (r.rows - g.rows)).sum(-1) for g, r in zip(got, ref)]).double().numpy()
    agree = np.concatenate([(r.rows.argmax(-1) == g.rows.argmax(-1)).numpy() for g, r in zip(got, ref)])
    return {"perplexity": float(np.exp(nll.mean())), "kl_mean": float(kl.mean()), "top1_agreement": float(agree.mean())}


def slimlm_scores(path: Path, reference, docs: list[str], name: str) -> dict:
    engine = open_backend(str(path), "llamacpp", logits_all=True, n_ctx=CONTEXT)
    result = run_perplexity(make_scorer(engine), docs, source="held-out", context=CONTEXT,
                            reference=reference, reference_name=name)
    engine.close()
    engine = open_backend(str(path), "llamacpp", n_ctx=CONTEXT)
    rates = [engine.generate(p, GenerationParams(max_tokens=64), raw=True).timings.decode_tps
             for p in ("The Python language reference", "A small language model is", "Tuples are")]
    engine.close()
    return {**result.metrics, "decode_tps": sorted(rates)[1]}


def corpus_baselines(tools: Path, f32: Path, corpora: dict[str, list[str]], tmp: Path) -> dict[str, tuple[Path, Path]]:
    """{corpus: (text file, llama-perplexity's saved f32 logits)}. llama-perplexity reads a text file
    without parsing special tokens, so the chat corpus's ChatML markers are scored as plain text."""
    out = {}
    for name, docs in corpora.items():
        text, kld = tmp / f"held-out-{name}.txt", tmp / f"base-{name}.kld"
        text.write_text("\n\n".join(docs))
        run_tool(tools, "llama-perplexity", "-m", f32, "-f", text, *PPL_ARGS, "--kl-divergence-base", kld)
        out[name] = (text, kld)
    return out


def f32_baseline(folder: Path, tools: Path, tmp: Path):
    """What both comparisons with llama-perplexity start from: the held-out text file, the f32 GGUF,
    llama-perplexity's saved base logits (.kld), its chunks of the text, and slimlm's scorer on the
    f32 GGUF. The agreement check compares computations, so slimlm takes llama-perplexity's reference
    too: the f32 GGUF on llama.cpp (on SmolLM2 it gives the same KL as torch's fp32 logits to 4
    decimals; the .kld file's own rounding costs about 1e-6 nats of KL)."""
    held_out = tmp / "held-out.txt"
    held_out.write_text("\n\n".join(held_out_docs()))
    f32 = export_gguf(folder, tmp / "f32.gguf", dtype="f32")
    base_kld = tmp / "base.kld"
    run_tool(tools, "llama-perplexity", "-m", f32, "-f", held_out, *PPL_ARGS, "--kl-divergence-base", base_kld)
    chunks = protocol_ids(f32, held_out.read_text())
    f32_reference = make_scorer(open_backend(str(f32), "llamacpp", logits_all=True, n_ctx=CONTEXT))
    return held_out, f32, base_kld, chunks, f32_reference


def bench_model(model: str, tools: Path, tmp: Path, calib_name: str = "mix",
                corpora: dict[str, list[str]] | None = None,
                jobs: list | None = None) -> tuple[list[str], list[str], float]:
    folder = dense_folder(resolve(model))
    held_out, f32, base_kld, chunks, f32_reference = f32_baseline(folder, tools, tmp)
    corpora = eval_corpora(list(CORPORA), calibration_corpus(calib_name)) if corpora is None else corpora
    bases = corpus_baselines(tools, f32, corpora, tmp)
    jobs = jobs if jobs is not None else SLIMLM_JOBS + [("llamacpp", job) for job in PEER_JOBS]
    imatrix_s = 0.0
    if any(method == "llamacpp" and fmt[1] for method, fmt in jobs):  # only when an imatrix row is asked for
        calib = tmp / "calib.txt"
        calib.write_text("\n\n".join(calibration_corpus(calib_name)))
        start = time.perf_counter()
        run_tool(tools, "llama-imatrix", "-m", f32, "-f", calib, "-o", tmp / "imatrix.gguf", "-c",
                 CALIB["calib_seq_len"], "--chunks", CALIB["calib_samples"], "-t", 2)
        imatrix_s = time.perf_counter() - start
    reference = make_scorer(open_backend(str(folder), "torch", dtype="float32"))
    docs = held_out_docs()

    rows = []
    for method, fmt in jobs:
        if method == "llamacpp":
            fmt, imatrix = fmt
            out = tmp / f"peer-{fmt}{'-imat' if imatrix else ''}.gguf"
            start = time.perf_counter()
            run_tool(tools, "llama-quantize", *(["--imatrix", tmp / "imatrix.gguf"] if imatrix else []), f32, out, fmt, 2)
            seconds = time.perf_counter() - start + (imatrix_s if imatrix else 0.0)
            label = f"llama.cpp (peer){' + imatrix' if imatrix else ''}"
        else:
            out = tmp / f"{method}-{fmt}.gguf"
            start = time.perf_counter()
            quantize(str(folder), out, method=method, format=f"gguf:{fmt}", check=False, record=False,
                     calib=calib_name, **CALIB)
            seconds, label = time.perf_counter() - start, f"slimlm {method}"
        ours = slimlm_scores(out, reference, docs, model)
        peer = llama_perplexity(tools, out, held_out, base_kld)
        same = slimlm_protocol(out, chunks, f32_reference)
        by_corpus = {name: llama_perplexity(tools, out, text, kld)["kl_mean"] for name, (text, kld) in bases.items()}
        rows.append((label, fmt, out.stat().st_size, seconds, ours, peer, same, by_corpus))
        print(f"{model} {label} {fmt}: KL {ours['kl_mean']:.4f}, ppl {ours['perplexity']:.3f}; llama-perplexity "
              f"ppl {peer['perplexity']:.3f} KL {peer['kl_mean']:.4f} vs slimlm same tokens ppl "
              f"{same['perplexity']:.3f} KL {same['kl_mean']:.4f}; KL by corpus "
              + ", ".join(f"{k} {v:.4f}" for k, v in by_corpus.items()), flush=True)
    n_params = sum(int(np.prod(s)) for s in _shapes(folder).values())
    sizes = {name: len(protocol_ids(f32, text.read_text())) for name, (text, _) in bases.items()}
    table = [f"**{model}** (reference perplexity {rows[0][4]['reference_perplexity']:.3f}, {rows[0][4]['tokens']} "
             f"held-out tokens; calibration: {calib_name}; KL by corpus from llama-perplexity, chunks of {CONTEXT}: "
             + ", ".join(f"{k} {n}" for k, n in sizes.items()) + ")", "",
             "| method | type | file MiB | bits/weight | perplexity | bits/byte | KL mean | top-1 | decode tok/s "
             "| quantize s | llama-perplexity ppl / KL | slimlm on its tokens ppl / KL | agreement ppl / KL | "
             + " | ".join(f"KL {k}" for k in bases) + " |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(bases)]
    worst = 0.0
    for label, fmt, size, seconds, m, peer, same, by_corpus in rows:
        d_ppl = abs(same["perplexity"] / peer["perplexity"] - 1)
        d_kl = abs(same["kl_mean"] / peer["kl_mean"] - 1) if peer["kl_mean"] > 0 else 0.0
        worst = max(worst, d_ppl, d_kl)
        table.append(f"| {label} | {fmt} | {size / 2**20:.1f} | {8 * size / n_params:.2f} | {m['perplexity']:.3f} | "
                     f"{m['bits_per_byte']:.4f} | {m['kl_mean']:.4f} | {m['top1_agreement']:.1%} | "
                     f"{m['decode_tps']:.0f} | {seconds:.1f} | {peer['perplexity']:.3f} / {peer['kl_mean']:.4f} | "
                     f"{same['perplexity']:.3f} / {same['kl_mean']:.4f} | {d_ppl:.2%} / {d_kl:.2%} | "
                     + " | ".join(f"{by_corpus[k]:.4f}" for k in bases) + " |")
    kl = {(label, fmt): m["kl_mean"] for label, fmt, _, _, m, _, _, _ in rows}
    lines = []
    ours_q4 = [k for k in kl if k[0].startswith("slimlm") and k[1] == "Q4_0"]
    if ours_q4 and ("llama.cpp (peer)", "Q4_0") in kl and ("llama.cpp (peer) + imatrix", "Q4_0") in kl:
        best = min(ours_q4, key=kl.get)
        plain, imat = kl[("llama.cpp (peer)", "Q4_0")], kl[("llama.cpp (peer) + imatrix", "Q4_0")]
        lines.append(f"Q4_0: best slimlm method ({best[0]}) KL {kl[best]:.4f} = {kl[best] / plain:.2f}x llama.cpp's "
                     f"Q4_0 without importance matrix ({plain:.4f}; target <= 0.7x) and {kl[best] / imat:.2f}x with "
                     f"one ({imat:.4f}; target <= 1.0x)")
    lines.append(f"largest disagreement between slimlm and llama-perplexity on the same tokens: {worst:.2%} "
                 "(target < 2%)")
    return table, lines, worst


PACKED_JOBS = [("rtn", 8), ("rtn", 4), ("gptq", 4), ("rtn", 3), ("gptq", 3), ("rtn", 2), ("gptq", 2), ("ternary", None)]


def bench_packed(model: str, tmp: Path) -> list[str]:
    """Packed Hugging Face folders (--format hf, group 64) on slimlm's torch backend: what each bit
    width and the ternary method cost, scored the same way against the fp32 reference."""
    folder = dense_folder(resolve(model))
    reference = make_scorer(open_backend(str(folder), "torch", dtype="float32"))
    docs = held_out_docs()
    table = [f"**{model}**, packed Hugging Face folders (group size 64, symmetric), run on torch", "",
             "| method | bits | weights MiB | perplexity | bits/byte | KL mean | top-1 | quantize s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for method, bits in PACKED_JOBS:
        out = tmp / f"{method}-{bits}"
        start = time.perf_counter()
        result = quantize(str(folder), out, method=method, format="hf", bits=bits, group_size=64, check=False,
                          record=False, **CALIB)
        seconds = time.perf_counter() - start
        engine = open_backend(str(out), "torch", dtype="float32")
        m = run_perplexity(make_scorer(engine), docs, source="held-out", context=CONTEXT, reference=reference,
                           reference_name=model).metrics
        table.append(f"| slimlm {method} | {bits or 'ternary'} | {result.size_after / 2**20:.1f} | "
                     f"{m['perplexity']:.3f} | {m['bits_per_byte']:.4f} | {m['kl_mean']:.4f} | "
                     f"{m['top1_agreement']:.1%} | {seconds:.1f} |")
        print(table[-1], flush=True)
    return table


AGREEMENT_JOBS = [("rtn", "Q4_0"), ("gptq", "Q4_0"), ("rtn", "Q8_0"), ("llamacpp", "Q4_0"), ("llamacpp", "Q4_K_M")]


def bench_agreement(model: str, tools: Path, tmp: Path) -> list[str]:
    """Only the check that slimlm's perplexity and KL agree with llama-perplexity's on the same
    tokens (both against the f32 GGUF on llama.cpp), over a few files: minutes, not the full table."""
    folder = dense_folder(resolve(model))
    held_out, f32, base_kld, chunks, f32_reference = f32_baseline(folder, tools, tmp)
    rows = [f"**{model}** ({len(chunks)} chunks of {CONTEXT}, {len(chunks) * (CONTEXT - 1 - CONTEXT // 2)} scored "
            "tokens)", "", "| file | llama-perplexity ppl / KL | slimlm ppl / KL | agreement ppl / KL |",
            "|---|---:|---:|---:|"]
    for method, fmt in [("f32", "F32")] + AGREEMENT_JOBS:
        if method == "f32":
            out = f32
        elif method == "llamacpp":
            out = tmp / f"peer-{fmt}.gguf"
            run_tool(tools, "llama-quantize", f32, out, fmt, 2)
        else:
            out = tmp / f"{method}-{fmt}.gguf"
            quantize(str(folder), out, method=method, format=f"gguf:{fmt}", check=False, record=False, **CALIB)
        peer = llama_perplexity(tools, out, held_out, base_kld)
        same = slimlm_protocol(out, chunks, f32_reference)
        d_ppl = abs(same["perplexity"] / peer["perplexity"] - 1)
        d_kl = abs(same["kl_mean"] - peer["kl_mean"])
        label = f"{'llama-quantize' if method == 'llamacpp' else 'slimlm ' + method} {fmt}"
        rows.append(f"| {label} | {peer['perplexity']:.4f} / {peer['kl_mean']:.5f} | {same['perplexity']:.4f} / "
                    f"{same['kl_mean']:.5f} | {d_ppl:.3%} / "
                    + (f"{d_kl / peer['kl_mean']:.2%}" if peer["kl_mean"] > 1e-4 else f"{d_kl:.6f} nats") + " |")
        print(rows[-1], flush=True)
    return rows


def _shapes(folder: Path) -> dict:
    from slimlm.compress.quantize import tensor_shapes

    return tensor_shapes(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--packed", action="store_true", help="only the packed Hugging Face rows (bits 8..2, ternary)")
    ap.add_argument("--agreement", action="store_true", help="only the agreement check with llama-perplexity")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--calib", default="mix",
                    help="calibration text of slimlm's GPTQ/AWQ and llama-imatrix (python-docs, mix, or a file)")
    ap.add_argument("--corpora", default=",".join(CORPORA),
                    help=f"held-out corpora scored, one KL column each (from {', '.join(CORPORA)})")
    ap.add_argument("--jobs", default=",".join(JOBS), help="files to build and score, METHOD:TYPE in order")
    args = ap.parse_args()
    if args.agreement:
        tools, body = build_llama_tools(), []
        for model in args.models.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                body += bench_agreement(model, tools, Path(tmp)) + [""]
        if not args.no_write:
            append_section("quantize, agreement with llama-perplexity", "slimlm's perplexity and mean KL on "
                           "llama-perplexity's own chunks (its BOS rule, the second half of each 512-token chunk "
                           "scored), both against the f32 GGUF on llama.cpp, held-out python-docs text; llama-perplexity "
                           "built with the bindings' CMake flags and run with `-fa off` (llama-cpp-python's default). "
                           "Command: `python bench/quantize.py --agreement`.", body)
        return 0
    if args.packed:
        body = []
        for model in args.models.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                body += bench_packed(model, Path(tmp)) + [""]
        if not args.no_write:
            append_section("quantize, packed Hugging Face folders", "Held-out text: the last 3 python-docs topics, "
                           f"context {CONTEXT}; KL against the fp32 reference, both on torch; GPTQ calibrated on "
                           f"{CALIB['calib_samples']} x {CALIB['calib_seq_len']} tokens. "
                           "Command: `python bench/quantize.py --packed`.", body)
        return 0
    corpora = eval_corpora([c for c in args.corpora.split(",") if c], calibration_corpus(args.calib))
    jobs = parse_jobs(args.jobs)
    tools = build_llama_tools()
    for model in args.models.split(","):  # one section per model, written as soon as it is measured
        with tempfile.TemporaryDirectory() as tmp:
            table, lines, _ = bench_model(model, tools, Path(tmp), args.calib, corpora, jobs)
        print("\n".join(table + [""] + lines), flush=True)
        if not args.no_write:
            body = table + [""] + [f"- {x}" for x in lines]
            command = " ".join(["python bench/quantize.py", *sys.argv[1:]])
            print(f"appended to {append_section('quantize', DESCRIPTION.format(calib=args.calib, command=command), body)}")
    return 0


DESCRIPTION = ("References: dense fp32 conversions of the built-in models. Held-out text: the last 3 python-docs "
               f"topics, context {CONTEXT}; the KL columns by corpus: llama-perplexity against the f32 GGUF on "
               "held-out python-docs and the out-of-domain held-out corpora of data/calibration_mix.py (prose: paper "
               "abstracts; chat: ChatML turns, whose markers llama-perplexity reads as plain text), none sharing a "
               "13-word run with the calibration text. slimlm GPTQ/AWQ and llama-imatrix calibrate on "
               f"{CALIB['calib_samples']} x {CALIB['calib_seq_len']} tokens of {{calib}}. Peer rows: llama.cpp's own "
               "llama-quantize / llama-imatrix / llama-perplexity built "
               "from the llama.cpp vendored by llama-cpp-python 0.3.36 (bench/llama_tools.py); quantize seconds "
               "of imatrix rows include computing the matrix. bits/weight: file bits / all parameters. "
               "Command: `{command}`.")

if __name__ == "__main__":
    sys.exit(main())
