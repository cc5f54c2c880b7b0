"""What the user asked of the shrunk model, and the judgement of each candidate against it.

Floors are per task: a candidate keeps `quality_floor` of the parent's score on every task (for a
lower-is-better metric such as perplexity, the parent's score divided by the candidate's), and,
with `min_score`, reaches that absolute score too. Budgets are the candidate's own measurements:
file size, peak memory, decode speed and KL to the parent on held-out text. Among the candidates
that meet all of them, `prefer` picks: the smallest file, the fastest decode, or the best quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.eval.compare import median
from slimlm.shrink.measure import relative

MiB = 1024 * 1024
PREFER = ("size", "speed", "quality")
PROBE_SLACK = 0.9  # a decode probe counts as faster only if it is not 10% slower (timing noise)


@dataclass
class Goals:
    quality_floor: float = 0.95  # fraction of the parent's score kept on each task
    min_score: float | None = None  # absolute floor (ceiling for lower-is-better metrics) on each task
    max_kl: float | None = None  # mean KL to the parent on held-out text
    max_memory_mib: float | None = None  # peak memory of the serving process
    max_size_mib: float | None = None  # file size
    min_tokens_per_s: float | None = None  # decode speed in llama.cpp
    time_budget_s: float | None = None  # wall time of the whole search
    prefer: str = "size"

    def validate(self) -> Goals:
        if not 0.0 < self.quality_floor <= 1.0:
            raise SlimlmError(f"--quality-floor {self.quality_floor}: give the fraction of the parent's score "
                              "to keep, between 0 and 1 (e.g. 0.95), or an absolute floor with --min-score")
        if self.prefer not in PREFER:
            raise SlimlmError(f"--prefer {self.prefer}: choose one of {', '.join(PREFER)}")
        for name in ("max_kl", "max_memory_mib", "max_size_mib", "min_tokens_per_s", "time_budget_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SlimlmError(f"--{name.replace('_mib', '').replace('_s', '').replace('_', '-')} must be "
                                  f"positive (got {value})")
        return self


def quality(candidate: dict, parent: dict) -> float:
    """The mean over tasks of the fraction of the parent's score kept (nan before full evaluation)."""
    scores = candidate.get("scores") or {}
    if not scores:
        return math.nan
    kept = [relative(s["score"], parent["scores"][t]["score"], s["higher_is_better"]) for t, s in scores.items()]
    return sum(kept) / len(kept)


def build_misses(candidate: dict, goals: Goals) -> list[str]:
    """Budgets a built candidate already fails on its final numbers (size, KL) or clearly on its
    decode probe, before any task is run."""
    misses = []
    size = candidate["size_bytes"] / MiB
    if goals.max_size_mib is not None and size > goals.max_size_mib:
        misses.append(f"size {size:.1f} MiB > {goals.max_size_mib:g}")
    kl = candidate.get("fidelity", {}).get("kl_mean")
    if goals.max_kl is not None and kl is not None and kl > goals.max_kl:
        misses.append(f"KL {kl:.4f} > {goals.max_kl:g}")
    probe = candidate.get("probe_tps")
    if goals.min_tokens_per_s is not None and probe and probe < PROBE_SLACK * goals.min_tokens_per_s:
        misses.append(f"decode {probe:.0f} tok/s (probe) < {goals.min_tokens_per_s:g}")
    return misses


def final_misses(candidate: dict, parent: dict, goals: Goals) -> list[str]:
    """Every floor and budget a fully evaluated candidate misses (empty: it qualifies)."""
    misses = build_misses({**candidate, "probe_tps": None}, goals)
    for task, s in candidate["scores"].items():
        p = parent["scores"][task]
        kept = relative(s["score"], p["score"], s["higher_is_better"])
        if kept < goals.quality_floor:
            misses.append(f"{task}: {s['primary']} {s['score']:.4g} keeps {kept:.1%} of the parent's {p['score']:.4g} "
                          f"(< {goals.quality_floor:.0%})")
        if goals.min_score is not None:
            low = s["score"] < goals.min_score if s["higher_is_better"] else s["score"] > goals.min_score
            if low:
                misses.append(f"{task}: {s['primary']} {s['score']:.4g} misses --min-score {goals.min_score:g}")
    systems = candidate.get("systems") or {}
    peak = systems.get("peak_rss_bytes")
    if goals.max_memory_mib is not None and peak and peak / MiB > goals.max_memory_mib:
        misses.append(f"peak memory {peak / MiB:.0f} MiB > {goals.max_memory_mib:g}")
    tps = median(systems.get("decode_tps"))
    if goals.min_tokens_per_s is not None and tps is not None and tps < goals.min_tokens_per_s:
        misses.append(f"decode {tps:.0f} tok/s < {goals.min_tokens_per_s:g}")
    return misses


def decode_tps(candidate: dict) -> float | None:
    return median((candidate.get("systems") or {}).get("decode_tps")) or candidate.get("probe_tps")


def proxy_dominated(built: list[dict]) -> dict[str, str]:
    """{id: id of a candidate that beats it}: another candidate no larger, no further from the parent
    (KL) and not slower on the decode probe, and strictly better on size or KL, cannot lose to it on
    the front, so it is not evaluated in full. Of candidates equal on size and KL (the same file by
    two routes), the first listed is evaluated and the others are not."""
    out = {}
    for i, a in enumerate(built):
        for j, b in enumerate(built):
            if i == j or b["id"] in out:
                continue
            ka, kb = a["fidelity"]["kl_mean"], b["fidelity"]["kl_mean"]
            no_worse = (b["size_bytes"] <= a["size_bytes"] and kb <= ka
                        and (b.get("probe_tps") or 0) >= PROBE_SLACK * (a.get("probe_tps") or 0))
            strictly = b["size_bytes"] < a["size_bytes"] or kb < ka
            same = b["size_bytes"] == a["size_bytes"] and kb == ka  # one file: their probes differ only by noise
            if (no_worse and strictly) or (same and j < i):
                out[a["id"]] = b["id"]
                break
    return out


def objective(candidate: dict, parent: dict, prefer: str) -> tuple:
    """Sort key: smaller is better."""
    q = quality(candidate, parent)
    if prefer == "speed":
        return (-(decode_tps(candidate) or 0.0), candidate["size_bytes"])
    if prefer == "quality":
        return (-q, candidate["size_bytes"])
    return (candidate["size_bytes"], -q)


def proxy_order(candidate: dict, prefer: str) -> tuple:
    """The order of full evaluation: most promising for the objective first, on the proxies."""
    kl = candidate["fidelity"]["kl_mean"]
    if prefer == "speed":
        return (-(candidate.get("probe_tps") or 0.0), kl)
    if prefer == "quality":
        return (kl, candidate["size_bytes"])
    return (candidate["size_bytes"], kl)
