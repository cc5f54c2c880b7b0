"""`slimlm ledger`: what the requests `slimlm serve` answered cost, what routing saved, what the
privacy guard did, and (`ledger list`) each request on its own. Parsing and printing only; the
figures come from slimlm.serve.ledger."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import app, out
from slimlm.cli.choices import default_command_group
from slimlm.errors import SlimlmError

ledger_app = typer.Typer(
    cls=default_command_group("summary"), no_args_is_help=False,
    help="What `slimlm serve` answered: `slimlm ledger [--since 7d]` sums it up (cost, savings, latency, privacy); "
         "`slimlm ledger list [--route large] [--since 1h]` shows each request, with why it went where it went.")
app.add_typer(ledger_app, name="ledger")

DbOpt = typer.Option(None, "--db", help="The ledger: a file path or a SQLAlchemy URL (default: ledger.db under "
                     "your data folder).")
SinceOpt = typer.Option(None, "--since", help="Only requests since then: 24h, 7d, 30m, or a date such as 2025-01-31.")
JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout and nothing else.")


def _open(db: str | None):
    from slimlm.serve.ledger import Ledger, default_ledger_path

    target = db or str(default_ledger_path())
    if "://" not in target and not Path(target).expanduser().exists():
        raise SlimlmError(f"no ledger at {target}: `slimlm serve` writes one as it answers requests, "
                          "or pass --db PATH_OR_URL")
    return Ledger(target)


@ledger_app.command("summary")
def summary(db: Optional[str] = DbOpt, since: Optional[str] = SinceOpt, as_json: bool = JsonOpt):
    """Requests served, share answered locally, money and energy saved, latency percentiles, and
    how many requests with personal data the privacy guard kept local, redacted or let through.

    Example: slimlm ledger --since 7d
    """
    from slimlm.serve.ledger import since_label

    book = _open(db)
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
        table.add_row("privacy guard", ", ".join(f"{kind} {n:,}" for kind, n in s["privacy"].items()))
    out.print(table)


@ledger_app.command("list")
def list_requests(db: Optional[str] = DbOpt, since: Optional[str] = SinceOpt,
                  route: Optional[str] = typer.Option(None, "--route", help="Only this route: local, large or "
                                                      "local-fallback."),
                  limit: int = typer.Option(50, "--limit", help="Show the newest N (0: all)."),
                  as_json: bool = JsonOpt):
    """One line per request: when, where it ran, why, and what the privacy guard decided.

    Example: slimlm ledger list --route large --since 1h
    """
    from slimlm.serve.ledger import privacy_outcome

    if limit < 0:
        raise SlimlmError(f"--limit must be 0 (all) or more (got {limit})")
    book = _open(db)
    try:
        rows = book.rows(since, route)
    finally:
        book.close()
    rows = rows[-limit:] if limit else rows
    for r in rows:
        r["privacy_outcome"] = privacy_outcome(r)
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table(title=f"{len(rows)} requests" + (f" on route {route}" if route else ""))
    for name in ("time", "route", "reason", "privacy", "model", "tokens in/out", "latency"):
        table.add_column(name, justify="right" if name in ("tokens in/out", "latency") else "left")
    for r in rows:
        privacy = r["privacy"] or "-"
        if r["privacy_outcome"]:
            privacy = f"{r['privacy_outcome']} ({privacy})"
        table.add_row(datetime.fromtimestamp(r["time"]).isoformat(sep=" ", timespec="seconds"), r["route"],
                      r["reason"] or "", privacy, r["model_large"] if r["route"] == "large" else (r["model_local"] or ""),
                      f"{r['tokens_in']}/{r['tokens_out']}", _ms(r["latency_s"]))
    out.print(table)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"
