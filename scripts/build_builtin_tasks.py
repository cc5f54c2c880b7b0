#!/usr/bin/env python3
"""Build the built-in task sets that ship in src/slimlm/data/tasks/ (see slimlm/data/builtin_tasks.py
for the source and the construction rule of each).

    .venv/bin/python scripts/build_builtin_tasks.py           # write the files
    .venv/bin/python scripts/build_builtin_tasks.py --check   # exit 1 if a shipped file differs

The standard library changes between Python versions, so build with the Python recorded in
`PYDOC_BUILT_WITH` (the script refuses another one unless given --any-python, and then says so);
the shipped file, not a fresh build, is what `--task multiple_choice:pydoc` reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimlm.data.builtin_tasks import BUILTIN_TASKS, PYDOC_BUILT_WITH, build_pydoc_mc_isolated, dumps_jsonl  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    parser.add_argument("--any-python", action="store_true",
                        help=f"build on a Python other than {PYDOC_BUILT_WITH} (the set will differ)")
    args = parser.parse_args()
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != PYDOC_BUILT_WITH and not args.any_python:
        print(f"this is Python {here}; the shipped task was built with {PYDOC_BUILT_WITH}: run it with that "
              f"Python, or pass --any-python (and update PYDOC_BUILT_WITH)", file=sys.stderr)
        return 2
    path = BUILTIN_TASKS["pydoc"].path
    text = dumps_jsonl(build_pydoc_mc_isolated())
    if args.check:
        same = path.is_file() and path.read_text(encoding="utf-8") == text
        print(f"{path}: {'up to date' if same else 'differs from a fresh build'}")
        return 0 if same else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"{path}: {text.count(chr(10))} questions (Python {here})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
