#!/usr/bin/env python3
"""`slimlm batch` against the same requests sent to llama-server, same model file, one run.

--requests chat requests (OpenAI batch format, greedy, --tokens new tokens each) are answered
by `slimlm batch` (in-process, continuous batching, --parallel slots) and by a llama-server
with the same slots, threads and batch size, fed by a client that keeps as many requests in
flight as the server has slots. Both are timed as a user running the job sees it, from the
command's start to the last answer: slimlm's process start and model load, llama-server's start
and model load. Reported: wall time, completion tokens/s, and how many answers are the same text
on both sides (both decode greedily with the same llama.cpp, so they should all be).

    python bench/batch_job.py [--requests 1000] [--tokens 16] [--parallel 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from results import append_section
from serve import MODEL, PROMPTS, free_port, start
from serve_load import llama_server_cmd

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.hardware import cpu_info, default_threads
from slimlm.models.reference import resolve


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    path = resolve(MODEL).path
    bodies = [{"model": MODEL, "max_tokens": args.tokens, "temperature": 0,
               "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (ticket {i})"}]}
              for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        src.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                           "body": b}) + "\n" for i, b in enumerate(bodies)))
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from slimlm.cli import main; main()", "batch", MODEL, str(src),
                        "--out", str(out), "--parallel", str(args.parallel), "--n-ctx", "1024"], check=True)
        ours_s = time.perf_counter() - t
        ours = [json.loads(line)["response"]["body"] for line in out.read_text().splitlines()]

        port = free_port()
        t = time.perf_counter()
        proc = start(llama_server_cmd(port, path, args.parallel, 512), f"http://127.0.0.1:{port}/health")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=120,
                              limits=httpx.Limits(max_connections=args.parallel)) as http:
                def ask(body):
                    for _ in range(3):  # a reused keep-alive connection the server closed: ask again
                        try:
                            return http.post("/chat/completions", json=body).json()
                        except httpx.RemoteProtocolError:
                            continue
                        except httpx.TimeoutException:  # a stuck request: counted, not waited for
                            return None
                    return None
                with ThreadPoolExecutor(args.parallel) as pool:
                    theirs = list(pool.map(ask, bodies))
                theirs_s = time.perf_counter() - t
        finally:
            proc.terminate()
            proc.wait(30)

    failed = sum(r is None for r in theirs)

    def tokens(rows):
        return sum(r["usage"]["completion_tokens"] for r in rows if r is not None)

    def text(r):
        return None if r is None else r["choices"][0]["message"]["content"]

    same = sum(text(a) == text(b) for a, b in zip(ours, theirs))
    body = ["| runner | requests | wall s | completion tokens | tokens/s |", "|---|---:|---:|---:|---:|",
            f"| slimlm batch (--parallel {args.parallel}, model load included) | {len(ours)} | {ours_s:.1f} | "
            f"{tokens(ours)} | {tokens(ours) / ours_s:.1f} |",
            f"| llama-server -np {args.parallel}, {args.parallel} requests in flight (server start included) | "
            f"{len(theirs)} | {theirs_s:.1f} | {tokens(theirs)} | {tokens(theirs) / theirs_s:.1f} |", "",
            f"- slimlm batch: {(tokens(ours) / ours_s) / (tokens(theirs) / theirs_s):.2f}x llama-server's tokens/s; "
            f"same answer text for {same}/{len(ours)} requests; llama-server requests that timed out after 120 s: "
            f"{failed}"]
    print("\n".join(body))
    if not args.no_write:
        desc = (f"SmolLM2-135M-Instruct ({path.name}), {args.requests} chat requests, greedy, {args.tokens} new tokens "
                f"each, {args.parallel} slots, {default_threads()} threads, on {cpu_info().describe()}. Command: "
                f"`python bench/batch_job.py {' '.join(sys.argv[1:])}`.")
        print(f"appended to {append_section('batch', desc, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
