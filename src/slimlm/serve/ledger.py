"""The ledger: one row per request `slimlm serve` answered, and what routing saved.

The claim behind a router is "most requests can be answered by the small local model, at a
fraction of the cost, without hurting quality". The ledger is where that claim is checked:
every request is recorded with the route it took and why, its tokens, latency and time to the
first token, what it cost locally and what the *same tokens* would have cost at the large
model's price (from the API price table slimlm ships with `slimlm eval`, so the two commands
agree on prices). `summary()` turns that into the figures `slimlm ledger` prints.

It is written on SQLAlchemy Core so any database URL works: a local SQLite file by default,
Postgres when several servers share one ledger.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from pathlib import Path

from slimlm.errors import SlimlmError

ROUTES = ("local", "large", "local-fallback")  # local-fallback: the large model failed, local answered
LOCAL_ROUTES = ("local", "local-fallback")
COLUMNS = ("time", "route", "reason", "model_local", "model_large", "tokens_in", "tokens_out", "latency_s",
           "ttft_s", "local_cost_usd", "large_cost_usd", "energy_j", "large_energy_j", "privacy")
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def default_ledger_path() -> Path:
    """ledger.db under slimlm's data folder (beside the run registry)."""
    from slimlm.paths import data_dir

    return data_dir() / "ledger.db"


def to_url(url_or_path: str | Path | None) -> str:
    """A SQLAlchemy URL from a URL, a file path, or None (the default ledger)."""
    if url_or_path is None:
        url_or_path = default_ledger_path()
    text = str(url_or_path)
    if "://" in text:
        return text
    path = Path(text).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def parse_since(value: str | float | datetime | None) -> float | None:
    """An epoch time from '24h', '7d', '30m', an ISO date or time, a datetime, or epoch seconds."""
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, datetime):
        return value.timestamp()
    match = _SINCE.match(value)
    if match:
        return time.time() - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise SlimlmError(f"--since {value!r} is not a duration or a date: use e.g. 24h, 7d, 30m or "
                          "2025-01-31") from None


def large_cost_usd(model: str | None, tokens_in: int, tokens_out: int, prices: dict) -> float | None:
    """What the tokens cost at `model`'s list price, or None when the table does not know it.

    Names are matched as given, then without a provider prefix ("openai/gpt-4o"), then by the
    longest table name the model starts with ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini").
    """
    from slimlm.eval.cost import api_cost_per_1m

    if not model:
        return None
    table = prices.get("models", prices)
    name = model if model in table else model.rsplit("/", 1)[-1]
    if name not in table:
        prefixes = [n for n in table if name.startswith(n)]
        if not prefixes:
            return None
        name = max(prefixes, key=len)
    if tokens_in + tokens_out == 0:
        return 0.0
    per_1m = api_cost_per_1m(tokens_in, tokens_out, {name: table[name]})[name]
    return per_1m * (tokens_in + tokens_out) / 1e6


class Ledger:
    """The `requests` table at a SQLAlchemy URL (or a file path, made a SQLite URL)."""

    def __init__(self, url: str | Path | None = None, prices: str | Path | None = None) -> None:
        import sqlalchemy as sa
        from sqlalchemy.pool import StaticPool

        from slimlm.eval.cost import load_api_prices

        self.url = to_url(url)
        self.prices = load_api_prices(prices)
        kwargs = {}
        if self.url in ("sqlite://", "sqlite:///:memory:"):  # one shared connection, or each sees its own db
            kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        try:
            self.engine = sa.create_engine(self.url, **kwargs)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise SlimlmError(f"cannot open the ledger at {self.url} ({exc}): pass a file path or a "
                              "SQLAlchemy URL such as sqlite:///ledger.db") from None
        meta = sa.MetaData()
        self.table = sa.Table(
            "requests", meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("time", sa.Float, nullable=False, index=True),  # epoch seconds
            sa.Column("route", sa.String(16), nullable=False),
            sa.Column("reason", sa.Text, nullable=False, default=""),
            sa.Column("model_local", sa.String(200)), sa.Column("model_large", sa.String(200)),
            sa.Column("tokens_in", sa.Integer, nullable=False, default=0),
            sa.Column("tokens_out", sa.Integer, nullable=False, default=0),
            sa.Column("latency_s", sa.Float), sa.Column("ttft_s", sa.Float),
            sa.Column("local_cost_usd", sa.Float), sa.Column("large_cost_usd", sa.Float),
            sa.Column("energy_j", sa.Float), sa.Column("large_energy_j", sa.Float),
            sa.Column("privacy", sa.String(200)),
        )
        try:
            meta.create_all(self.engine)
        except sa.exc.OperationalError as exc:
            raise SlimlmError(f"cannot open the ledger at {self.url} ({str(exc).splitlines()[0]}): check the "
                              "path or URL and its permissions") from None

    def record(self, **row) -> None:
        """Add one request. `time` defaults to now; `large_cost_usd` to the large model's list
        price for the same tokens (None if the price table does not know the model)."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise TypeError(f"unknown ledger column(s) {sorted(unknown)}; known: {', '.join(COLUMNS)}")
        if row.get("route") not in ROUTES:
            raise SlimlmError(f"ledger route must be one of {', '.join(ROUTES)} (got {row.get('route')!r})")
        row.setdefault("time", time.time())
        row.setdefault("reason", "")
        row["tokens_in"], row["tokens_out"] = int(row.get("tokens_in") or 0), int(row.get("tokens_out") or 0)
        if row.get("large_cost_usd") is None:
            row["large_cost_usd"] = large_cost_usd(row.get("model_large"), row["tokens_in"], row["tokens_out"],
                                                   self.prices)
        with self.engine.begin() as conn:
            conn.execute(self.table.insert().values(**row))

    def on_record(self, rec: dict) -> None:
        """`record` for a server's per-request dict: keys that are not ledger columns (endpoint,
        status...) are left out, so it can be plugged in as ServeConfig.on_record as is."""
        self.record(**{k: v for k, v in rec.items() if k in COLUMNS})

    def rows(self, since: str | float | datetime | None = None, route: str | None = None) -> list[dict]:
        """Recorded requests, oldest first; `since` as parse_since takes it, `route` one of ROUTES."""
        import sqlalchemy as sa

        query = sa.select(self.table).order_by(self.table.c.time)
        start = parse_since(since)
        if start is not None:
            query = query.where(self.table.c.time >= start)
        if route is not None:
            if route not in ROUTES:
                raise SlimlmError(f"--route {route!r}: choose one of {', '.join(ROUTES)}")
            query = query.where(self.table.c.route == route)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def summary(self, since: str | float | datetime | None = None) -> dict:
        """Count, share answered locally, money and energy saved, latency percentiles.

        Money saved is, over requests answered locally, the large model's price for their tokens
        minus what they cost here; requests whose large price is unknown add nothing. Energy saved
        is the same over requests where both energies are known, else None.
        """
        import numpy as np

        rows = self.rows(since)
        local = [r for r in rows if r["route"] in LOCAL_ROUTES]
        priced = [r for r in local if r["large_cost_usd"] is not None]
        energies = [r for r in local if r["energy_j"] is not None and r["large_energy_j"] is not None]

        def pct(key: str, q: float) -> float | None:
            values = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
            return float(np.percentile(values, q)) if values else None

        return {
            "count": len(rows),
            "by_route": {route: sum(r["route"] == route for r in rows) for route in ROUTES},
            "local_share": len(local) / len(rows) if rows else None,
            "tokens_in": sum(r["tokens_in"] for r in rows), "tokens_out": sum(r["tokens_out"] for r in rows),
            "money_saved_usd": sum(r["large_cost_usd"] - (r["local_cost_usd"] or 0.0) for r in priced),
            "large_spent_usd": sum(r["large_cost_usd"] or 0.0 for r in rows if r["route"] == "large"),
            "local_cost_usd": sum(r["local_cost_usd"] or 0.0 for r in local),
            "unpriced": len(local) - len(priced),
            "energy_saved_j": sum(r["large_energy_j"] - r["energy_j"] for r in energies) if energies else None,
            "latency_p50_s": pct("latency_s", 50), "latency_p95_s": pct("latency_s", 95),
            "latency_p99_s": pct("latency_s", 99), "ttft_p50_s": pct("ttft_s", 50),
            "privacy": privacy_counts(rows),
            "since": parse_since(since), "prices_as_of": self.prices["as_of"], "url": safe_url(self.url),
        }

    def close(self) -> None:
        self.engine.dispose()


def privacy_outcome(row: dict) -> str | None:
    """What the privacy guard did to one recorded request: 'kept local' (personal data found, the
    request was answered here instead of by the large model), 'redacted' (sent with placeholders),
    'allowed' (sent to the large model with nothing found, or with the guard off), or None (the
    request was never going to leave: answered locally with no guard verdict)."""
    privacy = row.get("privacy") or ""
    found = bool(privacy) and not privacy.endswith("nothing found")
    if row["route"] == "large":
        return "redacted" if found else "allowed"
    if found and (row.get("reason") or "").startswith("privacy:"):
        return "kept local"
    return None


def privacy_counts(rows: list[dict]) -> dict[str, int]:
    """How many requests the privacy guard kept local, redacted, or allowed to leave."""
    outcomes = [privacy_outcome(r) for r in rows]
    return {kind: outcomes.count(kind) for kind in ("kept local", "redacted", "allowed")}


def safe_url(url: str) -> str:
    """The URL without a password, for printing."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def since_label(since: float | None) -> str:
    if since is None:
        return "all time"
    return f"since {datetime.fromtimestamp(since).isoformat(timespec='minutes')}"


__all__ = ["COLUMNS", "Ledger", "ROUTES", "default_ledger_path", "large_cost_usd", "parse_since", "privacy_counts",
           "privacy_outcome", "to_url"]
