"""Where a shrink search keeps its work, so that a killed search resumes and nothing half-written
ever sits at the output path.

The search works in a hidden sibling of the output folder, `.OUT.shrink-work/`: one folder per
candidate holding its model file and two small JSON records, `build.json` (written once the file
is complete) and `measure.json` (once the full evaluation is), each written to a temporary name
and renamed. A record is reused only when the inputs stored in it (the candidate's settings, the
parent, the calibration text; the tasks and limit for measure.json) equal the new run's, so a
rerun of the same command skips what finished and a changed setting rebuilds only what it changes.

At the end the result is assembled in a temporary folder beside OUT and renamed into place, the
work folder moving into it as OUT/candidates/. A rerun with --force links those candidates back
(hard links, no copy) before it starts, so it too rebuilds nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.paths import atomic_write_text


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Workspace:
    def __init__(self, out: Path, force: bool):
        self.out = Path(out)
        self.work = self.out.parent / f".{self.out.name}.shrink-work"
        if self.out.exists() and not force:
            raise SlimlmError(f"{self.out} already exists: choose another --out or pass --force "
                              "(--force reuses its finished candidates)")
        if self.out.exists() and not self.out.is_dir():
            raise SlimlmError(f"{self.out} is a file: --out names a folder")
        self.resumed = self.work.exists()

    def open(self) -> None:
        """Create the work folder; with --force over a finished result, link its candidates back in."""
        (self.work / "candidates").mkdir(parents=True, exist_ok=True)
        previous = self.out / "candidates"
        if previous.is_dir():
            for folder in previous.iterdir():
                target = self.work / "candidates" / folder.name
                if folder.is_dir() and not target.exists():
                    shutil.copytree(folder, target, copy_function=_link_or_copy)

    def folder(self, key: str) -> Path:
        path = self.work / "candidates" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def record(self, key: str, name: str, inputs: dict) -> dict | None:
        """The stored record `name` of candidate `key` if it was made from the same inputs."""
        data = read_json(self.work / "candidates" / key / f"{name}.json")
        if data is None or data.get("inputs") != json.loads(json.dumps(inputs, default=str)):
            return None
        return data

    def save(self, key: str, name: str, inputs: dict, data: dict) -> dict:
        data = {**data, "inputs": inputs}
        atomic_write_text(self.folder(key) / f"{name}.json", json.dumps(data, indent=2, default=str))
        return json.loads(json.dumps(data, default=str))

    def discard_if_empty(self) -> None:
        """After a failure before any candidate finished, leave nothing behind."""
        candidates = self.work / "candidates"
        if not self.resumed and not any(candidates.glob("*/build.json")):
            shutil.rmtree(self.work, ignore_errors=True)

    def finish(self, files: dict[str, bytes | str], winner: Path | None, winner_hf: Path | None) -> Path:
        """Assemble OUT: the given files, the winner as model.gguf (and model-hf/), the candidates;
        then rename it into place (an existing OUT is replaced only now)."""
        tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.tmp-"))
        try:
            for name, content in files.items():
                (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
            if winner is not None:
                _link_or_copy(winner, tmp / "model.gguf")
            if winner_hf is not None:
                shutil.copytree(winner_hf, tmp / "model-hf", copy_function=_link_or_copy)
            os.replace(self.work / "candidates", tmp / "candidates")
            old = None
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                os.replace(self.out, old)
            os.replace(tmp, self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.work, ignore_errors=True)
        except BaseException:
            if (tmp / "candidates").exists() and not (self.work / "candidates").exists():
                os.replace(tmp / "candidates", self.work / "candidates")
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.out


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
