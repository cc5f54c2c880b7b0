"""`slimlm shrink`: the main job. Find the smallest (or fastest, or best) model that still does the
user's job on this machine, prove it with measurements, and hand it over ready to serve.

    from slimlm.shrink import shrink
    result = shrink("smollm2-135m-instruct", ["multiple_choice:pydoc"], "shrunk/", preset="quick")
    print(result["chosen"], result["report"])

Where things are: presets.py (the candidate space as YAML), candidates.py (how each candidate kind
is built, through the quantize/prune/distill verbs), measure.py (proxies and the full evaluation),
goals.py (floors, budgets, the objective), search.py (the search, top to bottom), workspace.py
(resume, atomic output), report.py (shrink.json, the HTML report, the table).
"""

from __future__ import annotations

from pathlib import Path

from slimlm.shrink.goals import PREFER, Goals
from slimlm.shrink.presets import load_preset, preset_names
from slimlm.shrink.search import DEFAULT_TASK

__all__ = ["DEFAULT_TASK", "Goals", "PREFER", "preset_names", "shrink"]


def shrink(model: str, tasks: list[str] | None, out: str | Path, *, preset: str | Path = "quick",
           goals: Goals | None = None, limit: int | None = None, calib: str | None = None, data: str | None = None,
           force: bool = False,
           record: bool = True, say=None) -> dict:
    """Search the preset's candidates for `model` on `tasks` (default: the built-in pydoc task) and
    write the result to the folder `out`: model.gguf (the chosen model), shrink.json, report.html,
    the plots and candidates/. Returns what shrink.json holds.

    limit: examples per task (default: the preset's). calib: calibration text for calibrated methods
    (a file, or a built-in corpus; default: `data`, else each method's). data: your training data
    (`finetune` candidates train on it; calibration uses it unless `calib` is given). say: a callable for progress lines
    (default: stderr while progress is enabled). A rerun continues where a killed one stopped."""
    from slimlm.shrink.search import search

    config, specs = load_preset(preset)
    goals = goals or Goals()
    result = search(model, list(tasks or [DEFAULT_TASK]), Path(out), specs,
                    limit if limit is not None else config.limit, goals, calib, data, force, say or _stderr)
    result["preset"] = str(preset)
    if record:
        from slimlm.models.reference import resolve
        from slimlm.runs import record as record_run

        record_run("shrink", resolve(model), params={"preset": str(preset), "tasks": result["tasks"],
                                                     "goals": result["goals"], "limit": result["limit"]},
                   metrics={"chosen": result["chosen"], "seconds": result["seconds"],
                            "fully_evaluated": result["fully_evaluated"], "proposed": result["proposed"]},
                   artifact=Path(out))
    return result


def _stderr(line: str) -> None:
    import os
    import sys

    if os.environ.get("SLIMLM_PROGRESS", "1") != "0":  # one line per step: useful in logs too, unlike bars
        print(line, file=sys.stderr, flush=True)
