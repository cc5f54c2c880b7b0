"""The shrink search, top to bottom, as an engineer would run it by hand.

1. Check everything that can be checked in a second: the goals, the preset, every task's data,
   budgets that no candidate of the preset could meet.
2. The parent: exported to an f16 GGUF and measured like every candidate, so each candidate's
   score is compared with the parent's on the same backend, tasks and examples.
3. Build every candidate (a recorded run of `quantize` / `prune` / `distill`), then its proxies:
   size, KL and top-1 agreement with the parent on held-out text, a short decode timing.
4. Prune on the proxies: a candidate that already misses a budget, or that another candidate
   beats on size, KL and decode speed together, cannot reach the front, so it is not evaluated.
5. Evaluate the rest in full (every task; time to first token, decode speed, peak memory, energy,
   cost), most promising for the objective first, while the time budget lasts.
6. Judge: the qualifying candidates, the best of them for --prefer, the Pareto fronts.

Every step's result is stored (workspace.py) before the next starts, so a rerun skips it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.eval.report import pareto_front
from slimlm.shrink.candidates import CANDIDATE_KINDS, BuildContext, CandidateSpec, SkipCandidate
from slimlm.shrink.goals import (
    Goals,
    MiB,
    build_misses,
    decode_tps,
    final_misses,
    objective,
    proxy_dominated,
    proxy_order,
    quality,
)
from slimlm.shrink.measure import decode_probe, evaluate_in_child, fidelity
from slimlm.shrink.workspace import Workspace

DEFAULT_TASK = "multiple_choice:pydoc"


class Clock:
    """Elapsed time against the budget, and the progress lines the user sees."""

    def __init__(self, budget_s: float | None, say):
        self.start, self.budget, self.say = time.perf_counter(), budget_s, say

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.elapsed

    def step(self, text: str) -> None:
        left = "" if self.budget is None else f", {max(self.left(), 0) / 60:.1f} min of the budget left"
        self.say(f"[shrink {self.elapsed / 60:4.1f} min{left}] {text}")


def parent_fingerprint(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    return {"path": str(folder), "bytes": sum(f.stat().st_size for f in files),
            "mtime": max((int(f.stat().st_mtime) for f in files), default=0)}


def bits_per_weight(fmt: str) -> float:
    """Bits per weight of a GGUF type from the gguf package's block table; a llama.cpp mix (_S/_M/_L)
    counts as its base type, an unknown name as 1.5 (a lower bound, so no budget is refused wrongly)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    name = re.sub(r"_[SML]$", "", (fmt.partition(":")[2] or fmt).upper())
    qtype = getattr(GGMLQuantizationType, name, None)
    if qtype is None:
        return 1.5
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * size / block


def smallest_size_mib(specs: list[CandidateSpec], params: int) -> tuple[float, str]:
    """A lower bound on the smallest file the preset can build, and the candidate that would build it."""
    best = (math.inf, "")
    for spec in specs:
        bpw = spec.target_bpw if spec.target_bpw is not None else bits_per_weight(spec.format or "gguf:Q8_0")
        best = min(best, (params * (1.0 - (spec.ratio or 0.0)) * bpw / 8 / MiB, spec.name()))
    return best


def build_candidate(ws: Workspace, spec: CandidateSpec, ctx: BuildContext, inputs: dict, clock: Clock) -> dict:
    key = spec.key()
    stored = ws.record(key, "build", inputs)
    if stored is not None:
        clock.step(f"{spec.name()}: built before, reused")
        return stored
    clock.step(f"building {spec.name()}")
    start = time.perf_counter()
    try:
        built = CANDIDATE_KINDS.create(spec.kind).build(spec, ctx, ws.folder(key))
        build_s = time.perf_counter() - start
        clock.step(f"{spec.name()}: proxies (KL on held-out text, decode probe)")
        record = {"artifact": str(built.artifact), "hf_folder": str(built.hf_folder) if built.hf_folder else None,
                  "size_bytes": built.artifact.stat().st_size, "build_s": build_s, "notes": built.notes,
                  "fidelity": fidelity(built.artifact, ctx.parent), "probe_tps": decode_probe(built.artifact)}
    except SkipCandidate as exc:
        clock.step(f"{spec.name()}: skipped: {exc}")
        shutil.rmtree(ws.folder(key), ignore_errors=True)
        return {"skip": str(exc)}  # not stored: a rerun with the missing input builds it
    except SlimlmError as exc:
        record = {"error": str(exc), "build_s": time.perf_counter() - start}
        clock.step(f"{spec.name()}: failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug in one method must not end the search; not stored, so a rerun retries
        clock.step(f"{spec.name()}: failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc} (a bug in slimlm: please report it with this line)"}
    return ws.save(key, "build", inputs, record)


def measure_candidate(ws: Workspace, key: str, artifact: Path, tasks: list[str], limit: int | None,
                      clock: Clock, name: str) -> dict:
    inputs = {"tasks": tasks, "limit": limit, "artifact_bytes": artifact.stat().st_size}
    stored = ws.record(key, "measure", inputs)
    if stored is not None:
        clock.step(f"{name}: evaluated before, reused")
        return stored
    clock.step(f"evaluating {name} on {', '.join(tasks)}" + (f" ({limit} examples each)" if limit else ""))
    return ws.save(key, "measure", inputs, evaluate_in_child(artifact, tasks, limit))


def prepare_parent(ws: Workspace, folder: Path, fp: dict, tasks: list[str], limit: int | None, clock: Clock) -> dict:
    """The parent as an f16 GGUF, measured like a candidate: the reference for every floor."""
    from slimlm.compress.gguf_export import export_gguf

    key, inputs = "parent-f16", {"parent": fp}
    stored = ws.record(key, "build", inputs)
    if stored is None:
        clock.step("exporting the parent to an f16 GGUF")
        artifact = ws.folder(key) / "model.gguf"
        export_gguf(folder, artifact, dtype="f16", force=True)
        stored = ws.save(key, "build", inputs, {"artifact": str(artifact), "size_bytes": artifact.stat().st_size,
                                                "fidelity": fidelity(artifact, folder),
                                                "probe_tps": decode_probe(artifact)})
    parent = {"id": key, "name": "parent (f16)", **stored}
    parent.update(measure_candidate(ws, key, Path(stored["artifact"]), tasks, limit, clock, "the parent"))
    return parent


def search(model: str, tasks: list[str], out: Path, specs: list[CandidateSpec], limit: int | None, goals: Goals,
           calib: str | None, data: str | None, force: bool, say) -> dict:
    """Run the search and assemble OUT; returns the result as shrink.json holds it."""
    from slimlm.compress.quant_steps import tensor_shapes
    from slimlm.eval import check_task
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    goals.validate()
    for task in tasks:  # a task that does not load fails now, before any model work
        check_task(task, limit)
    if data is not None and not Path(data).exists():
        raise SlimlmError(f"--data {data}: no such file: give your training data (JSONL chat/pairs/text, or .txt)")
    ref = resolve(model)
    folder = dense_folder(ref)
    params = sum(math.prod(s) for s in tensor_shapes(folder).values())
    smallest, which = smallest_size_mib(specs, params)
    if goals.max_size_mib is not None and goals.max_size_mib < 0.95 * smallest:
        raise SlimlmError(f"--max-size {goals.max_size_mib:g} MiB is below the smallest file this preset can build "
                          f"(about {smallest:.0f} MiB: {which}): raise --max-size or add smaller candidates")
    ws = Workspace(out, force)
    clock = Clock(goals.time_budget_s, say)
    ws.open()
    try:
        result = _run(ws, ref, folder, tasks, specs, limit, goals, calib, data, clock)
    except BaseException:
        ws.discard_if_empty()
        raise
    return _assemble(ws, result)


def _assemble(ws: Workspace, result: dict) -> dict:
    """Write OUT: the report files, the winner, the candidates (their paths rewritten to OUT/candidates)."""
    from slimlm.hardware import cpu_info
    from slimlm.shrink.report import report_files

    chosen = next((c for c in result["candidates"] if c["id"] == result["chosen"]), None)
    winner = Path(chosen["artifact"]) if chosen else None
    winner_hf = Path(chosen["hf_folder"]) if chosen and chosen.get("hf_folder") else None
    for c in [result["parent"], *result["candidates"]]:
        for name in ("artifact", "hf_folder"):
            if c.get(name):
                c[name] = c[name].replace(str(ws.work / "candidates"), str(ws.out / "candidates"))
    info = cpu_info()
    result["machine"] = info.describe()
    result["serve"] = f"slimlm serve {ws.out / 'model.gguf'}" if winner else None
    result["report"] = str(ws.out / "report.html")
    ws.finish(report_files(result), winner, winner_hf)
    return result


def _run(ws, ref, folder, tasks, specs, limit, goals, calib, data, clock) -> dict:
    fp = parent_fingerprint(folder)
    parent = prepare_parent(ws, folder, fp, tasks, limit, clock)
    ctx = BuildContext(parent=folder, calib=calib if calib is not None else _text_of(data), data=data)
    candidates = []
    for spec in specs:
        row = {"id": spec.key(), "name": spec.name(), "spec": asdict(spec), "status": "", "reasons": []}
        if clock.left() <= 0:
            row.update(status="skipped", reasons=["not built: the time budget was spent"])
        else:
            inputs = {"spec": asdict(spec), "parent": fp, "calib": calib, "data": data}
            row.update(build_candidate(ws, spec, ctx, inputs, clock))
            if "skip" in row:
                row.update(status="skipped", reasons=[row.pop("skip")])
            elif "error" in row:
                row.update(status="failed", reasons=[row["error"]])
        candidates.append(row)

    built = [c for c in candidates if not c["status"]]
    for c in built:
        misses = build_misses(c, goals)
        if misses:
            c.update(status="rejected", reasons=misses)
    alive = [c for c in built if not c["status"]]
    names = {c["id"]: c["name"] for c in candidates}
    judged = [c for c in alive if CANDIDATE_KINDS[c["spec"]["kind"]].judged_by_kl and not c["spec"]["baseline"]]
    for cid, by in proxy_dominated(judged).items():
        c = next(c for c in alive if c["id"] == cid)
        c.update(status="pruned", reasons=[f"proxies: {names[by]} is no larger, no further from the parent (KL) "
                                           "and no slower"])
    alive = sorted((c for c in alive if not c["status"]), key=lambda c: proxy_order(c, goals.prefer))
    full_s = parent.get("seconds") or 0.0
    for c in alive:
        if clock.left() < full_s:
            c.update(status="skipped", reasons=["not evaluated: the time budget would be exceeded"])
            continue
        try:
            c.update(measure_candidate(ws, c["id"], Path(c["artifact"]), tasks, limit, clock, c["name"]))
        except SlimlmError as exc:
            c.update(status="failed", reasons=[str(exc)])
            continue
        misses = final_misses(c, parent, goals)
        c.update(status="misses" if misses else "qualifies", reasons=misses)

    for c in candidates:
        c["quality"] = quality(c, parent)
    evaluated = [c for c in candidates if c["status"] in ("qualifies", "misses")]
    qualifying = sorted((c for c in evaluated if c["status"] == "qualifies"),
                        key=lambda c: objective(c, parent, goals.prefer))
    chosen = qualifying[0] if qualifying else None
    if chosen:
        chosen["status"] = "chosen"
    return {"model": ref.spec, "parent": parent, "tasks": tasks, "limit": limit, "goals": asdict(goals),
            "candidates": candidates, "chosen": chosen["id"] if chosen else None,
            "closest": None if chosen else _closest(evaluated, parent, goals),
            "front_size": _front(evaluated, lambda c: c["size_bytes"], False),
            "front_speed": _front(evaluated, lambda c: decode_tps(c) or math.nan, True),
            "proposed": len(candidates), "built": len(built), "fully_evaluated": len(evaluated),
            "seconds": clock.elapsed, "hand_pick": _hand_pick(evaluated, chosen, goals.prefer, parent),
            "pid": os.getpid()}


def _text_of(data: str | None) -> str | None:
    """The user's data as calibration text where it reads as text (a .txt, JSONL with a text field)."""
    from slimlm.data import calibration_corpus

    if data is None:
        return None
    try:
        calibration_corpus(data)
    except SlimlmError:
        return None  # chat or pair records: each method's default calibration text
    return data


def _front(evaluated: list[dict], x_of, higher_x: bool) -> list[str]:
    points = [(x_of(c), c["quality"]) for c in evaluated]
    return [evaluated[i]["id"] for i in pareto_front(points, higher_x, True)]


def _closest(evaluated: list[dict], parent: dict, goals: Goals) -> str | None:
    """With no qualifying candidate: the one that misses least (fewest misses, then best quality)."""
    if not evaluated:
        return None
    return min(evaluated, key=lambda c: (len(c["reasons"]), -c["quality"]))["id"]


def _hand_pick(evaluated: list[dict], chosen: dict | None, prefer: str, parent: dict) -> dict | None:
    """The chosen model against llama.cpp's Q4_K_M, the file a user would pick by hand, if measured."""
    pick = next((c for c in evaluated if c["spec"].get("method") == "llamacpp"
                 and str(c["spec"].get("format", "")).upper().endswith("Q4_K_M")), None)
    if pick is None or chosen is None:
        return None
    return {"id": pick["id"], "size_ratio": chosen["size_bytes"] / pick["size_bytes"],
            "quality_delta": chosen["quality"] - pick["quality"],
            "speed_ratio": (decode_tps(chosen) or math.nan) / (decode_tps(pick) or math.nan),
            "pick_qualifies": pick["status"] in ("qualifies", "chosen")}
