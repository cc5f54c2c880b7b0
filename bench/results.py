"""One way for every bench script to append its dated section, with the machine, to RESULTS.md."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from slimlm.hardware import cpu_info

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = ("# Benchmark results\n\nRows are appended by the scripts in bench/; compare only rows "
           "from the same run (same date and machine).\n")


def append_section(name: str, description: str, body: list[str]) -> Path:
    """Append `## name — date — machine`, the description paragraph and the body lines."""
    cpu = cpu_info()
    machine = f"{cpu.model}, {cpu.arch}, {cpu.physical_cores} cores, {' '.join(cpu.features)}"
    text = "" if RESULTS.exists() else _HEADER
    text += f"\n## {name} — {date.today().isoformat()} — {machine}\n{description}\n\n" + "\n".join(body) + "\n"
    with RESULTS.open("a") as f:
        f.write(text)
    return RESULTS
