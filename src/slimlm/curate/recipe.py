"""A curation recipe, as data: ordered steps with their settings, loaded strictly, so a typo
fails before any work rather than silently skipping a filter.

    description: English web text, FineWeb-style
    tokenizer: smollm2-135m-instruct   # counts tokens (or `words`)
    steps:
      - normalize
      - language: {languages: [en], threshold: 0.65}
      - gopher_quality: {min_doc_words: 50}
      - near_dedup: {threshold: 0.8}

A step is its name (its defaults) or a one-key mapping {name: settings}. Presets `web`, `code`,
`chat` and `docs` ship in slimlm/curate/presets/; `--preset NAME` or a path picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.config import load_config
from slimlm.curate.steps import CURATE_STEPS
from slimlm.errors import SlimlmError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class RecipeFile:
    description: str = ""
    tokenizer: str = "smollm2-135m-instruct"  # a model whose tokenizer counts tokens, or `words`
    steps: list[Any] = field(default_factory=list)


@dataclass
class RecipeStep:
    name: str
    params: Any  # an instance of the step's params dataclass


@dataclass
class Recipe:
    source: str
    description: str
    tokenizer: str
    steps: list[RecipeStep]

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {"source": self.source, "description": self.description, "tokenizer": self.tokenizer,
                "steps": [{s.name: asdict(s.params)} for s in self.steps]}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_recipe(recipe: str | Path | dict) -> Recipe:
    """A shipped preset by name, a YAML file, or a mapping; every step and setting checked."""
    if isinstance(recipe, dict):
        where, raw = "recipe", load_config(RecipeFile, recipe)
    else:
        path = PRESETS_DIR / f"{recipe}.yaml" if str(recipe) in preset_names() else Path(recipe)
        if not path.exists():
            raise SlimlmError(f"recipe {recipe}: not a shipped preset ({', '.join(preset_names())}) and no such file: "
                              "name a preset or give a YAML recipe")
        where, raw = str(path), load_config(RecipeFile, path)
    if not raw.steps:
        raise SlimlmError(f"{where}: no steps: list at least one under `steps:` ({', '.join(CURATE_STEPS)})")
    steps = []
    for i, item in enumerate(raw.steps):
        if isinstance(item, str):
            name, settings = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, settings = next(iter(item.items()))
            settings = {} if settings is None else settings
        else:
            raise SlimlmError(f"{where}: steps[{i}] must be a step name or {{name: settings}}, not {item!r}")
        if name not in CURATE_STEPS:
            raise SlimlmError(f"{where}: steps[{i}]: unknown step {name!r}: choose one of {', '.join(CURATE_STEPS)}")
        step = CURATE_STEPS.create(name)
        if not isinstance(settings, dict):
            raise SlimlmError(f"{where}: steps[{i}] ({name}): settings must be a mapping, not {settings!r}")
        try:
            params = load_config(step.params, settings)
            step.check(params)
        except SlimlmError as exc:
            message = str(exc).removeprefix("config: ")
            raise SlimlmError(f"{where}: steps[{i}] ({name}): {message}") from None
        steps.append(RecipeStep(name, params))
    return Recipe(where, raw.description, raw.tokenizer, steps)
