"""`slimlm report`: the Pareto front, a self-contained page, PNGs, and no crash on missing numbers."""

from __future__ import annotations

import base64
import math
import re
import time

import pytest

from slimlm.eval import report as report_mod
from slimlm.eval.compare import resolve_runs
from slimlm.eval.report import PLOT_FILES, pareto_front, write_report
from slimlm.hardware import cpu_info
from slimlm.runs import record

PNG = b"\x89PNG\r\n\x1a\n"
MiB = 2**20

# (decode tok/s, perplexity): A fastest; B and its twin E trade speed for quality; C best quality;
# D worst at everything; F is as good as B in quality but slower, so B dominates it.
POINTS = [(80.0, 20.0), (40.0, 15.0), (30.0, 14.0), (20.0, 25.0), (40.0, 15.0), (35.0, 15.0)]


@pytest.mark.parametrize(("hib_x", "hib_y", "expected"), [
    (True, False, [0, 1, 2, 4]),  # speed up, perplexity down: ties (B, E) both stay, F goes
    (True, True, [0, 3]),  # as if y were accuracy: A beats B, C, E, F; D has the best y
    (False, False, [2, 3]),  # as if x were size: D is smallest, C has the best y; C beats A, B, E, F
    (False, True, [3]),  # D is smallest and has the highest y: it dominates everyone
])
def test_pareto_front(hib_x, hib_y, expected):
    assert pareto_front(POINTS, hib_x, hib_y) == expected


def test_pareto_front_edge_cases():
    assert pareto_front([], True, True) == []
    assert pareto_front([(1.0, 1.0)], True, False) == [0]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], True, True) == [0, 1]  # identical points dominate nobody
    assert pareto_front([(math.nan, 1.0), (2.0, 1.0), (1.0, 1.0)], True, True) == [1]  # NaN is never on it


def _systems(decode: float, size_mib: float, cost: float) -> dict:
    return {"backend": "llama.cpp", "precision": "Q4_K_M",
            "decode_tps": {"median": decode, "min": decode, "max": decode},
            "ttft_s": {"median": 0.05, "min": 0.04, "max": 0.06}, "size_bytes": int(size_mib * MiB),
            "peak_rss_bytes": 300 * MiB, "cost_per_1m_tokens_local": cost, "energy_j_per_1k_tokens": 10.0,
            "energy_source": "estimated (CPU time × 10 W/core)",
            "api_cost_per_1m": {"gpt-4o-mini": 0.3, "gpt-4o": 5.0}, "api_prices_as_of": "2025-01-01"}


def _eval(db, model, task, quality, primary, hib, systems) -> int:
    return record(command="eval", model=model, db=db, params={}, metrics={
        "task": task, "kind": "k", "quality": quality, "primary": primary, "higher_is_better": hib,
        "examples": 5, "systems": systems})


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def _assert_self_contained(page: str) -> None:
    low = page.lower()
    for banned in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert banned not in low, banned


def test_full_report(tmp_path):
    db = tmp_path / "runs.db"
    ids = [_eval(db, "smollm2-135m", "perplexity:python-docs", {"perplexity": 20.3, "nll": 3.0}, "perplexity", False,
                 _systems(80.0, 100, 0.01)),
           _eval(db, "/models/qwen-0.5b", "perplexity:python-docs", {"perplexity": 14.0}, "perplexity", False,
                 _systems(30.0, 500, 0.05)),
           _eval(db, "smollm2-135m", "tasks/capitals.yaml", {"acc": 0.4}, "acc", True, _systems(79.0, 100, 0.01))]
    out = tmp_path / "report"
    page_path = write_report(resolve_runs([str(i) for i in ids], db=db), out)
    assert page_path == out.resolve() / "report.html"
    page = page_path.read_text(encoding="utf-8")
    _assert_self_contained(page)
    images = _images(page)
    assert len(images) == 3 and all(img.startswith(PNG) for img in images)
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and data in images  # the page shows exactly the files written
    assert "Skipped" not in page
    for i in ids:
        assert f"#{i} " in page  # every run labels a column
    assert "qwen-0.5b" in page and "20.3" in page and "14.0" in page
    assert time.strftime("%Y-%m-%d") in page and cpu_info().model in page  # footer: date and machine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs.db"]  # no temporary folder left


def test_runs_without_systems_still_give_a_page(tmp_path):
    db = tmp_path / "runs.db"
    ids = [_eval(db, "m-a", "perplexity:python-docs", {"perplexity": 20.0}, "perplexity", False, {}),
           _eval(db, "m-b", "perplexity:python-docs", {"perplexity": 18.0}, "perplexity", False, {"decode_tps": None})]
    out = tmp_path / "out"
    page = write_report(resolve_runs([str(i) for i in ids], db=db), out).read_text(encoding="utf-8")
    _assert_self_contained(page)
    assert _images(page) == [] and page.count("Skipped") == 3
    assert "20.0" in page and "18.0" in page  # the table is still there
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]


def test_bench_runs_get_the_cost_plot_only(tmp_path):
    db = tmp_path / "runs.db"
    ids = [record(command="bench", model=m, metrics={"systems": _systems(d, 100, c)}, db=db)
           for m, d, c in (("m-a", 50.0, 0.02), ("m-b", 25.0, 0.04))]
    out = tmp_path / "out"
    page = write_report(resolve_runs([str(i) for i in ids], db=db), out).read_text(encoding="utf-8")
    assert len(_images(page)) == 1 and page.count("Skipped") == 2
    assert sorted(p.name for p in out.iterdir()) == ["cost_local_vs_api.png", "report.html"]


def test_rewrite_is_atomic_and_drops_stale_plots(tmp_path, monkeypatch):
    db = tmp_path / "runs.db"
    full = _eval(db, "m-a", "perplexity:python-docs", {"perplexity": 20.0}, "perplexity", False,
                 _systems(50.0, 100, 0.02))
    bare = _eval(db, "m-b", "perplexity:python-docs", {"perplexity": 18.0}, "perplexity", False, {})
    out = tmp_path / "out"
    write_report(resolve_runs([str(full)], db=db), out)
    before = (out / "report.html").read_text(encoding="utf-8")

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as m:
        m.setattr(report_mod, "render_html", broken)
        with pytest.raises(RuntimeError):
            write_report(resolve_runs([str(bare)], db=db), out)
    assert (out / "report.html").read_text(encoding="utf-8") == before  # the good page survives a failure
    assert all((out / name).exists() for name in PLOT_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs.db"]  # temporary folder removed

    write_report(resolve_runs([str(bare)], db=db), out)  # no numbers for plots this time
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # last time's PNGs do not linger
