"""Where slimlm keeps its own files: caches (rebuildable) and data (the run registry)."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir, user_data_dir


def cache_dir() -> Path:
    """Rebuildable files: assembled built-in models, GGUF->torch conversions, speed probes."""
    path = Path(os.environ.get("SLIMLM_CACHE_DIR") or user_cache_dir("slimlm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    path = Path(os.environ.get("SLIMLM_DATA_DIR") or user_data_dir("slimlm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_db_path(override: str | os.PathLike | None = None) -> Path:
    """--runs-db, else $SLIMLM_RUNS_DB, else runs.db under the user's data folder."""
    if override:
        return Path(override)
    if os.environ.get("SLIMLM_RUNS_DB"):
        return Path(os.environ["SLIMLM_RUNS_DB"])
    return data_dir() / "runs.db"
