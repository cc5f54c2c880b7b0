"""Energy and cost: the RAPL reader on a fake sysfs tree, the CPU-time estimate, and the
formulas checked against hand computation."""

from __future__ import annotations

import time

import pytest

from slimlm.errors import SlimlmError
from slimlm.eval.cost import (
    SHIPPED_PRICES,
    CostConfig,
    EnergyMeter,
    api_cost_per_1m,
    energy_reader,
    load_api_prices,
    local_cost_per_1m,
)


def _domain(root, name, energy_uj, max_uj=1_000_000):
    d = root / name
    d.mkdir()
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d / "energy_uj"


def test_rapl_reader_sums_packages_only_and_handles_wrap(tmp_path):
    pkg0 = _domain(tmp_path, "intel-rapl:0", 999_000)  # about to wrap
    pkg1 = _domain(tmp_path, "intel-rapl:1", 100)
    sub = _domain(tmp_path, "intel-rapl:0:0", 5)  # a sub-domain of package 0: must not be counted
    reader = energy_reader(tmp_path)
    assert reader is not None and len(reader.domains) == 2
    before = reader.read()
    pkg0.write_text("4000\n")  # wrapped: 1_000 uJ to the top, then 4_000 more
    pkg1.write_text("2100\n")
    sub.write_text("900000\n")
    after = reader.read()
    assert reader.delta_j(before, after) == pytest.approx((1_000 + 4_000 + 2_000) / 1e6)


def test_meter_uses_rapl_when_readable(tmp_path):
    pkg = _domain(tmp_path, "intel-rapl:0", 10_000, max_uj=10**12)
    meter = EnergyMeter(root=tmp_path).start()
    pkg.write_text(str(10_000 + 2_500_000))
    meter.sample()
    pkg.write_text(str(10_000 + 3_000_000))
    meter.stop()
    assert meter.source == "measured (RAPL)"
    assert meter.joules == pytest.approx(3.0)


def test_no_reader_without_counters_or_when_unreadable(tmp_path):
    assert energy_reader(tmp_path) is None  # no powercap tree at all
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "energy_uj").write_text("not a number")
    (d / "max_energy_range_uj").write_text("100")
    assert energy_reader(tmp_path) is None


def test_estimate_is_cpu_seconds_times_watts_per_core(tmp_path):
    config = CostConfig(cpu_watts_per_core=12.5)
    meter = EnergyMeter(config, root=tmp_path)  # empty tree: RAPL unreadable, so an estimate
    cpu0 = time.process_time()
    with meter:
        x = 0
        while time.process_time() - cpu0 < 0.2:  # CPU time, not wall: the machine may be busy
            x += 1
        time.sleep(0.4)  # idle wall time: must cost nothing in a CPU-time estimate
    cpu = time.process_time() - cpu0
    assert meter.source.startswith("estimated") and "12.5 W/core" in meter.source
    assert cpu > 0.1 and meter.seconds > cpu + 0.3  # the loop burned CPU; the sleep did not
    assert meter.joules == pytest.approx(cpu * 12.5, rel=0.1, abs=0.05 * 12.5)


def test_local_cost_by_hand():
    config = CostConfig(cpu_watts_per_core=10, hardware_usd=3000, lifetime_years=2, electricity_usd_per_kwh=0.30)
    out = local_cost_per_1m(seconds_per_token=0.02, joules_per_token=5.0, config=config)
    seconds = 0.02 * 1e6  # 20,000 s for 1M tokens
    hardware = 3000 / (2 * 365.25 * 86400) * seconds
    kwh = 5.0 * 1e6 / 3.6e6
    assert out["hardware_usd"] == pytest.approx(hardware)
    assert out["hardware_usd"] == pytest.approx(0.950643, rel=1e-5)  # 3000 / 63,115,200 s × 20,000 s
    assert out["energy_kwh"] == pytest.approx(1.388889, rel=1e-5)
    assert out["energy_usd"] == pytest.approx(kwh * 0.30)
    assert out["total_usd"] == pytest.approx(hardware + kwh * 0.30)


def test_api_cost_for_a_known_mix_by_hand():
    prices = {"models": {"a": {"input": 1.0, "output": 4.0}, "b": {"input": 0.15, "output": 0.60}}}
    out = api_cost_per_1m(input_tokens=300, output_tokens=100, prices=prices)
    assert out["a"] == pytest.approx(0.75 * 1.0 + 0.25 * 4.0)  # 1.75
    assert out["b"] == pytest.approx(0.75 * 0.15 + 0.25 * 0.60)
    assert api_cost_per_1m(0, 10, prices["models"])["a"] == pytest.approx(4.0)
    with pytest.raises(SlimlmError):
        api_cost_per_1m(0, 0, prices)


def test_shipped_price_table_loads():
    table = load_api_prices()
    assert table["as_of"] and table["currency"] == "USD" and "1M" in table["unit"]
    assert table["models"]["gpt-4o-mini"] == {"input": 0.15, "output": 0.60}
    assert len(table["models"]) >= 5
    assert all(p["output"] >= p["input"] > 0 for p in table["models"].values())
    assert load_api_prices(SHIPPED_PRICES)["models"] == table["models"]


@pytest.mark.parametrize("text", [
    "as_of: 2025-01\nmodels: [unclosed",  # not YAML
    "- just\n- a list\n",  # not a mapping
    "models:\n  x: {input: 1, output: 2}\n",  # no as_of
    "as_of: '2025-01'\nmodels:\n  x: {input: cheap, output: 2}\n",  # non-numeric price
    "as_of: '2025-01'\nmodels: {}\n",  # no models
])
def test_malformed_price_table_is_one_clear_error(tmp_path, text):
    bad = tmp_path / "prices.yaml"
    bad.write_text(text)
    with pytest.raises(SlimlmError) as err:
        load_api_prices(bad)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message


def test_missing_price_table_names_the_file(tmp_path):
    with pytest.raises(SlimlmError, match="nope.yaml does not exist"):
        load_api_prices(tmp_path / "nope.yaml")


def test_bad_cost_settings_are_rejected():
    with pytest.raises(SlimlmError, match="lifetime_years"):
        local_cost_per_1m(0.01, 1.0, CostConfig(lifetime_years=0))
    with pytest.raises(SlimlmError, match="cpu_watts_per_core"):
        EnergyMeter(CostConfig(cpu_watts_per_core=-1))
