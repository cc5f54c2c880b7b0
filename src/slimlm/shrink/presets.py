"""The candidate space of a shrink search, as data: a YAML preset (shipped: quick, standard,
thorough; or the user's own file) loaded strictly, so a typo is an error and never a silently
smaller search.

A preset lists candidates; each names a candidate *kind* (shrink/candidates.py: `quantize`,
`prune`) and that kind's settings. The kinds take their method names from the method registries
(QUANT_METHODS, PRUNE_METHODS), so a new quantization method is a new candidate by one line here,
without touching the search.

    candidates:
      - {kind: quantize, method: rtn, format: gguf:Q4_0}
      - {kind: quantize, method: llamacpp, format: gguf:Q4_K_M}
      - {kind: prune, method: width, ratio: 0.25, distill_steps: 100, format: gguf:Q8_0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimlm.config import load_config
from slimlm.errors import SlimlmError
from slimlm.shrink.candidates import CANDIDATE_KINDS, CandidateSpec

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class ShrinkPreset:
    """A candidate space and how hard to measure each candidate."""
    description: str = ""
    limit: int | None = 200  # examples per task in the full evaluation (None: all)
    candidates: list[dict] = field(default_factory=list)  # CandidateSpec mappings, checked by load_preset


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(preset: str | Path) -> tuple[ShrinkPreset, list[CandidateSpec]]:
    """A shipped preset by name, or a YAML file, with every candidate checked against its kind."""
    path = PRESETS_DIR / f"{preset}.yaml" if str(preset) in preset_names() else Path(preset)
    if not path.exists():
        raise SlimlmError(f"--preset {preset}: not a shipped preset ({', '.join(preset_names())}) and no such file: "
                          "name a preset or give a YAML file")
    config = load_config(ShrinkPreset, path)
    if config.limit is not None and config.limit < 1:
        raise SlimlmError(f"{path}: limit must be at least 1 (or null for every example)")
    if not config.candidates:
        raise SlimlmError(f"{path}: no candidates: list at least one under `candidates:`")
    specs, seen = [], set()
    for i, item in enumerate(config.candidates):
        if not isinstance(item, dict):
            raise SlimlmError(f"{path}: candidates[{i}] must be a mapping (kind: ..., method: ...), not {item!r}")
        if "kind" not in item:
            raise SlimlmError(f"{path}: candidates[{i}] has no kind: choose one of {', '.join(CANDIDATE_KINDS)}")
        try:
            spec = load_config(CandidateSpec, item)
            CANDIDATE_KINDS.create(spec.kind).check(spec)
        except SlimlmError as exc:
            raise SlimlmError(f"{path}: candidates[{i}]: {str(exc).removeprefix('config: ')}") from None
        if spec.key() in seen:
            raise SlimlmError(f"{path}: candidates[{i}] ({spec.name()}) is listed twice: remove one")
        seen.add(spec.key())
        specs.append(spec)
    return config, specs
