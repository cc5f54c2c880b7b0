#!/usr/bin/env python3
"""Rewrite the README's compatibility matrix from the last test run (build/compat.json).

The matrix is never edited by hand: tests named test_matrix_<capability>[<family>] record
their outcome, and this script turns those outcomes into the table between the markers
<!-- matrix:start --> and <!-- matrix:end -->. Later issues add capabilities by adding tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimlm.models.families import FAMILIES  # noqa: E402

START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
# Column order; capabilities not listed here are appended alphabetically.
CAPABILITIES = ["load", "generate", "save_reload", "info", "gguf_export", "quantize", "finetune", "prune", "distill"]
MARK = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}


def render(results: dict) -> str:
    seen = {cap for caps in results.values() for cap in caps}
    caps = [c for c in CAPABILITIES if c in seen] + sorted(seen - set(CAPABILITIES))
    lines = ["| family | `model_type` | examples | " + " | ".join(c.replace("_", "/") for c in caps) + " |",
             "|---|---|---|" + "---|" * len(caps)]
    for model_type, fam in FAMILIES.items():
        row = results.get(model_type, {})
        cells = [MARK.get(row.get(c, ""), "—") for c in caps]
        lines.append(f"| {fam.label} | `{model_type}` | {fam.examples} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    compat = ROOT / "build" / "compat.json"
    if not compat.exists():
        print("no build/compat.json: run `make test` first", file=sys.stderr)
        return 1
    table = render(json.loads(compat.read_text()))
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
