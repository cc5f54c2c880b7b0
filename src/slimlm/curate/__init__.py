"""`slimlm curate`: make a corpus smaller and better, step by measured step, on datatrove.

A recipe (recipe.py, presets in presets/) lists steps from the registry CURATE_STEPS (steps/):
normalization, language id, the Gopher/C4/FineWeb rules, exact and near dedup, PII redaction,
decontamination against eval tasks. `curate` (run.py) reads the corpus (ingest.py), runs the
steps as datatrove jobs on this machine's cores or a Ray cluster, and writes the kept documents,
everything it removed with the reason, curate.json (the funnel) and report.html (report.py).
"""

from slimlm.curate.recipe import Recipe, load_recipe, preset_names
from slimlm.curate.report import load_run, removed_samples
from slimlm.curate.run import EXECUTORS, CurateResult, RunOptions, curate
from slimlm.curate.steps import CURATE_STEPS

__all__ = ["CURATE_STEPS", "EXECUTORS", "CurateResult", "Recipe", "RunOptions", "curate", "load_recipe", "load_run",
           "preset_names", "removed_samples"]
