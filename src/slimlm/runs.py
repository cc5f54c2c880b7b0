"""Run registry and model manifests: what was done, to which model, with what result.

Every model folder slimlm writes carries `slimlm.json` (parent, operation, parameters, package
versions, time, metrics), so a folder explains itself after it is copied elsewhere. Every
command that produces a result also adds a row to a SQLite database, so `slimlm runs` and
`slimlm compare` can find results later. SQLite because it is in Python, needs no server and
survives concurrent readers.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from slimlm.paths import runs_db_path

MANIFEST = "slimlm.json"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    command TEXT NOT NULL,
    model TEXT NOT NULL,
    model_path TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    artifact TEXT,
    lineage TEXT NOT NULL DEFAULT '[]',
    versions TEXT NOT NULL DEFAULT '{}',
    machine TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
)
"""
_DB_OVERRIDE: list[str | None] = [None]  # set by the CLI's --runs-db


def set_runs_db(path: str | None) -> None:
    _DB_OVERRIDE[0] = path


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("slimlm", "torch", "transformers", "gguf", "llama_cpp_python", "safetensors", "peft", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_manifest(path: Path) -> dict | None:
    """The manifest of a model folder (or of the folder holding a GGUF file), if any."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    candidates = [folder / MANIFEST] if path.is_dir() else [path.with_suffix(".slimlm.json"), folder / MANIFEST]
    for cand in candidates:
        if cand.exists():
            try:
                return json.loads(cand.read_text())
            except ValueError:
                return None
    return None


def write_manifest(folder: Path, parent, operation: str, params: dict, metrics: dict | None = None) -> Path:
    """Write `slimlm.json` into a folder being created; `parent` is a ModelRef or a path."""
    parent_path = getattr(parent, "path", parent)
    manifest = {
        "parent": {"spec": getattr(parent, "spec", str(parent)), "path": str(parent_path),
                   "kind": getattr(parent, "kind", None)},
        "operation": operation,
        "params": params,
        "versions": versions(),
        "created": _now(),
        "metrics": metrics or {},
    }
    out = Path(folder) / MANIFEST
    out.write_text(json.dumps(manifest, indent=2, default=str))
    return out


def lineage(path: Path, limit: int = 64) -> list[dict]:
    """The chain of operations behind a model, newest first, following each manifest's parent."""
    chain, seen, current = [], set(), Path(path)
    while len(chain) < limit and str(current) not in seen:
        seen.add(str(current))
        manifest = read_manifest(current)
        if manifest is None:
            chain.append({"model": str(current), "operation": "source"})
            break
        chain.append({"model": str(current), "operation": manifest.get("operation"),
                      "params": manifest.get("params", {}), "created": manifest.get("created")})
        current = Path(manifest.get("parent", {}).get("path", ""))
        if not str(current) or str(current) == ".":
            break
    return chain


@dataclass
class Run:
    id: int
    command: str
    model: str
    model_path: str | None
    params: dict
    metrics: dict
    artifact: str | None
    lineage: list
    versions: dict
    machine: dict
    created: float

    def to_dict(self) -> dict:
        return dict(self.__dict__, created_iso=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created)))


def _connect(db: Path | None = None) -> sqlite3.Connection:
    path = Path(db) if db else runs_db_path(_DB_OVERRIDE[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30)
    conn.execute(_SCHEMA)
    return conn


def record(command: str, model, params: dict | None = None, metrics: dict | None = None,
           artifact: Path | None = None, db: Path | None = None) -> int:
    """Add a run; returns its id. `model` is a ModelRef or anything with a string form."""
    from slimlm.hardware import cpu_info

    path = getattr(model, "path", None)
    chain = lineage(Path(path)) if path else []
    row = (command, getattr(model, "spec", str(model)), str(path) if path else None,
           json.dumps(params or {}, default=str), json.dumps(metrics or {}, default=str),
           str(artifact) if artifact else None, json.dumps(chain, default=str), json.dumps(versions()),
           json.dumps(cpu_info().to_dict()), time.time())
    with closing(_connect(db)) as conn, conn:
        cur = conn.execute("INSERT INTO runs (command, model, model_path, params, metrics, artifact, lineage, "
                           "versions, machine, created) VALUES (?,?,?,?,?,?,?,?,?,?)", row)
        return int(cur.lastrowid)


def _row_to_run(row) -> Run:
    return Run(row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]), row[6],
               json.loads(row[7]), json.loads(row[8]), json.loads(row[9]), row[10])


_COLUMNS = "id, command, model, model_path, params, metrics, artifact, lineage, versions, machine, created"


def list_runs(limit: int = 50, command: str | None = None, db: Path | None = None) -> list[Run]:
    query, args = f"SELECT {_COLUMNS} FROM runs", []
    if command:
        query, args = query + " WHERE command = ?", [command]
    with closing(_connect(db)) as conn:
        rows = conn.execute(query + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
    return [_row_to_run(r) for r in rows]


def get_run(run_id: int, db: Path | None = None) -> Run | None:
    with closing(_connect(db)) as conn:
        row = conn.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", [run_id]).fetchone()
    return _row_to_run(row) if row else None
