"""The curation steps: one module per concern, each step one class in CURATE_STEPS.

Imported in the order a recipe usually runs them, which is the order `--help` lists them in."""
# ruff: noqa: I001

from slimlm.curate.steps import text, language, heuristics, dedup, quality, perplexity, decontaminate  # noqa: F401, E501
from slimlm.curate.steps.base import CURATE_STEPS, CurateStep, Stage, StepContext, register_step

__all__ = ["CURATE_STEPS", "CurateStep", "Stage", "StepContext", "register_step"]
