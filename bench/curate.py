#!/usr/bin/env python3
"""Curation, measured: filter accuracy on a labelled mix, throughput against datatrove run
directly, and the seeds' claim (the best 10% of a corpus trains as well as all of it).

accuracy: bench/curate_mix.py's labelled corpus (good python-docs paragraphs and calibration-mix
    prose; generated boilerplate, spam, word salad, exact and near duplicates, non-English text,
    documents with eval items inside) through the shipped presets. Per step: precision (share of
    what it removed that was bad) and recall (share of its target label that reached it and was
    removed); for the dedup steps a removal is wrong only when it loses a good document
    (no copy of it survives).
    Targets: near_dedup recall >= 0.95 at precision >= 0.95, decontamination recall 1.0, and of the
    documents kept >= 90% good.
throughput: documents/s of near dedup alone and of the heuristic rules + near dedup, through
    `slimlm curate` and through the same datatrove blocks run directly with datatrove's
    LocalPipelineExecutor (the peer: what slimlm builds on; target >= 0.9x), and slimlm's with the
    Ray executor on a local 2-CPU Ray.
claim: LoRA fine-tunes of SmolLM2 on equal token budgets from the top 10% by `quality` score,
    a random 10%, and the whole corpus; held-out perplexity on clean text and the pydoc
    multiple-choice score (bench/curate_claim.py says how, and what its simulated grader means).

    python bench/curate.py --part accuracy,throughput [--n-good 1000] [--no-write]
    python bench/curate.py --part claim [--claim-n-good 300] [--mc-limit 200]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from curate_mix import LABELS, labelled_corpus  # noqa: E402
from results import append_section  # noqa: E402

from slimlm.curate import RunOptions, curate, load_recipe  # noqa: E402

TARGETS = {"language": {"non_english"}, "gopher_repetition": {"boilerplate", "spam", "salad"},
           "gopher_quality": {"boilerplate", "spam", "salad"}, "c4_quality": {"boilerplate", "spam", "salad"},
           "fineweb_quality": {"boilerplate", "spam", "salad"}, "exact_dedup": {"exact_dup", "near_dup"},
           "near_dedup": {"exact_dup", "near_dup"}, "decontaminate": {"contaminated"},
           "line_dedup": {"boilerplate", "exact_dup", "near_dup"}, "perplexity": {"boilerplate", "spam", "salad"}}
DEDUP = ("exact_dedup", "near_dedup", "line_dedup")


def _write_corpus(rows: list[dict], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mix.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return path


def _ids(folder: Path) -> list[int]:
    """Line numbers (1-based, as curate's ids end) of the documents in a folder of shards."""
    out = []
    for shard in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(shard, "rt") as f:
            out += [int(json.loads(line)["id"].rpartition(":")[2]) for line in f]
    return out


def accuracy(rows: list[dict], preset: str, work: Path) -> tuple[list[str], dict]:
    src = _write_corpus(rows, work / "in")
    out = work / f"out-{Path(preset).stem}"
    shutil.rmtree(out, ignore_errors=True)
    result = curate(load_recipe(preset), [src], out, RunOptions(tasks=4), force=True, say=lambda _: None)
    label = {i + 1: r["label"] for i, r in enumerate(rows)}
    group = {i + 1: r["group"] for i, r in enumerate(rows)}
    alive = set(label)
    lines = [f"| {Path(preset).stem} | step | removed | precision | recall (of its target reaching it) | target |",
             "|---|---|---:|---:|---:|---|"]
    summary = {}
    for step in result.funnel:
        removed = set(_ids(out / "removed" / step["label"])) if (out / "removed" / step["label"]).exists() else set()
        survivors = alive - removed
        target = TARGETS.get(step["step"], set())
        if step["step"] in DEDUP:
            members = Counter(group[i] for i in alive if group[i] is not None)
            kept_groups = {group[i] for i in survivors if group[i] is not None}
            copies = sum(1 for i in removed if group[i] is not None and group[i] in kept_groups)
            should = sum(n - 1 for n in members.values() if n > 1)
            # a removal is wrong only when it loses a good document: one with no copy left (a
            # generated bad document that is a near twin of another is rightly removed too)
            lost = sum(1 for i in removed if label[i] in ("good", "exact_dup", "near_dup")
                       and group[i] not in kept_groups)
            precision = 1 - lost / len(removed) if removed else float("nan")
            recall = copies / should if should else float("nan")
        else:
            # a copy of a good document is good text too: a quality rule that removes it erred
            bad = {i for i in removed if label[i] not in ("good", "exact_dup", "near_dup")}
            reach = {i for i in alive if label[i] in target}
            precision = len(bad) / len(removed) if removed else float("nan")
            recall = len(removed & reach) / len(reach) if reach else float("nan")
        summary[step["step"]] = {"removed": len(removed), "precision": precision, "recall": recall}
        lines.append(f"| | {step['step']} | {len(removed)} | {precision:.3f} | {recall:.3f} | "
                     f"{', '.join(sorted(target)) or '–'} |")
        alive = survivors
    kept_groups = Counter(group[i] for i in alive if group[i] is not None)
    good_kept = sum(1 for i in alive if label[i] == "good" or (label[i] in ("exact_dup", "near_dup")
                                                               and kept_groups[group[i]] == 1))
    left = Counter(label[i] for i in alive)
    summary["kept"] = {"documents": len(alive), "good_share": good_kept / len(alive) if alive else 0.0,
                       "good_kept": sum(1 for i in alive if label[i] == "good") / sum(1 for r in rows if r["label"] == "good")}
    lines.append(f"| | **kept** | {len(alive)} | good share {summary['kept']['good_share']:.3f} | good documents kept "
                 f"{summary['kept']['good_kept']:.3f} | left: {', '.join(f'{k} {left[k]}' for k in LABELS if left[k])} |")
    return lines, summary


# --- throughput: slimlm vs datatrove's own executor on the same blocks -------------------------

RULES = ["gopher_repetition", "gopher_quality", {"c4_quality": {"filter_no_terminal_punct": False}}, "fineweb_quality"]


def _datatrove_direct(src: Path, work: Path, steps: list, tasks: int) -> float:
    """The same datatrove blocks, wired by hand as a datatrove user would (JSONL in, JSONL out,
    MinHash's four stages), run with LocalPipelineExecutor; wall seconds."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    shutil.rmtree(work, ignore_errors=True)
    shards = work / "shards"
    shards.mkdir(parents=True)
    lines = src.read_text().splitlines()
    for k in range(tasks):  # the same sharding slimlm's reading does: round robin
        (shards / f"{k:05d}.jsonl").write_text("\n".join(lines[k::tasks]) + "\n")
    start = time.perf_counter()
    filters = {"gopher_repetition": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(),
               "c4_quality": C4QualityFilter(filter_no_terminal_punct=False), "fineweb_quality": FineWebQualityFilter()}
    names = [s if isinstance(s, str) else next(iter(s)) for s in steps]
    blocks = [filters[n] for n in names if n in filters]
    source = shards
    if blocks:
        LocalPipelineExecutor([JsonlReader(str(shards)), *blocks, JsonlWriter(str(work / "filtered"))],
                              tasks=tasks, workers=2, logging_dir=str(work / "logs-filter")).run()
        source = work / "filtered"
    if "near_dedup" in names:
        config = MinhashConfig()
        LocalPipelineExecutor([JsonlReader(str(source)), MinhashDedupSignature(str(work / "sigs"), config=config)],
                              tasks=tasks, workers=2, logging_dir=str(work / "logs-sigs")).run()
        LocalPipelineExecutor([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)],
                              tasks=config.num_buckets, workers=2, logging_dir=str(work / "logs-buckets")).run()
        LocalPipelineExecutor([MinhashDedupCluster(str(work / "buckets"), str(work / "clusters"), config=config)],
                              tasks=1, logging_dir=str(work / "logs-clusters")).run()
        LocalPipelineExecutor([JsonlReader(str(source)), MinhashDedupFilter(str(work / "clusters")),
                               JsonlWriter(str(work / "out"))], tasks=tasks, workers=2,
                              logging_dir=str(work / "logs-out")).run()
    return time.perf_counter() - start


def _slimlm(src: Path, work: Path, steps: list, tasks: int, executor: str = "local") -> float:
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    curate({"tokenizer": "words", "steps": steps}, [src], work, RunOptions(tasks=tasks, workers=2, executor=executor),
           force=True, say=lambda _: None)
    return time.perf_counter() - start


def throughput(rows: list[dict], work: Path, repeat: int, ray: bool) -> list[str]:
    from contextlib import redirect_stderr
    from io import StringIO

    src = _write_corpus(rows, work / "in")
    lines = ["| pipeline | documents | slimlm docs/s | datatrove direct docs/s | slimlm / datatrove |"
             + (" slimlm on Ray (2 CPUs) docs/s |" if ray else ""), "|---|---:|---:|---:|---:|" + ("---:|" if ray else "")]
    for name, steps in (("near_dedup", ["near_dedup"]), ("Gopher + C4 + FineWeb rules, near_dedup",
                                                          RULES + ["near_dedup"])):
        ours, peer = [], []
        for _ in range(repeat):  # interleaved, so a busy moment hits both alike; best of `repeat`
            with redirect_stderr(StringIO()):
                peer.append(_datatrove_direct(src, work / "direct", steps, 4))
            ours.append(_slimlm(src, work / "slimlm", steps, 4))
        row = f"| {name} | {len(rows)} | {len(rows) / min(ours):.0f} | {len(rows) / min(peer):.0f} | " \
              f"{min(peer) / min(ours):.2f}x |"
        if ray:
            import ray as ray_api

            ray_api.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            on_ray = _slimlm(src, work / "ray", steps, 4, executor="ray")
            ray_api.shutdown()
            row += f" {len(rows) / on_ray:.0f} |"
        print(row, flush=True)
        lines.append(row)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="accuracy,throughput")
    ap.add_argument("--n-good", type=int, default=1000)
    ap.add_argument("--presets", default="web,docs")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--work", default="build/bench-curate")
    ap.add_argument("--claim-n-good", type=int, default=300, help="claim: good documents in its (smaller) mix")
    ap.add_argument("--mc-limit", type=int, default=200, help="claim: multiple-choice questions scored")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work, parts = Path(args.work), args.part.split(",")
    rows = labelled_corpus(args.n_good)
    counts = Counter(r["label"] for r in rows)
    command = " ".join(["python bench/curate.py", *sys.argv[1:]])
    if "accuracy" in parts:
        mix = ", ".join(f"{k} {counts[k]}" for k in LABELS)
        body = [f"Labelled mix: {len(rows)} documents ({mix}); bench/curate_mix.py.", ""]
        results = {}
        for preset in args.presets.split(","):
            lines, results[preset] = accuracy(rows, preset, work / "accuracy")
            print("\n".join(lines), flush=True)
            body += lines + [""]
        if not args.no_write:
            append_section("curate, filter accuracy", f"`{command}`. Each shipped preset on the labelled mix; precision "
                           "= share of a step's removals that were bad (a copy of a good document counts as good; dedup: "
                           "another copy survived), recall = share of the step's target label that reached the step "
                           "and was removed; kept: the good share counts a copy as good when no other copy was kept.",
                           body)
    if "throughput" in parts:
        lines = throughput(rows, work / "throughput", args.repeat, not args.no_ray)
        if not args.no_write:
            append_section("curate, throughput", f"`{command}`. The labelled mix ({len(rows)} documents), 4 shards, "
                           "2 worker processes; wall time from the JSONL input to written output, best of "
                           f"{args.repeat} interleaved runs; datatrove direct: the same blocks wired by hand with "
                           "LocalPipelineExecutor. slimlm's time includes reading and checking the input, counting "
                           "words, the tallies and the report.", lines)
    if "claim" in parts:
        from curate_claim import claim
        from curate_mix import good_documents

        mix = labelled_corpus(args.claim_n_good)
        used = {r["text"] for r in mix}
        held_out = [d for d in good_documents(3 * args.claim_n_good) if d not in used][:150]
        lines = claim(mix, held_out, work / "claim", mc_limit=args.mc_limit)
        print("\n".join(lines), flush=True)
        if not args.no_write:
            append_section("curate, the seeds' claim", f"`{command}`. LoRA (rank 16) fine-tunes of SmolLM2-135M-Instruct, "
                           f"merged, on slices of a {len(mix)}-document labelled mix (bench/curate_mix.py), after exact "
                           "and near dedup and decontamination; top 10% by the `quality` step, a random 10% of the same "
                           "size trained for the same tokens, and all of it for one pass. The grader is simulated from "
                           "the mix's labels on a 300-document sample (good writing and copies of it 4, junk 0): no "
                           "offline model here grades usefully, so this measures the regressor and the selection, not a "
                           "teacher. Held-out ppl: "
                           f"{len(held_out)} good documents from the same sources, not in the mix (context 512); MC: "
                           f"the first {args.mc_limit} questions of multiple_choice:pydoc (fp32).", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
