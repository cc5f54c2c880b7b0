#!/usr/bin/env python3
"""Generation speed: slimlm's two backends against their peers, in one run, on one machine.

Four paths on the built-in SmolLM2-135M-Instruct and the same prompts:
  raw llama_cpp.Llama (peer)      vs  slimlm's llama.cpp backend
  plain transformers generate     vs  slimlm's torch backend
        (peer, dense folder, default dtype)

For each: time to first token, decode tokens/s (after the first token) and prefill tokens/s on
a 1081-token prompt; median of --repeat runs. Each slimlm path runs back to back with its peer,
prompt by prompt, and the paired ratios are reported too. Prints the table with the ratios and
appends a dated row per path, with the CPU and its features, to bench/RESULTS.md.

    python bench/generate.py [--tokens 128] [--repeat 3] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from results import append_section  # noqa: E402  (bench/results.py, beside this script)

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.hardware import cpu_info, default_threads, llama_cpp_build
from slimlm.models.backends import GenerationParams, open_backend
from slimlm.models.backends.llamacpp import llama_kwargs
from slimlm.models.loading import dense_folder
from slimlm.models.reference import resolve

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a hash table works, with an example in Python.",
]
LONG_TEXT = ("The Python language reference describes the exact syntax and semantics of the language. "
             "It is terse, but attempts to be exact and complete. ") * 40


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def raw_llama(path, fmt_engine):
    """`fmt_engine` only renders the chat prompt, so both llama.cpp paths see the same tokens."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), **llama_kwargs())

    def run(prompt, max_tokens, raw=False):
        text = prompt if raw else fmt_engine.prompt_text(prompt)
        ids = fmt_engine.tokenize(text)
        start = time.perf_counter()
        ttft, n = None, 0
        for chunk in llm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0, top_k=0,
                                           min_p=0.0, repeat_penalty=1.0, stream=True):
            if chunk["choices"][0].get("finish_reason") and not chunk["choices"][0]["text"]:
                continue
            n += 1
            if ttft is None:
                ttft = time.perf_counter() - start
        return ttft, n, time.perf_counter() - start

    return run


def slimlm_engine(model, backend):
    engine = open_backend(model, backend)

    def run(prompt, max_tokens, raw=False):
        done = engine.generate(prompt, GenerationParams(max_tokens=max_tokens), raw=raw)
        t = done.timings
        return t.ttft_s, t.generated_tokens, t.total_s

    return run, engine


def _keep(store, key, run_and_engine):
    run, store[key] = run_and_engine
    return run


def plain_transformers(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # what a user gets by default
    tok = AutoTokenizer.from_pretrained(folder)

    class Clock(TextStreamer):
        def __init__(self):
            super().__init__(tok)
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(prompt, max_tokens, raw=False):
        if raw:
            ids = tok(prompt, return_tensors="pt").input_ids
        else:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, streamer=clock)
        total = time.perf_counter() - start
        n = out.shape[1] - ids.shape[1]
        token_times = clock.times[1:]  # the first put() is the prompt
        return (token_times[0] - start if token_times else total), n, total

    return run


def _once(run, prompt, tokens, into):
    t_first, n, total = run(prompt, tokens)
    into["ttft"].append(t_first)
    if n < 2:  # no decode step to time (the model ended at once)
        return None
    rate = (n - 1) / (total - t_first)
    into["decode"].append(rate)
    return rate


def measure_pair(peer, ours, tokens, repeat):
    """A peer and slimlm's path on the same prompts, back to back with the order alternating, so
    that drift of a shared machine between minutes (seen here: 15%) hits both alike; the paired
    ratio of each back-to-back couple is reported beside the ratio of the medians."""
    runs = {"peer": peer, "ours": ours}
    got = {k: {"decode": [], "ttft": [], "prefill": []} for k in runs}
    ratios = []
    for run in runs.values():
        run(PROMPTS[0], 4)  # warm-up
    for i in range(repeat):
        for j, prompt in enumerate(PROMPTS):
            order = ["peer", "ours"] if (i + j) % 2 == 0 else ["ours", "peer"]
            rate = {k: _once(runs[k], prompt, tokens, got[k]) for k in order}
            if rate["ours"] and rate["peer"]:
                ratios.append(rate["ours"] / rate["peer"])
        for k in runs:
            got[k]["prefill"].append(runs[k](LONG_TEXT, 1, raw=True)[0])
    out = {k: {"decode_tps": median(v["decode"]), "ttft_ms": 1000 * median(v["ttft"]),
               "prefill_s": median(v["prefill"])} for k, v in got.items()}
    out["paired"] = median(ratios)
    out["paired_range"] = (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--repeat", type=int, default=3, help="runs per path; the median is reported")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()

    ref = resolve(MODEL)
    folder = dense_folder(ref)  # the dense Hugging Face folder `slimlm convert` writes
    cpu = cpu_info()
    build = (llama_cpp_build() or {}).get("variant", "unknown")
    print(f"{MODEL} on {cpu.describe()}; llama.cpp build: {build}; {default_threads()} threads", flush=True)

    llama_run, llama_engine = slimlm_engine(MODEL, "llamacpp")
    engines = {}
    pairs = [
        ("llama.cpp raw (peer)", "slimlm llamacpp", lambda: raw_llama(ref.path, llama_engine), lambda: llama_run),
        ("transformers generate (peer)", "slimlm torch", lambda: plain_transformers(folder),
         lambda: _keep(engines, "torch", slimlm_engine(str(folder), "torch"))),
    ]
    n_long = len(llama_engine.tokenize(LONG_TEXT))
    results, ratios = {}, {}
    for peer_name, ours_name, peer_run, ours_run in pairs:
        print(f"  measuring {peer_name} and {ours_name}, interleaved ...", flush=True)
        got = measure_pair(peer_run(), ours_run(), args.tokens, args.repeat)
        for name, key in ((peer_name, "peer"), (ours_name, "ours")):
            results[name] = got[key]
            results[name]["prefill_tps"] = n_long / got[key]["prefill_s"]
        of_medians = got["ours"]["decode_tps"] / got["peer"]["decode_tps"]
        ratios[ours_name] = (of_medians, got["paired"], got["paired_range"])

    torch_engine = engines["torch"]

    def ratio_text(name):
        if name not in ratios:
            return "peer"
        of_medians, paired, (low, high) = ratios[name]
        return f"{of_medians:.2f}x; paired {paired:.2f}x ({low:.2f}-{high:.2f})"

    header = f"{'path':32} {'decode tok/s':>12} {'TTFT ms':>9} {'prefill tok/s':>14}   decode vs peer"
    print("\n" + header + "\n" + "-" * (len(header) + 20))
    for name, r in results.items():
        print(f"{name:32} {r['decode_tps']:12.1f} {r['ttft_ms']:9.0f} {r['prefill_tps']:14.0f}   {ratio_text(name)}")
    print(f"\ntorch precision: {torch_engine.describe()}; prefill prompt {n_long} tokens")

    if not args.no_write:
        body = ["| path | decode tok/s | time to first token (ms) | prefill tok/s | decode ratio vs peer: of medians; "
                "paired median (range) |", "|---|---:|---:|---:|---:|"]
        for name, r in results.items():
            body.append(f"| {name} | {r['decode_tps']:.1f} | {r['ttft_ms']:.0f} | {r['prefill_tps']:.0f} | "
                        f"{ratio_text(name)} |")
        path = append_section("generate", f"SmolLM2-135M-Instruct, {args.tokens} new tokens x {len(PROMPTS)} prompts, "
                              f"greedy, {args.repeat} rounds, each pair of paths interleaved prompt by prompt; prefill "
                              f"on a {n_long}-token prompt; llama.cpp build "
                              f"`{build}`; torch precision: {torch_engine.describe()}. "
                              "Command: `python bench/generate.py`.", body)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
