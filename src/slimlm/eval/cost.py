"""Energy and money: what a measured workload costs on this machine, and at an API's prices.

The point of running a small model locally is often cost, so slimlm puts a number on it, but
every number here rests on inputs slimlm cannot measure (what the machine cost, how long it
will serve, what electricity costs, what a provider charges). Those inputs live in one
`CostConfig` whose defaults are stated ASSUMPTIONS, echoed in every result beside the figures
they produced, so a reader can see what to change rather than trust a bare dollar amount.

Energy is the one input that can sometimes be measured: Linux exposes the CPU's RAPL energy
counters under /sys/class/powercap. Since 2020 most kernels make them root-only (a side-channel
fix), so the usual case is an estimate from the process's CPU time times a power figure per
busy core. Every energy figure carries a label saying which of the two it is.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slimlm.errors import SlimlmError

SHIPPED_PRICES = Path(__file__).with_name("api_prices.yaml")
POWERCAP = Path("/sys/class/powercap")
SECONDS_PER_YEAR = 365.25 * 24 * 3600
JOULES_PER_KWH = 3.6e6


@dataclass
class CostConfig:
    """Inputs to the cost figures. Every default is an ASSUMPTION, not a measurement."""

    # ASSUMPTION: ~10 W per fully busy core is typical of desktop and server x86 cores under an
    # all-core load (package power / cores); laptops draw less, big server parts more.
    cpu_watts_per_core: float = 10.0
    # ASSUMPTION: a $1,500 machine (a capable desktop or a small server).
    hardware_usd: float = 1500.0
    # ASSUMPTION: written off over 3 years.
    lifetime_years: float = 3.0
    # ASSUMPTION: $0.15 per kWh, roughly a US average retail price.
    electricity_usd_per_kwh: float = 0.15
    # None means the table shipped with slimlm (api_prices.yaml, dated by its `as_of`).
    api_prices: Path | None = None

    def validate(self) -> CostConfig:
        for name in ("cpu_watts_per_core", "hardware_usd", "electricity_usd_per_kwh"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise SlimlmError(f"cost setting {name} must be a number >= 0 (got {value})")
        if not math.isfinite(self.lifetime_years) or self.lifetime_years <= 0:
            raise SlimlmError(f"cost setting lifetime_years must be > 0 (got {self.lifetime_years})")
        return self

    def assumptions(self) -> dict:
        """The inputs as printed beside every cost figure (JSON-serialisable)."""
        d = asdict(self)
        d["api_prices"] = str(self.api_prices or SHIPPED_PRICES)
        return d


# -- API price table ----------------------------------------------------------------------------
def load_api_prices(path: str | Path | None = None) -> dict:
    """The per-token price table: {as_of, source, currency, unit, models: {name: {input, output}}}.

    `path` None reads the table shipped with slimlm. A missing or malformed file is a one-line
    SlimlmError naming the file and the fix, since it is a file users are told to edit.
    """
    import yaml

    file = Path(path).expanduser() if path is not None else SHIPPED_PRICES
    fix = f"fix it, or start again from a copy of {SHIPPED_PRICES}"
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlimlmError(f"API price table {file} does not exist: pass an existing YAML file "
                          f"(the shipped one is {SHIPPED_PRICES})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimlmError(f"API price table {file} cannot be read as YAML ({first}): {fix}") from None
    if not isinstance(data, dict):
        raise SlimlmError(f"API price table {file} is not a mapping with as_of and models: {fix}")
    if not data.get("as_of"):
        raise SlimlmError(f"API price table {file} has no as_of date (when its prices were taken): {fix}")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise SlimlmError(f"API price table {file} has no models: mapping of name -> {{input, output}}: {fix}")
    clean = {}
    for name, entry in models.items():
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
            and math.isfinite(entry[k]) and entry[k] >= 0 for k in ("input", "output"))
        if not ok:
            raise SlimlmError(f"API price table {file}: model '{name}' needs numeric input and output "
                              f"prices >= 0 (per 1M tokens): {fix}")
        clean[str(name)] = {"input": float(entry["input"]), "output": float(entry["output"])}
    return {"as_of": str(data["as_of"]), "source": str(data.get("source", "")),
            "currency": str(data.get("currency", "USD")), "unit": str(data.get("unit", "per 1M tokens")),
            "models": clean, "path": str(file)}


def api_cost_per_1m(input_tokens: int, output_tokens: int, prices: dict) -> dict[str, float]:
    """USD per 1M tokens of the measured input:output mix, for each model in the table.

    Per 1M *total* tokens, the same basis as `local_cost_per_1m`, so the two compare directly:
    (input share x input price + output share x output price). `prices` is the table from
    load_api_prices or just its `models` mapping.
    """
    total = input_tokens + output_tokens
    if input_tokens < 0 or output_tokens < 0 or total <= 0:
        raise SlimlmError(f"cannot price a workload of {input_tokens} input and {output_tokens} output tokens")
    models = prices.get("models", prices)
    return {name: (input_tokens * p["input"] + output_tokens * p["output"]) / total
            for name, p in models.items()}


# -- local cost ---------------------------------------------------------------------------------
def local_cost_per_1m(seconds_per_token: float, joules_per_token: float, config: CostConfig) -> dict:
    """USD per 1M tokens on this machine: hardware written off over its life, plus electricity.

    The hardware part assumes the machine does nothing but this workload, around the clock, for
    its whole life: the cheapest it can be. A machine busy 10% of the time costs 10x that part.
    Every value is per 1M tokens, `seconds` included (machine time to process them).
    """
    config.validate()
    seconds = seconds_per_token * 1e6
    hardware = config.hardware_usd / (config.lifetime_years * SECONDS_PER_YEAR) * seconds
    kwh = joules_per_token * 1e6 / JOULES_PER_KWH
    energy = kwh * config.electricity_usd_per_kwh
    return {"hardware_usd": hardware, "energy_usd": energy, "total_usd": hardware + energy,
            "energy_kwh": kwh, "seconds": seconds}


# -- energy -------------------------------------------------------------------------------------
class RaplReader:
    """Cumulative CPU-package energy from the RAPL counters (intel-rapl:N; AMD uses the same).

    Only package domains are summed: their sub-domains (cores, uncore, dram) are parts of them.
    Each counter wraps at max_energy_range_uj (a few hundred kJ, tens of minutes at full load),
    so readings must be taken more often than that; `delta_j` corrects a single wrap.
    """

    def __init__(self, domains: list[tuple[Path, int]]) -> None:
        self.domains = domains  # (energy_uj file, max_energy_range_uj)

    def read(self) -> list[int]:
        return [int(f.read_text().strip()) for f, _ in self.domains]

    def delta_j(self, before: list[int], after: list[int]) -> float:
        total = 0
        for (_, wrap), a, b in zip(self.domains, before, after):
            total += b - a if b >= a else wrap - a + b
        return total / 1e6


def energy_reader(root: str | Path | None = None) -> RaplReader | None:
    """A RaplReader if the package energy counters under `root` can be read, else None."""
    base = Path(root) if root is not None else POWERCAP
    domains = []
    try:
        for d in sorted(base.glob("intel-rapl:*")):
            if d.name.count(":") != 1:  # intel-rapl:0:1 and the like are sub-domains
                continue
            energy, wrap = d / "energy_uj", d / "max_energy_range_uj"
            int(energy.read_text().strip())  # root-only on most kernels: then no reader
            domains.append((energy, int(wrap.read_text().strip())))
    except (OSError, ValueError):
        return None
    return RaplReader(domains) if domains else None


def _cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)


class EnergyMeter:
    """Energy used between start() and stop(), measured by RAPL or estimated from CPU time.

    RAPL counts the whole CPU package (other processes too) and the estimate counts only this
    process, CPU only: neither includes a GPU. Call sample() between steps of a long run so a
    RAPL counter wrap is never missed.
    """

    def __init__(self, config: CostConfig | None = None, root: str | Path | None = None) -> None:
        self.config = (config or CostConfig()).validate()
        self.reader = energy_reader(root)
        self.joules = self.seconds = self.cpu_seconds = 0.0

    @property
    def source(self) -> str:
        if self.reader is not None:
            return "measured (RAPL)"
        return f"estimated (CPU time × {self.config.cpu_watts_per_core:g} W/core)"

    @property
    def measured(self) -> bool:
        return self.reader is not None

    def start(self) -> EnergyMeter:
        self.joules = 0.0
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()
        self._last = self.reader.read() if self.reader else None
        return self

    def sample(self) -> None:
        if self.reader is not None:
            now = self.reader.read()
            self.joules += self.reader.delta_j(self._last, now)
            self._last = now

    def stop(self) -> EnergyMeter:
        self.sample()
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = _cpu_seconds() - self._cpu
        if self.reader is None:
            self.joules = self.cpu_seconds * self.config.cpu_watts_per_core
        return self

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
