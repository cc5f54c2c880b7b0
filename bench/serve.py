#!/usr/bin/env python3
"""Serving: slimlm's HTTP API against raw llama.cpp and llama-cpp-python's own server, in one run.

On the built-in SmolLM2-135M-Instruct GGUF, one machine, one run:

1. single-stream decode tokens/s, streaming, greedy, --tokens new tokens, median over the
   prompts and --repeat rounds, for three paths measured in turn (interleaved, so a busy
   moment of the machine hurts all three alike), and the median of the paired ratios of slimlm
   to each other path over back-to-back runs of one prompt:
     raw llama_cpp.Llama in this process (the ceiling: no HTTP, no server),
     `slimlm serve` over HTTP with the openai client (its default ledger on, in a temp file),
     `python -m llama_cpp.server` over HTTP with the openai client (the peer), started with
     the settings slimlm uses (context, threads, batch, and logits_all off, which it defaults
     to on: that would slow it, and a slow peer is no target);
   decode rate = (content chunks - 1) / (last chunk - first chunk), as a client sees it;
2. routing overhead: LearnedRouter.decide() p50/p99 over 500 prompts after warm-up, for both
   featurizations (MiniLM's token vectors averaged, the default; hashed n-grams; MiniLM in
   context; a router trained here on a small synthetic prompt set), CascadePolicy.should_escalate() the same way,
   and the cascade end to end: time to first token and total time of a streamed answer through
   `slimlm serve --policy cascade` (threshold -1000: always stays local) against --policy local;
3. load: 1, 4 and 16 concurrent clients for --duration seconds each against `slimlm serve`
   (chat, --load-tokens new tokens): completion tokens/s, requests/s, latency p50/p99, and the
   failed requests, which must be zero.

    python bench/serve.py [--duration 60] [--tokens 128] [--repeat 5] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from results import append_section  # noqa: E402  (bench/results.py, beside this script)

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.hardware import cpu_info, default_threads
from slimlm.models.backends import open_backend
from slimlm.models.backends.llamacpp import llama_kwargs
from slimlm.models.reference import resolve

MODEL = "smollm2-135m-instruct"
N_CTX = 4096
PROMPTS = ["Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
           "Explain step by step how a hash table works, with an example in Python.",
           "Describe a walk through a busy market in a city you love, in detail."]
SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}  # sent to both servers; slimlm ignores them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env: dict | None = None, timeout: float = 180) -> subprocess.Popen:
    """Start a server and wait until GET `url` answers 200.

    Its stderr goes to a temporary file, not a pipe: a pipe nobody reads fills up (64 KiB) and
    blocks a server that logs each request, llama-server's slot timings among them, which then
    stops answering every stream while using no CPU."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[:4]} exited: {log.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start within {timeout}s")


def slimlm_server(port: int, tmp: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from slimlm.cli import main; main()", "serve", MODEL,
           "--port", str(port), "--n-ctx", str(N_CTX), "--ledger", str(tmp / f"ledger-{port}.db"), *extra]
    return start(cmd, f"http://127.0.0.1:{port}/health", {"SLIMLM_LOG": "warning"})


def peer_server(port: int, path: Path) -> subprocess.Popen:
    t = str(default_threads())
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", MODEL, "--port", str(port),
           "--n_ctx", str(N_CTX), "--n_threads", t, "--n_threads_batch", t, "--n_batch", "512", "--n_ubatch", "512",
           "--logits_all", "False", "--verbose", "False"]
    return start(cmd, f"http://127.0.0.1:{port}/v1/models")


def stream_http(port: int, prompt: str, tokens: int) -> tuple[float, int, float]:
    """(time to first content, content chunks, decode tok/s) of one streamed chat answer."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    start_t, times = time.perf_counter(), []
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=tokens, temperature=0, stream=True, extra_body=SAMPLING):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
    return _rates(start_t, times)


def _rates(start_t: float, times: list[float]) -> tuple[float, int, float]:
    if len(times) < 2:
        return float("nan"), len(times), float("nan")
    return times[0] - start_t, len(times), (len(times) - 1) / (times[-1] - times[0])


def raw_runner(path: Path):
    """Raw llama_cpp.Llama, slimlm's settings; the chat prompt rendered by slimlm's template so
    all three paths see the same tokens."""
    from llama_cpp import Llama

    fmt = open_backend(str(path), "llamacpp", n_ctx=256)
    llm = Llama(model_path=str(path), **llama_kwargs(N_CTX))

    def run(prompt: str, tokens: int) -> tuple[float, int, float]:
        ids = fmt.tokenize(fmt.render_chat([{"role": "user", "content": prompt}]))
        start_t, times = time.perf_counter(), []
        for chunk in llm.create_completion(prompt=ids, max_tokens=tokens, temperature=0.0, stream=True, **SAMPLING):
            if chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
        return _rates(start_t, times)

    return run, (fmt, llm)


def single_stream(paths: dict, tokens: int, repeat: int) -> dict:
    """Each prompt of each round runs on every path back to back; besides each path's median rate,
    every path gets the paired ratios of the first path (slimlm) to it, one per back-to-back
    trio: on 2 shared cores single-stream rates drift by several percent between minutes, and a
    ratio of two runs a second apart cancels most of that drift."""
    rows = {name: {"tps": [], "ttft": [], "n": []} for name in paths}
    for run in paths.values():
        run(PROMPTS[0], 8)  # warm-up
    first = next(iter(paths))
    pairs = {name: [] for name in paths if name != first}
    for r in range(repeat):
        for i, prompt in enumerate(PROMPTS):
            names = list(paths)
            k = (r * len(PROMPTS) + i) % len(names)
            trio = {}
            for name in names[k:] + names[:k]:  # rotate who goes first
                ttft, n, tps = paths[name](prompt, tokens)
                rows[name]["tps"].append(tps)
                rows[name]["ttft"].append(ttft)
                rows[name]["n"].append(n)
                trio[name] = tps
            for name in pairs:
                pairs[name].append(trio[first] / trio[name])
        print(f"  round {r + 1}/{repeat}: " + ", ".join(f"{n} {statistics.median(v['tps']):.1f} tok/s"
                                                       for n, v in rows.items()), flush=True)
    out = {name: {"tps": statistics.median(v["tps"]), "ttft_ms": 1000 * statistics.median(v["ttft"]),
                  "tokens": statistics.median(v["n"])} for name, v in rows.items()}
    for name, ratios in pairs.items():
        q1, median, q3 = np.percentile(ratios, [25, 50, 75])
        out[name].update(paired=float(median), paired_q1=float(q1), paired_q3=float(q3), pairs=len(ratios))
    return out


def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50) * 1000), float(np.percentile(samples, 99) * 1000)


def router_overhead(n: int = 500) -> dict:
    from slimlm.routing import CascadePolicy, LearnedRouter

    rng = random.Random(0)
    greet = ["Hello {n}, how are you today?", "Hi there {n}! Nice to meet you.", "Good evening {n}, lovely to see you."]
    sums = ["What is {a} times {b}?", "Compute {a} + {b}.", "Multiply {a} by {b} and explain each step."]
    names = ["Maria", "Tom", "Aiko", "Lars", "Fatima", "Diego", "Priya", "Olga"]

    def prompt(i: int) -> str:
        text = (rng.choice(greet).format(n=rng.choice(names)) if i % 2 else
                rng.choice(sums).format(a=rng.randint(2, 999), b=rng.randint(2, 99)))
        return text + " Please be thorough and careful in your answer." * rng.randint(0, 4)

    prompts = [prompt(i) for i in range(n + 20)]
    timed = {}
    for features in ("minilm-static", "hashing", "minilm"):
        router = LearnedRouter(features=features).fit([prompt(i) for i in range(80)], [i % 2 for i in range(80)])
        for p in prompts[:20]:  # warm-up
            router.decide(p)
        timed[features] = []
        for p in prompts[20:]:
            t = time.perf_counter()
            router.decide(p)
            timed[features].append(time.perf_counter() - t)
    cascade, policy = [], CascadePolicy(-1.0, "mean", 16)
    lps = [[-rng.expovariate(2.0) for _ in range(16)] for _ in range(n)]
    for row in lps:
        t = time.perf_counter()
        policy.should_escalate(row)
        cascade.append(time.perf_counter() - t)
    return {"learned": percentiles_ms(timed["minilm-static"]), "hashing": percentiles_ms(timed["hashing"]),
            "minilm": percentiles_ms(timed["minilm"]),
            "cascade": percentiles_ms(cascade)}


def cascade_end_to_end(local_port: int, cascade_port: int, tokens: int, repeat: int) -> dict:
    out = {}
    for name, port in (("local", local_port), ("cascade", cascade_port)):
        stream_http(port, PROMPTS[0], 8)
        runs = [stream_http(port, p, tokens) for _ in range(repeat) for p in PROMPTS]
        out[name] = {"ttft_ms": 1000 * statistics.median(r[0] for r in runs),
                     "total_s": statistics.median(r[0] + (r[1] - 1) / r[2] for r in runs)}
    return out


def load(port: int, clients: int, duration: float, tokens: int) -> dict:
    """`clients` threads asking one after another until `duration` is over; in-flight requests finish."""
    from openai import OpenAI

    latencies, completion, failures, lock = [], [0], [0], threading.Lock()
    stop_at = time.perf_counter() + duration

    def worker(seed: int):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        i = seed
        while time.perf_counter() < stop_at:
            prompt = PROMPTS[i % len(PROMPTS)] + f" (request {i})"
            i += clients
            t = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=tokens, temperature=0)
                with lock:
                    latencies.append(time.perf_counter() - t)
                    completion[0] += reply.usage.completion_tokens
            except Exception as exc:  # noqa: BLE001 - counted: the target is zero
                with lock:
                    failures[0] += 1
                print(f"    failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    p50, p99 = percentiles_ms(latencies) if latencies else (float("nan"), float("nan"))
    return {"clients": clients, "requests": len(latencies), "failed": failures[0], "tok_s": completion[0] / elapsed,
            "req_s": len(latencies) / elapsed, "p50_ms": p50, "p99_ms": p99}


def router_table(overhead: dict) -> list[str]:
    return ["| routing decision | p50 ms | p99 ms |", "|---|---:|---:|",
            "| learned router, MiniLM token vectors averaged (the default): decide() | {:.2f} | {:.2f} |".format(
                *overhead["learned"]),
            "| learned router, `--features hashing` (word and char n-grams): decide() | {:.2f} | {:.2f} |".format(
                *overhead["hashing"]),
            "| learned router, `--features minilm`: decide() (MiniLM encode + logistic regression) | {:.2f} | "
            "{:.2f} |".format(*overhead["minilm"]),
            "| cascade: should_escalate() on 16 token log-probs | {:.3f} | {:.3f} |".format(*overhead["cascade"])]


def router_verdict(overhead: dict) -> str:
    return (f"- learned router p99 {overhead['learned'][1]:.2f} ms with MiniLM token vectors (target < 5 ms), "
            f"{overhead['minilm'][1]:.1f} ms with MiniLM embeddings")


def router_only(args, load_before: float) -> int:
    """The routing-decision timings alone: the router changes more often than the servers."""
    overhead = router_overhead()
    body = router_table(overhead) + [
        "", router_verdict(overhead),
        f"- 1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"]
    print("\n".join(body), flush=True)
    if not args.no_write:
        description = ("Routing decisions only: 500 synthetic prompts (greetings and arithmetic, 0-4 extra sentences) "
                       "after 20 warm-up ones, a router trained on 80. Command: `python bench/serve.py --router-only`.")
        print(f"appended to {append_section('serve, routing overhead', description, body)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60, help="seconds per concurrency level")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per single-stream answer")
    ap.add_argument("--load-tokens", type=int, default=64, help="new tokens per answer under load")
    ap.add_argument("--repeat", type=int, default=5, help="rounds over the prompts (median reported)")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels")
    ap.add_argument("--router-only", action="store_true", help="only the routing-decision timings (no servers)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()

    path = resolve(MODEL).path
    cpu = cpu_info()
    load_before = os.getloadavg()[0]
    if args.router_only:
        return router_only(args, load_before)
    print(f"{MODEL} ({path.name}) on {cpu.describe()}; {default_threads()} llama.cpp threads; load average "
          f"{load_before:.1f}", flush=True)
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ports = {"slimlm": free_port(), "peer": free_port(), "cascade": free_port()}
            procs.append(slimlm_server(ports["slimlm"], Path(tmp)))
            procs.append(peer_server(ports["peer"], path))
            raw, keep = raw_runner(path)
            print("single stream ...", flush=True)
            single = single_stream({"slimlm serve (HTTP)": lambda p, n: stream_http(ports["slimlm"], p, n),
                                    "raw llama.cpp (in-process)": raw,
                                    "llama_cpp.server (HTTP, peer)": lambda p, n: stream_http(ports["peer"], p, n)},
                                   args.tokens, args.repeat)
            keep[1].close()
            keep[0].close()
            procs.pop().terminate()  # the peer is done: free its cores for the rest
            print("routing overhead ...", flush=True)
            overhead = router_overhead()
            print(f"  learned decide() p50/p99 {overhead['learned'][0]:.1f}/{overhead['learned'][1]:.1f} ms", flush=True)
            procs.append(slimlm_server(ports["cascade"], Path(tmp), "--large", "http://127.0.0.1:9/v1", "--policy",
                                       "cascade", "--cascade-threshold", "-1000"))
            cascade = cascade_end_to_end(ports["slimlm"], ports["cascade"], args.tokens, 1)
            print(f"  cascade end to end: {cascade}", flush=True)
            procs.pop().terminate()
            loads = []
            for clients in [int(c) for c in args.clients.split(",")]:
                print(f"load: {clients} clients for {args.duration:.0f}s ...", flush=True)
                loads.append(load(ports["slimlm"], clients, args.duration, args.load_tokens))
                print(f"  {loads[-1]}", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)

    raw_tps = single["raw llama.cpp (in-process)"]["tps"]
    ours, peer = single["slimlm serve (HTTP)"]["tps"], single["llama_cpp.server (HTTP, peer)"]["tps"]
    body = ["| path | decode tok/s | time to first token (ms) | tokens | slimlm vs this: ratio of medians | "
            "paired ratio, median (interquartile range) |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in single.items():
        vs = "" if name.startswith("slimlm") else f"{ours / r['tps']:.2f}x"
        paired = (f"{r['paired']:.3f}x ({r['paired_q1']:.3f}-{r['paired_q3']:.3f}, {r['pairs']} pairs)"
                  if "paired" in r else "")
        body.append(f"| {name} | {r['tps']:.1f} | {r['ttft_ms']:.0f} | {r['tokens']:.0f} | {vs} | {paired} |")
    body += [""] + router_table(overhead) + [
             "", "| streamed answer | time to first token (ms) | total s |", "|---|---:|---:|"]
    for name, r in cascade.items():
        body.append(f"| slimlm serve --policy {name} | {r['ttft_ms']:.0f} | {r['total_s']:.2f} |")
    body += ["", "| clients | requests | failed | completion tok/s | requests/s | latency p50 ms | latency p99 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in loads:
        body.append(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['tok_s']:.1f} | {r['req_s']:.2f} | "
                    f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    failed = sum(r["failed"] for r in loads)
    load_after = os.getloadavg()[0]
    paired_raw = single["raw llama.cpp (in-process)"]["paired"]
    paired_peer = single["llama_cpp.server (HTTP, peer)"]["paired"]
    body += ["", f"- slimlm streaming decode {ours:.1f} tok/s = {ours / raw_tps:.2f}x raw llama.cpp by medians, "
             f"{paired_raw:.3f}x paired (target >= 0.9x), and {ours / peer:.2f}x / {paired_peer:.3f}x paired of "
             "llama_cpp.server (target >= 1.0x)",
             router_verdict(overhead),
             f"- failed requests under load: {failed} (target 0)",
             f"- 1-minute load average {load_before:.1f} at the start, {load_after:.1f} at the end, on "
             f"{cpu.physical_cores} cores: anything above the core count means other work shared them"]
    print("\n" + "\n".join(body), flush=True)
    if args.no_write:
        return 0
    description = (f"SmolLM2-135M-Instruct ({path.name}), n_ctx {N_CTX}, {default_threads()} llama.cpp threads for "
                   f"all three paths; single stream: {args.tokens} new tokens, greedy, {len(PROMPTS)} prompts x "
                   f"{args.repeat} rounds interleaved, median, and paired ratios of back-to-back runs; decode rate "
                   f"measured by the client over content "
                   f"chunks. Peer: `python -m llama_cpp.server` (llama-cpp-python) with slimlm's context, threads, "
                   f"batch and logits_all False. Load: chat, {args.load_tokens} new tokens, {args.duration:.0f} s "
                   f"per level. Command: `python bench/serve.py --duration {args.duration:.0f}`.")
    print(f"appended to {append_section('serve', description, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
