"""`slimlm ledger`: what the requests `slimlm serve` answered cost, and what routing saved.
Parsing and printing only; the figures come from slimlm.serve.ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import app, out
from slimlm.errors import SlimlmError


@app.command()
def ledger(
    db: Optional[str] = typer.Option(None, "--db", help="The ledger: a file path or a SQLAlchemy URL "
                                     "(default: ledger.db under your data folder)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only requests since then: 24h, 7d, 30m, or a "
                                        "date such as 2025-01-31."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Requests served, share answered locally, money and energy saved, latency percentiles.

    Example: slimlm ledger --since 7d
    """
    from slimlm.serve.ledger import Ledger, default_ledger_path, since_label

    target = db or str(default_ledger_path())
    if "://" not in target and not Path(target).expanduser().exists():
        raise SlimlmError(f"no ledger at {target}: `slimlm serve` writes one as it answers requests, "
                          "or pass --db PATH_OR_URL")
    book = Ledger(target)
    try:
        s = book.summary(since)
    finally:
        book.close()
    if as_json:
        print(json.dumps(s, default=str))
        return
    table = Table(title=f"slimlm ledger ({since_label(s['since'])}) — {s['url']}", show_header=False, box=None)
    table.add_row("requests", f"{s['count']:,}")
    if s["count"]:
        table.add_row("answered locally", f"{s['local_share']:.1%}")
        table.add_row("routes", ", ".join(f"{route} {n:,}" for route, n in s["by_route"].items() if n))
        table.add_row("tokens", f"{s['tokens_in']:,} in, {s['tokens_out']:,} out")
        saved = f"${s['money_saved_usd']:.4f} (large-model list prices as of {s['prices_as_of']})"
        if s["unpriced"]:
            saved += f"; {s['unpriced']} local requests had no large-model price"
        table.add_row("money saved", saved)
        table.add_row("spent on the large model", f"${s['large_spent_usd']:.4f}")
        energy = s["energy_saved_j"]
        table.add_row("energy saved", "unknown (not measured)" if energy is None else f"{energy:,.1f} J")
        table.add_row("latency p50 / p95 / p99", " / ".join(_ms(s[f"latency_p{q}_s"]) for q in (50, 95, 99)))
        table.add_row("time to first token p50", _ms(s["ttft_p50_s"]))
    out.print(table)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"
