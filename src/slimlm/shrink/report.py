"""What a shrink search hands back: shrink.json (every candidate with every number), an offline
HTML report (the fronts as plots, the candidate table, what each rejected candidate missed, the
line that serves the winner) and the rows of the table the CLI prints.

The page is self-contained as `slimlm report`'s is (inline CSS, PNGs as data: URIs, no scripts),
so it opens on an air-gapped machine; plots are drawn with matplotlib's object API on Agg.
"""

from __future__ import annotations

import base64
import html
import json
import math

from slimlm.eval.report import png_bytes
from slimlm.shrink.goals import MiB, decode_tps

STATUS_ORDER = ("chosen", "qualifies", "misses", "pruned", "rejected", "skipped", "failed")


def _num(value, spec: str, missing: str = "—") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def rows(result: dict) -> list[dict]:
    """One row per model (parent first, then candidates by status), as the table shows them."""
    out = []
    tasks = result["tasks"]
    for c in [result["parent"]] + sorted(result["candidates"], key=lambda c: (STATUS_ORDER.index(c["status"]),
                                                                              c.get("size_bytes") or 0)):
        fid = c.get("fidelity") or {}
        row = {"model": c["name"], "status": c.get("status", "reference"),
               "size": _num(c["size_bytes"] / MiB if c.get("size_bytes") else None, ".1f"),
               "KL": _num(fid.get("kl_mean"), ".4f"), "top-1": _num(fid.get("top1_agreement"), ".1%")}
        for task in tasks:
            s = (c.get("scores") or {}).get(task)
            row[task] = _num(s["score"] if s else None, ".3f")
        row["kept"] = "100%" if c is result["parent"] else _num(c.get("quality"), ".1%")
        row["tok/s"] = _num(decode_tps(c), ".0f")
        peak = (c.get("systems") or {}).get("peak_rss_bytes")
        row["peak MiB"] = _num(peak / MiB if peak else None, ".0f")
        row["why"] = "; ".join(c.get("reasons") or [])
        out.append(row)
    return out


def verdict(result: dict) -> str:
    """The one line that says what happened."""
    by_id = {c["id"]: c for c in result["candidates"]}
    if result["chosen"]:
        c = by_id[result["chosen"]]
        line = (f"chosen: {c['name']}, {c['size_bytes'] / MiB:.1f} MiB ({c['size_bytes'] / result['parent']['size_bytes']:.0%}"
                f" of the f16 parent), keeping {c['quality']:.1%} of the parent's score")
        pick = result.get("hand_pick")
        if pick and pick["id"] != c["id"]:
            line += (f"; vs llama.cpp Q4_K_M: {pick['size_ratio']:.2f}x its size, quality "
                     f"{pick['quality_delta']:+.1%}, {pick['speed_ratio']:.2f}x its decode speed")
        return line
    closest = by_id.get(result.get("closest") or "")
    if closest is None:
        return "no candidate meets the floor: none could be evaluated (see the table for why)"
    return (f"no candidate meets the floor; closest: {closest['name']}, which missed: "
            f"{'; '.join(closest['reasons'])}")


def plot(result: dict, axis: str) -> bytes | None:
    """Quality kept vs file size (axis 'size') or vs decode speed ('speed'), the front joined by a line."""
    from matplotlib.figure import Figure

    evaluated = [c for c in result["candidates"] if c["status"] in ("chosen", "qualifies", "misses")]
    if not evaluated:
        return None
    x_of = (lambda c: c["size_bytes"] / MiB) if axis == "size" else (lambda c: decode_tps(c) or math.nan)
    front = set(result["front_size"] if axis == "size" else result["front_speed"])
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot()
    for c in evaluated:
        color = "tab:green" if c["status"] in ("chosen", "qualifies") else "tab:red"
        ax.scatter(x_of(c), c["quality"], color=color, marker="*" if c["status"] == "chosen" else "o",
                   s=140 if c["status"] == "chosen" else 40, zorder=3)
        ax.annotate(c["name"], (x_of(c), c["quality"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    pts = sorted((x_of(c), c["quality"]) for c in evaluated if c["id"] in front)
    if len(pts) > 1:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="gray", lw=1, ls="--", zorder=2, label="Pareto front")
        ax.legend(fontsize=8)
    parent = result["parent"]
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(result["goals"]["quality_floor"], color="tab:orange", lw=0.8, ls=":")
    ax.scatter(x_of(parent), 1.0, color="black", marker="s", s=30, zorder=3)
    ax.annotate("parent (f16)", (x_of(parent), 1.0), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("file size (MiB)" if axis == "size" else "decode tokens/s (llama.cpp)")
    ax.set_ylabel("fraction of the parent's score kept")
    ax.set_title(f"quality vs {axis}: green meets every floor and budget", fontsize=9)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def render_html(result: dict, plots: dict[str, bytes | None]) -> str:
    esc = html.escape
    table = rows(result)
    head = "".join(f"<th>{esc(k)}</th>" for k in table[0])
    body = "".join("<tr class='{}'>{}</tr>".format(esc(r["status"]), "".join(f"<td>{esc(str(v))}</td>" for v in r.values()))
                   for r in table)
    images = "".join(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                     f"</figure>" for name, png in plots.items() if png)
    goals = ", ".join(f"{k} = {v}" for k, v in result["goals"].items() if v is not None)
    serve = f"<p>Serve it: <code>{esc(result['serve'])}</code></p>" if result.get("serve") else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>slimlm shrink: {esc(result['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}tr.chosen{{background:#d8f5d0}}
tr.qualifies{{background:#eefbe9}}tr.misses,tr.failed{{background:#fde8e8}}tr.pruned,tr.rejected,tr.skipped{{color:#777}}
figure{{display:inline-block;margin:0 1em 1em 0}}code{{background:#f3f3f3;padding:2px 4px}}</style></head><body>
<h1>slimlm shrink: {esc(result['model'])}</h1>
<p><b>{esc(verdict(result))}</b></p>{serve}
<p>Tasks: {esc(', '.join(result['tasks']))} ({esc(str(result['limit'] or 'all'))} examples each). Goals: {esc(goals)}.
{result['proposed']} candidates proposed, {result['built']} built, {result['fully_evaluated']} evaluated in full
(the proxies pruned the rest); search time {result['seconds'] / 60:.1f} min on {esc(result.get('machine', ''))}.</p>
{images}
<h2>Candidates</h2><table><tr>{head}</tr>{body}</table>
<p>KL and top-1: agreement with the parent (torch, fp32) on held-out text no calibration saw. Scores: llama.cpp,
the backend that serves the file. "kept": the mean over tasks of the fraction of the parent's score.</p>
</body></html>"""


def report_files(result: dict) -> dict[str, bytes | str]:
    plots = {"quality_vs_size.png": plot(result, "size"), "quality_vs_speed.png": plot(result, "speed")}
    files: dict[str, bytes | str] = {name: png for name, png in plots.items() if png}
    files["report.html"] = render_html(result, plots)
    files["shrink.json"] = json.dumps(result, indent=2, default=str)
    return files
