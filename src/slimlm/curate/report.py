"""What a curation run did, in numbers and in examples: the funnel (documents and tokens into and
out of each step, what was removed and why), `slimlm curate inspect` (samples of what each step
removed), and an offline HTML report with the funnel as a picture."""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path

from slimlm.curate.ingest import read_shards
from slimlm.errors import SlimlmError


def _num(value) -> int:
    return int(value["total"] if isinstance(value, dict) else value)


def _stats(logs: str) -> list[dict]:
    """Per pipeline element, {"name", "stats": {key: count}} summed over the stage's tasks.

    Read from each task's own file (logs/stats/RANK.json) rather than datatrove's merged
    stats.json, which holds only the tasks run by the last invocation: after a resumed run it
    would leave out the tasks that finished before the kill."""
    merged: list[dict] = []
    for path in sorted((Path(logs) / "stats").glob("*.json")):
        for i, entry in enumerate(json.loads(path.read_text())):
            if i == len(merged):
                merged.append({"name": entry.get("name", ""), "stats": Counter()})
            for key, value in entry.get("stats", {}).items():
                if key in ("documents", "tokens") or key.startswith("dropped_"):
                    merged[i]["stats"][key] += _num(value)
    return merged


def funnel(recipe, input_report: dict, stages: list[tuple[str, list]]) -> list[dict]:
    """[{step, docs_in, docs_out, tokens_in, tokens_out, removed: {reason: docs}}] in recipe order,
    read from datatrove's statistics of every stage (the Tally after each step, and each filter's
    `dropped_<reason>` counts)."""
    per_label: dict[str, dict] = {}
    for logs, labels in stages:
        for label, entry in zip(labels, _stats(logs)):
            if label is None:
                continue
            slot = per_label.setdefault(label, {"documents": 0, "tokens": 0, "reasons": Counter()})
            stats = entry.get("stats", {})
            if entry.get("name", "").endswith("tally"):
                slot["documents"] += _num(stats.get("documents", 0))
                slot["tokens"] += _num(stats.get("tokens", 0))
            for key, value in stats.items():
                if key.startswith("dropped_"):
                    slot["reasons"][key.removeprefix("dropped_")] += _num(value)
    rows, docs, tokens = [], input_report["documents"], input_report["tokens"]
    for i, step in enumerate(recipe.steps, start=1):
        label = f"{i:02d}-{step.name}"
        slot = per_label.get(label, {"documents": 0, "tokens": 0, "reasons": Counter()})
        removed = dict(slot["reasons"])
        unexplained = docs - slot["documents"] - sum(removed.values())
        if unexplained > 0:  # blocks that drop without a reason (the dedup filters): the step's own name
            removed[step.name] = removed.get(step.name, 0) + unexplained
        rows.append({"step": step.name, "label": label, "docs_in": docs, "docs_out": slot["documents"],
                     "tokens_in": tokens, "tokens_out": slot["tokens"], "removed": removed})
        docs, tokens = slot["documents"], slot["tokens"]
    return rows


def load_run(folder: str | Path) -> dict:
    folder = Path(folder)
    manifest = folder / "curate.json"
    if not manifest.exists():
        partial = folder.parent / f".{folder.name}.work"
        hint = (f"an unfinished run is in {partial}: rerun the same `slimlm curate` command to finish it"
                if partial.exists() else "give the --out folder of a finished `slimlm curate` run")
        raise SlimlmError(f"{folder}: not a curated folder (no curate.json): {hint}")
    return json.loads(manifest.read_text())


def removed_samples(folder: str | Path, per_reason: int = 3, chars: int = 300) -> dict[str, dict[str, list[dict]]]:
    """{step label: {reason: [{id, text}...]}}: the first `per_reason` documents each step removed
    for each reason, text cut to `chars`."""
    out: dict[str, dict[str, list[dict]]] = {}
    for step_dir in sorted((Path(folder) / "removed").glob("*")):
        reasons: dict[str, list[dict]] = {}
        for record in read_shards(step_dir):
            meta = record.get("metadata", {})
            reason = meta.get("filter_reason") or step_dir.name.split("-", 1)[1]
            bucket = reasons.setdefault(reason, [])
            if len(bucket) < per_reason:
                text = record.get("text", "")
                bucket.append({"id": record.get("id"), "source": meta.get("source"),
                               "text": text[:chars] + ("…" if len(text) > chars else ""),
                               **({"task": meta["contaminated_by"]} if "contaminated_by" in meta else {})})
        out[step_dir.name] = reasons
    return out


def funnel_plot(steps: list[dict]) -> bytes:
    """Documents and tokens left after each step, as two bar charts."""
    from matplotlib.figure import Figure

    from slimlm.eval.report import png_bytes

    names = ["input"] + [s["step"] for s in steps]
    docs = [steps[0]["docs_in"]] + [s["docs_out"] for s in steps]
    tokens = [steps[0]["tokens_in"]] + [s["tokens_out"] for s in steps]
    fig = Figure(figsize=(9, 1.2 + 0.45 * len(names)), layout="constrained")
    for k, (values, what) in enumerate(((docs, "documents"), (tokens, "tokens"))):
        ax = fig.add_subplot(1, 2, k + 1)
        bars = ax.barh(range(len(names)), values, color="#4c72b0")
        ax.set_yticks(range(len(names)), names if k == 0 else [""] * len(names))
        ax.invert_yaxis()
        ax.set_title(f"{what} left after each step")
        for bar, v in zip(bars, values):
            share = v / values[0] if values[0] else 0
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,} ({share:.0%})", va="center",
                    fontsize=8)
        ax.set_xlim(0, max(values) * 1.35 or 1)
    return png_bytes(fig)


def write_report(folder: Path) -> Path:
    """folder/report.html from curate.json and removed/: funnel plot, table, removed samples."""
    run = load_run(folder)
    steps, esc = run["funnel"], html.escape
    rows = "".join(
        f"<tr><td>{esc(s['step'])}</td><td>{s['docs_in']:,}</td><td>{s['docs_out']:,}</td>"
        f"<td>{s['tokens_in']:,}</td><td>{s['tokens_out']:,}</td>"
        f"<td>{esc(', '.join(f'{r}: {n:,}' for r, n in sorted(s['removed'].items(), key=lambda x: -x[1])))}</td></tr>"
        for s in steps)
    samples = []
    for label, reasons in removed_samples(folder).items():
        for reason, docs in reasons.items():
            items = "".join(f"<li><code>{esc(str(d['id']))}</code>{' (' + esc(d['task']) + ')' if 'task' in d else ''}"
                            f"<pre>{esc(d['text'])}</pre></li>" for d in docs)
            samples.append(f"<h3>{esc(label)}: {esc(reason)}</h3><ul>{items}</ul>")
    picture = base64.b64encode(funnel_plot(steps)).decode() if steps else ""
    kept = steps[-1]["docs_out"] if steps else run["input"]["documents"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>slimlm curate</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,td:last-child{{text-align:left}}
pre{{white-space:pre-wrap;background:#f6f6f6;padding:6px;font-size:12px}}</style></head><body>
<h1>slimlm curate: {esc(run['recipe']['source'])}</h1>
<p>{esc(run['recipe'].get('description', ''))}</p>
<p>{run['input']['documents']:,} documents ({run['input']['tokens']:,} tokens, counted with
{esc(run['recipe']['tokenizer'])}) from {run['input']['files']} files; {kept:,} kept; {len(run['input']['skipped'])}
records skipped as unreadable; {run['seconds']:.1f} s.</p>
<img alt="funnel" src="data:image/png;base64,{picture}">
<table><tr><th>step</th><th>docs in</th><th>docs out</th><th>tokens in</th><th>tokens out</th><th>removed, by reason</th></tr>
{rows}</table>
<h2>What each step removed (first examples per reason)</h2>
{''.join(samples) or '<p>nothing</p>'}
</body></html>"""
    out = folder / "report.html"
    out.write_text(page)
    return out
