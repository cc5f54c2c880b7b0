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


def atomic_write_text(path, text: str) -> None:
    """Write a file through a temporary sibling and a rename, so a reader never sees half of it."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
