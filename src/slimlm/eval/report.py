"""`slimlm report`: one HTML page with the comparison table and the plots worth looking at.

The page is self-contained (inline CSS, PNGs as data: URIs, no scripts, fonts or links) so it
opens on an air-gapped machine, survives being mailed or attached to an issue, and shows the
same thing in five years. Each plot is also written as a PNG for slides and READMEs. Plots are
drawn with matplotlib's object API on the Agg canvas: no display, no pyplot global state.
Files are written into a temporary folder beside the target and then moved into place, so an
interrupted run never leaves a half-written page over a good one.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.eval.compare import (
    Comparison,
    MiB,
    compare_runs,
    fmt,
    num,
    primary_quality,
    short_label,
    systems_of,
    task_of,
)
from slimlm.runs import Run

PAGE = "report.html"
SIZE_PNG, SPEED_PNG, COST_PNG = "quality_vs_size.png", "quality_vs_speed.png", "cost_local_vs_api.png"
PLOT_FILES = (SIZE_PNG, SPEED_PNG, COST_PNG)


def pareto_front(points: list[tuple[float, float]], higher_is_better_x: bool, higher_is_better_y: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (ties dominate nobody).

    A point is dominated when another is at least as good on x and on y and strictly better on
    one. Those left are the only sensible choices: everything else is slower *and* no better.
    """
    sx, sy = (1 if higher_is_better_x else -1), (1 if higher_is_better_y else -1)
    keys = [(sx * x, sy * y) if math.isfinite(x) and math.isfinite(y) else None for x, y in points]
    front = []
    for i, a in enumerate(keys):
        if a is None:
            continue
        if not any(b is not None and j != i and b[0] >= a[0] and b[1] >= a[1] and b != a for j, b in enumerate(keys)):
            front.append(i)
    return front


def _by_task(runs: list[Run], x_of) -> dict[str, list[tuple[str, float, float, str, bool]]]:
    """task -> [(label, x, quality, metric, higher_is_better)] for eval runs with both numbers."""
    groups: dict[str, list] = {}
    for r in runs:
        q, x = primary_quality(r), x_of(systems_of(r))
        if q is not None and x is not None:
            groups.setdefault(task_of(r) or "?", []).append((short_label(r), x, q[1], q[0], q[2]))
    return groups


def png_bytes(fig) -> bytes:
    """A matplotlib Figure as PNG bytes, on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": "slimlm"})
    return buf.getvalue()


def _wide(values: list[float], ratio: float = 20.0) -> bool:
    """Log scale when all values are positive and span more than `ratio`x."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > ratio


def _quality_plot(groups: dict, xlabel: str, title: str, higher_is_better_x: bool | None) -> bytes:
    """One panel per task (metrics differ between tasks); the Pareto front when x has a direction."""
    from matplotlib.figure import Figure

    ncols = min(len(groups), 2)
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 4.6 * nrows), layout="constrained")
    fig.suptitle(title)
    for k, (task, pts) in enumerate(groups.items()):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        metric, hib = pts[0][3], pts[0][4]
        ax.scatter(xs, ys, s=40, color="#4477aa", zorder=3)
        for label, x, y, *_ in pts:
            ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
        if higher_is_better_x is not None:
            front = sorted(pareto_front(list(zip(xs, ys)), higher_is_better_x, hib), key=lambda i: xs[i])
            ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="#cc3311", zorder=2)
            ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=110, facecolors="none",
                       edgecolors="#cc3311", linewidths=1.6, zorder=4, label="Pareto front")
            ax.legend(loc="best", fontsize=8)
        if _wide(xs):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
        ax.set_title(task, fontsize=10)
        ax.margins(x=0.18, y=0.1)  # room for the labels of the outermost points
        ax.grid(True, alpha=0.3)
    return png_bytes(fig)


def _cost_plot(runs: list[Run]) -> bytes | None:
    """Local $/1M per run beside each API model's $/1M for the same workload (median over runs)."""
    from matplotlib.figure import Figure

    local = [(short_label(r), v) for r in runs if (v := num(systems_of(r).get("cost_per_1m_tokens_local"))) is not None]
    if not local:
        return None
    prices: dict[str, list[float]] = {}
    for r in runs:
        api = systems_of(r).get("api_cost_per_1m")
        for name, v in (api.items() if isinstance(api, dict) else ()):
            if num(v) is not None:
                prices.setdefault(name, []).append(num(v))
    api = sorted(((f"API: {n}", statistics.median(v)) for n, v in prices.items()), key=lambda p: p[1])
    bars = local + api
    fig = Figure(figsize=(8, 0.45 * len(bars) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    ys = range(len(bars))
    colors = ["#4477aa"] * len(local) + ["#bbbbbb"] * len(api)
    ax.barh(list(ys), [b[1] for b in bars], color=colors)
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    for y, (_, v) in zip(ys, bars):
        ax.annotate(fmt(v, "$"), (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    if _wide([b[1] for b in bars]):
        ax.set_xscale("log")
    ax.set_xlabel("USD per 1M tokens (log scale)" if ax.get_xscale() == "log" else "USD per 1M tokens")
    as_of = next((s.get("api_prices_as_of") for s in map(systems_of, runs) if s.get("api_prices_as_of")), None)
    ax.set_title("Cost per 1M tokens: local (blue) vs API (grey)" + (f", API prices as of {as_of}" if as_of else ""))
    ax.margins(x=0.15)
    ax.grid(True, axis="x", alpha=0.3)
    return png_bytes(fig)


def _plots(runs: list[Run]) -> list[tuple[str, str, bytes | None, str]]:
    """(file, title, png or None, note) for the three plots; a None png carries why it is missing."""
    def size(s):
        v = num(s.get("size_bytes"))
        return v / MiB if v is not None else None

    def speed(s):
        d = s.get("decode_tps")
        return num(d.get("median")) if isinstance(d, dict) else num(d)

    out = []
    for file, title, x_of, xlabel, hib_x, need in (
            (SIZE_PNG, "Quality vs size", size, "model size (MiB)", False, "a quality score and the model size"),
            (SPEED_PNG, "Quality vs decode speed", speed, "decode speed (tokens/s, median)", True,
             "a quality score and a decode speed")):
        groups = _by_task(runs, x_of)
        png = _quality_plot(groups, xlabel, title, hib_x if file == SPEED_PNG else None) if groups else None
        out.append((file, title, png, f"Skipped: no run has {need}."))
    cost = _cost_plot(runs)
    out.append((COST_PNG, "Cost per 1M tokens, local vs API", cost, "Skipped: no run has a local cost per 1M tokens."))
    return out


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}th,td{padding:.3em .7em;border-bottom:1px solid #eee}
th{background:#f6f6f6;vertical-align:bottom}td{text-align:right}td:first-child,th:first-child{text-align:left}
tr.section td{border-top:2px solid #ccc}.d{display:block;font-size:.85em;color:#777}
.better{color:#1a7f37}.worse{color:#c62828}.note{color:#8a6d00;background:#fff8e1;padding:.5em .8em}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}footer{margin-top:3em;color:#666;font-size:.9em}
.sub{font-weight:normal;color:#666;font-size:.85em}
"""


def _table_html(c: Comparison) -> str:
    e = html.escape
    subs = [" ".join(str(x) for x in (col.get("task"), col.get("backend"), col.get("precision")) if x)
            for col in c.columns]
    head = "".join(f"<th>{e(col['label'])}<br><span class=sub>{e(sub)}</span></th>"
                   for col, sub in zip(c.columns, subs))
    rows, section = [], None
    for row in c.rows:
        cls = ' class="section"' if section is not None and row.section != section else ""
        section = row.section
        cells = "".join(f"<td>{e(cell.text)}" + (f"<span class='d {cell.verdict or ''}'>{e(cell.delta_text)}</span>"
                                                if cell.delta is not None else "") + "</td>" for cell in row.cells)
        rows.append(f"<tr{cls}><td>{e(row.label)}</td>{cells}</tr>")
    return f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _machines(runs: list[Run]) -> str:
    seen: dict[str, list[int]] = {}
    for r in runs:
        m = r.machine or {}
        desc = f"{m.get('model', 'unknown CPU')} ({m.get('arch', '?')}, {m.get('physical_cores', '?')} cores)"
        seen.setdefault(desc, []).append(r.id)
    return "; ".join(f"{d}: runs {', '.join(f'#{i}' for i in ids)}" for d, ids in seen.items())


def render_html(runs: list[Run], plots: list[tuple[str, str, bytes | None, str]]) -> str:
    """The page as a string: table, plots (as data: URIs) or the note why one is missing, footer."""
    e = html.escape
    figures = []
    for file, title, png, note in plots:
        if png is None:
            figures.append(f"<h2>{e(title)}</h2><p class=note>{e(note)}</p>")
        else:
            data = base64.b64encode(png).decode("ascii")
            figures.append(f"<h2>{e(title)}</h2><figure><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{e(file)}</figcaption></figure>")
    dates = [time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)) for r in runs]
    version = next((r.versions.get("slimlm") for r in runs if r.versions.get("slimlm")), None)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>slimlm report</title>"
            f"<style>{_CSS}</style></head><body><h1>slimlm report</h1>"
            f"<p>{len(runs)} run(s), recorded {e(min(dates))} to {e(max(dates))}. Deltas are against the first "
            f"column (or, where it lacks the number, the first that has it); "
            f"<span class=better>green</span> is better, <span class=worse>red</span> worse; ★ marks each task's "
            f"headline metric.</p><h2>Comparison</h2>{_table_html(compare_runs(runs))}{''.join(figures)}"
            f"<footer>Generated {e(time.strftime('%Y-%m-%d %H:%M:%S %z'))}"
            f"{' by slimlm ' + e(version) if version else ''}. Machines: {e(_machines(runs))}.</footer>"
            f"</body></html>")


def write_report(runs: list[Run], out_dir: Path) -> Path:
    """Write report.html and the plot PNGs into out_dir; returns the page's path."""
    compare_runs(runs)  # fail early, before any file is touched, if there is nothing to report
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise SlimlmError(f"{out_dir} is a file: give --out a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        plots = _plots(runs)
        for file, _, png, _ in plots:
            if png is not None:
                (tmp / file).write_bytes(png)
        (tmp / PAGE).write_text(render_html(runs, plots), encoding="utf-8")
        for file, _, png, _ in plots:  # a plot skipped this time must not leave last time's PNG behind
            if png is not None:
                os.replace(tmp / file, out_dir / file)
            else:
                (out_dir / file).unlink(missing_ok=True)
        os.replace(tmp / PAGE, out_dir / PAGE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / PAGE
