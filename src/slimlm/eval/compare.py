"""Side-by-side comparison of recorded runs, with deltas against the first.

`slimlm compare` and `slimlm report` both start here, so the terminal table, the JSON and the
HTML page can never disagree. Runs come from the registry rather than from re-running models:
comparing is cheap and repeatable, and a run from last week on another machine still counts.
Every number is optional because `systems` grows over time and old runs lack newer keys; a
missing number is a blank cell, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slimlm.errors import SlimlmError
from slimlm.runs import Run, get_run, list_runs

if TYPE_CHECKING:
    from rich.table import Table

MiB = 2**20
DEFAULT_RUNS = 10
_ALL = 1_000_000  # list_runs needs a limit; the registry of one user stays far below this

# Direction of quality metrics other than the primary one (whose direction the run records).
_HIGHER = ("acc", "pass@", "f1", "match", "score", "precision", "recall", "bleu", "rouge", "win")
_LOWER = ("perplexity", "ppl", "nll", "loss", "bits_per", "error", "wer", "cer")


def num(value) -> float | None:
    """A finite float, or None: registry JSON may hold strings, bools, NaN or nothing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_direction(name: str) -> bool | None:
    """True if higher is better, False if lower, None for counts and unknown names."""
    low = name.lower()
    return False if any(k in low for k in _LOWER) else True if any(k in low for k in _HIGHER) else None


def fmt(value: float | None, unit: str = "") -> str:
    """Three significant figures or so: enough to see a difference, few enough to read."""
    if value is None:
        return ""
    if unit == "$":
        return f"${value:,.2f}" if abs(value) >= 1 else f"${value:#.2g}" if value else "$0"
    if unit == "params":
        for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= div:
                return f"{value / div:.3g}{suffix}"
        return f"{value:.0f}"
    mag = abs(value)
    return (f"{value:,.0f}" if mag >= 100 else f"{value:.1f}" if mag >= 10 else
            f"{value:.2f}" if mag >= 1 or mag == 0 else f"{value:#.3g}")


def task_of(run: Run) -> str | None:
    return run.metrics.get("task") if run.command == "eval" else None


def primary_quality(run: Run) -> tuple[str, float, bool] | None:
    """(metric, value, higher_is_better) of an eval run's headline number, if it has one."""
    m = run.metrics
    quality = m.get("quality") if isinstance(m.get("quality"), dict) else {}
    name = m.get("primary")
    value = num(quality.get(name)) if name else None
    if value is None:
        return None
    hib = m.get("higher_is_better")
    return name, value, bool(hib) if hib is not None else metric_direction(name) is not False


def systems_of(run: Run) -> dict:
    s = run.metrics.get("systems")
    return s if isinstance(s, dict) else {}


def median(stats) -> float | None:
    """The median of a {"median","min","max"} block, or a bare number recorded by an older run."""
    return num(stats.get("median")) if isinstance(stats, dict) else num(stats)


def _scaled(key: str, scale: float = 1.0) -> Callable[[dict], float | None]:
    return lambda s: None if median(s.get(key)) is None else median(s.get(key)) * scale


# key, label, unit, higher_is_better, getter(systems) -- the order of the systems rows.
_SYSTEMS_ROWS: list[tuple[str, str, str, bool | None, Callable[[dict], float | None]]] = [
    ("decode_tps", "decode tok/s (median)", "tok/s", True, _scaled("decode_tps")),
    ("ttft_ms", "time to first token ms", "ms", False, _scaled("ttft_s", 1000.0)),
    ("load_s", "load s", "s", False, _scaled("load_s")),
    ("peak_rss_mib", "peak RSS MiB", "MiB", False, _scaled("peak_rss_bytes", 1 / MiB)),
    ("size_mib", "size MiB", "MiB", False, _scaled("size_bytes", 1 / MiB)),
    ("params_total", "params", "params", None, _scaled("params_total")),
    ("params_active", "params active", "params", None, _scaled("params_active")),
    ("gflops_per_token", "GFLOP per token", "GFLOP", False, _scaled("flops_per_token", 1e-9)),
    ("energy_j_per_1k", "energy J/1k tokens", "J", False, _scaled("energy_j_per_1k_tokens")),
    ("cost_local", "local $/1M tokens", "$", False, _scaled("cost_per_1m_tokens_local")),
]


@dataclass
class Cell:
    value: float | None
    text: str
    delta: float | None = None
    delta_pct: float | None = None
    verdict: str | None = None  # "better" | "worse" | "same"; None for the reference or no direction
    note: str | None = None  # e.g. the energy figure's source, the cheapest API's name
    delta_text: str = ""  # "+1.20 (+5.9%)"


@dataclass
class Row:
    key: str
    label: str
    section: str  # "quality" | "systems"
    unit: str
    higher_is_better: bool | None
    cells: list[Cell]
    task: str | None = None
    reference: int | None = None  # the column the deltas are against: the first with a value


@dataclass
class Comparison:
    columns: list[dict]  # per run: id, label, model, model_path, command, task, backend, precision, created
    rows: list[Row] = field(default_factory=list)

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)

    def to_dict(self) -> dict:
        """JSON-ready: `columns` describe the runs, each row's `cells` follow the same order."""
        return {"baseline": self.columns[0]["id"] if self.columns else None, "columns": self.columns,
                "rows": [asdict(r) for r in self.rows]}


def short_label(run: Run, width: int = 28) -> str:
    """"#id model": a path becomes its last part, a long name is cut in the middle."""
    name = run.model
    if "/" in name or "\\" in name:
        name = Path(name.rstrip("/\\")).name or name
    if len(name) > width:
        name = name[:(width - 1) // 2] + "…" + name[-(width - 1 - (width - 1) // 2):]
    return f"#{run.id} {name}"


def _row(key: str, label: str, section: str, unit: str, hib: bool | None, values: list[float | None],
         notes: list[str | None] | None = None, task: str | None = None) -> Row:
    """Cells with deltas against the first column that has a value (runs on other tasks are blank)."""
    ref = next((i for i, v in enumerate(values) if v is not None), None)
    base = values[ref] if ref is not None else None
    cells = []
    for i, v in enumerate(values):
        cell = Cell(v, fmt(v, unit), note=notes[i] if notes else None)
        if cell.note and v is not None:
            cell.text += f" ({cell.note.split()[0]})"
        if ref is not None and i > ref and v is not None:
            cell.delta = v - base
            cell.delta_pct = cell.delta / abs(base) * 100 if base else None
            pct = f" ({cell.delta_pct:+.1f}%)" if cell.delta_pct is not None else ""
            cell.delta_text = f"{'-' if cell.delta < 0 else '+'}{fmt(abs(cell.delta), unit)}{pct}"
            if cell.delta == 0:
                cell.verdict, cell.delta_text = "same", "±0"
            elif hib is not None:
                cell.verdict = "better" if (cell.delta > 0) == hib else "worse"
        cells.append(cell)
    return Row(key, label, section, unit, hib, cells, task, ref)


def _quality_rows(runs: list[Run]) -> list[Row]:
    tasks = list(dict.fromkeys(t for t in map(task_of, runs) if t))
    rows = []
    for task in tasks:
        mine = [r for r in runs if task_of(r) == task]
        primary = next((r.metrics.get("primary") for r in mine if r.metrics.get("primary")), None)
        names = list(dict.fromkeys(n for r in mine for n in (r.metrics.get("quality") or {})))
        names.sort(key=lambda n: n != primary)  # the headline first, the rest in recorded order
        for name in names:
            values = [num((r.metrics.get("quality") or {}).get(name)) if task_of(r) == task else None for r in runs]
            if all(v is None for v in values):
                continue
            recorded = next((r.metrics["higher_is_better"] for r in mine if name == primary
                             and r.metrics.get("higher_is_better") is not None), None)
            hib = bool(recorded) if recorded is not None else metric_direction(name)
            label = f"{name}{' ★' if name == primary else ''}" + (f" [{task}]" if len(tasks) > 1 else "")
            rows.append(_row(f"quality:{task}:{name}", label, "quality", "", hib, values, task=task))
    return rows


def _systems_rows(runs: list[Run]) -> list[Row]:
    systems = [systems_of(r) for r in runs]
    rows = []
    for key, label, unit, hib, get in _SYSTEMS_ROWS:
        values = [get(s) for s in systems]
        notes = [s.get("energy_source") for s in systems] if key == "energy_j_per_1k" else None
        if any(v is not None for v in values):
            rows.append(_row(key, label, "systems", unit, hib, values, notes))
        if key == "decode_tps":  # prefill right after decode: one row per prompt length measured
            lengths = {k for s in systems if isinstance(s.get("prefill_tps"), dict) for k in s["prefill_tps"]}
            for n in sorted(lengths, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, k)):
                vals = [median((s.get("prefill_tps") or {}).get(n)) for s in systems]
                if any(v is not None for v in vals):
                    rows.append(_row(f"prefill_tps:{n}", f"prefill tok/s @{n}", "systems", "tok/s", True, vals))
    apis = [s.get("api_cost_per_1m") if isinstance(s.get("api_cost_per_1m"), dict) else {} for s in systems]
    names = list(dict.fromkeys(n for a in apis for n in a))
    if names:
        # API prices describe the alternative, not the model: deltas are shown but not judged.
        cheapest = [min((v for v in map(num, a.values()) if v is not None), default=None) for a in apis]
        which = [min(a, key=lambda n: num(a[n]) if num(a[n]) is not None else math.inf) if a else None for a in apis]
        rows.append(_row("api_cheapest", "cheapest API $/1M", "systems", "$", None, cheapest, which))
        for n in names:
            rows.append(_row(f"api:{n}", f"{n} $/1M", "systems", "$", None, [num(a.get(n)) for a in apis]))
    return rows


def compare_runs(runs: list[Run]) -> Comparison:
    """One column per run, quality rows per task then systems rows, deltas against runs[0].

    Where runs[0] lacks a row's number (another task, an older `systems`), deltas are against the
    first run that has it: a row with no deltas at all would answer nothing."""
    if not runs:
        raise SlimlmError("nothing to compare: give run ids or model names (`slimlm runs` lists them)")
    columns = []
    for r in runs:
        s = systems_of(r)
        columns.append({"id": r.id, "label": short_label(r), "model": r.model, "model_path": r.model_path,
                        "command": r.command, "task": task_of(r), "backend": s.get("backend"),
                        "precision": s.get("precision"), "created": r.created})
    return Comparison(columns, _quality_rows(runs) + _systems_rows(runs))


def _matches(run: Run, selector: str) -> bool:
    """The spec as typed, the resolved path as stored, or the same path spelled differently."""
    if selector in (run.model, run.model_path) or not run.model_path:
        return selector in (run.model, run.model_path)
    return Path(selector).expanduser().resolve() == Path(run.model_path).resolve()


def resolve_runs(selectors: list[str], db: Path | None = None) -> list[Run]:
    """Run ids and model names/paths to runs; no selectors means the newest eval per (model, task)."""
    if not selectors:
        runs = list_runs(limit=_ALL, command="eval", db=db) or list_runs(limit=_ALL, command="bench", db=db)
        if not runs:
            raise SlimlmError("no runs recorded yet: run `slimlm eval MODEL` (or `slimlm bench MODEL`) first")
        newest: dict[tuple, Run] = {}
        for r in runs:  # newest first, so the first seen per key wins
            newest.setdefault((r.model, task_of(r)), r)
        chosen = list(newest.values())[:DEFAULT_RUNS]
        tasks = list(dict.fromkeys(map(task_of, chosen)))
        return sorted(chosen, key=lambda r: tasks.index(task_of(r)))  # a task's runs side by side, newest first
    out: list[Run] = []
    every: list[Run] | None = None
    for sel in selectors:
        text = str(sel).strip()
        if text.lstrip("#").isdigit():
            run_id = int(text.lstrip("#"))
            if (run := get_run(run_id, db=db)) is None:
                raise SlimlmError(f"no run with id {run_id}: `slimlm runs` lists them")
        else:
            every = every if every is not None else list_runs(limit=_ALL, db=db)
            mine = [r for r in every if _matches(r, text)]
            run = next((r for r in mine if r.command == "eval"), next((r for r in mine if r.command == "bench"), None))
            if run is None:
                raise SlimlmError(f"no eval run of model {text!r}: run `slimlm eval {text}` first, "
                                  "or give run ids (`slimlm runs` lists them)")
        if all(r.id != run.id for r in out):
            out.append(run)
    return out


_STYLE = {"better": "green", "worse": "red"}


def render_table(comparison: Comparison) -> Table:
    """A rich Table: one column per run, deltas under the value, green better and red worse."""
    from rich.table import Table
    from rich.text import Text

    base = comparison.columns[0]["label"] if comparison.columns else ""
    table = Table(title="slimlm compare", caption=f"deltas vs {base} (or the first run with the number); "
                  "green better, red worse; ★ headline metric")
    table.add_column("metric", style="bold")
    for col in comparison.columns:
        sub = " ".join(str(x) for x in (col.get("backend"), col.get("precision")) if x)
        head = col["label"] + (f"\n{col['task']}" if col.get("task") else "") + (f"\n{sub}" if sub else "")
        table.add_column(head, justify="right")
    section = None
    for row in comparison.rows:
        if section is not None and row.section != section:
            table.add_section()
        section = row.section
        table.add_row(row.label, *(Text(c.text) + Text(f"\n{c.delta_text}", style=_STYLE.get(c.verdict, "dim"))
                                   if c.delta is not None else Text(c.text) for c in row.cells))
    return table
