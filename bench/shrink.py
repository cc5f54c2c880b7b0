#!/usr/bin/env python3
"""The main job, timed: `slimlm shrink smollm2-135m-instruct --preset quick` on the built-in pydoc task.

Reports the wall time of the whole search (target: at most 15 minutes on a 2-core CPU from a warm
set-up, i.e. with no candidate cached: the search runs in a fresh output folder), how many
candidates were proposed, built and evaluated in full (the proxies must prune), and the chosen
model's size, decode speed and score against the parent (f16) and against the single llama.cpp
quantization a user would pick by hand, llama-quantize's Q4_K_M, measured in the same search:
shrink's choice must be at least as good on the objective (--prefer size: a smaller file that
still meets the floor), and the row says by how much.

    python bench/shrink.py [--preset quick] [--out build/bench-shrink] [--no-write]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import append_section  # noqa: E402

from slimlm.shrink import shrink  # noqa: E402
from slimlm.shrink.goals import MiB, decode_tps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--out", default="build/bench-shrink")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a cold search: nothing reused
    shutil.rmtree(out.parent / f".{out.name}.shrink-work", ignore_errors=True)
    start = time.perf_counter()
    result = shrink(args.model, None, out, preset=args.preset)
    wall = time.perf_counter() - start

    parent, task = result["parent"], result["tasks"][0]
    by_id = {c["id"]: c for c in result["candidates"]}
    chosen = by_id.get(result["chosen"] or "")
    pick = by_id.get((result.get("hand_pick") or {}).get("id", "")) or next(
        (c for c in result["candidates"] if c["spec"].get("method") == "llamacpp"), None)

    def row(label, c, kept):
        score = c.get("scores", {}).get(task, {}).get("score")
        fid = c.get("fidelity") or {}
        return (f"| {label} | {c['size_bytes'] / MiB:.1f} | {'–' if score is None else f'{score:.3f}'} | {kept} | "
                f"{fid.get('kl_mean', 0):.4f} | {decode_tps(c) or 0:.0f} | {c.get('status', 'reference')} |")

    body = [f"Wall time of the whole search: **{wall / 60:.1f} min** (cold: no candidate cached). Candidates "
            f"proposed {result['proposed']}, built {result['built']}, evaluated in full {result['fully_evaluated']} "
            f"(the rest pruned on proxies or rejected on budgets). Task: {task}, {result['limit'] or 'all'} examples; "
            "scores and decode speed in llama.cpp; KL against the parent (torch fp32) on held-out python-docs.", "",
            "| model | MiB | score | kept | KL | decode tok/s | status |", "|---|---:|---:|---:|---:|---:|---|",
            row("parent (f16)", parent, "100%")]
    for c in sorted(result["candidates"], key=lambda c: c.get("size_bytes") or 0):
        if c.get("size_bytes"):
            kept = f"{c['quality']:.1%}" if c.get("scores") else "–"
            row_text = row(c["name"] + (" (chosen)" if c is chosen else ""), c, kept)
            body.append(row_text)
    if chosen and pick and pick.get("scores"):
        body += ["", f"shrink's choice vs llama.cpp Q4_K_M (the hand pick): {chosen['size_bytes'] / pick['size_bytes']:.2f}x "
                 f"its size, {chosen['quality'] - pick['quality']:+.1%} of the parent's score, "
                 f"{(decode_tps(chosen) or 0) / (decode_tps(pick) or 1):.2f}x its decode speed; "
                 f"Q4_K_M {'meets' if pick['status'] in ('chosen', 'qualifies') else 'misses'} the floor."]
    elif not chosen:
        body += ["", "no candidate met the floor."]
    print("\n".join(body))
    if not args.no_write:
        path = append_section("shrink", f"`python bench/shrink.py --preset {args.preset}`: `slimlm shrink "
                              f"{args.model} --preset {args.preset}` (goal: keep 95% of the parent's score, prefer "
                              "size).", body)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
