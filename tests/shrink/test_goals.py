"""The judgement of candidates: proxy dominance, floors and budgets, computed by hand here."""

from __future__ import annotations

import pytest

from slimlm.errors import SlimlmError
from slimlm.shrink.goals import Goals, final_misses, proxy_dominated, quality


def _c(cid, size, kl, tps=100.0):
    return {"id": cid, "size_bytes": size, "fidelity": {"kl_mean": kl}, "probe_tps": tps}


def test_proxy_dominance_keeps_only_the_front():
    built = [_c("small-bad", 80, 0.30), _c("mid-good", 100, 0.05), _c("mid-worse", 110, 0.10),
             _c("big-best", 140, 0.01), _c("twin", 100, 0.05)]
    out = proxy_dominated(built)
    # mid-worse is larger and further from the parent than mid-good; twin equals mid-good (listed later)
    assert out == {"mid-worse": "mid-good", "twin": "mid-good"}


def test_a_faster_candidate_is_not_dominated_by_a_smaller_closer_but_slower_one():
    built = [_c("fast", 110, 0.10, tps=200.0), _c("slow", 100, 0.05, tps=100.0)]
    assert proxy_dominated(built) == {}


def test_floors_and_budgets_name_every_miss():
    parent = {"scores": {"t": {"score": 0.40, "higher_is_better": True, "primary": "acc"},
                         "p": {"score": 10.0, "higher_is_better": False, "primary": "perplexity"}}}
    cand = {"size_bytes": 50 * 1024 * 1024, "fidelity": {"kl_mean": 0.2},
            "scores": {"t": {"score": 0.36, "higher_is_better": True, "primary": "acc"},
                       "p": {"score": 12.5, "higher_is_better": False, "primary": "perplexity"}},
            "systems": {"peak_rss_bytes": 600 * 1024 * 1024, "decode_tps": {"median": 40.0}}}
    # kept: 0.36 / 0.40 = 0.9 on t, 10 / 12.5 = 0.8 on p
    assert quality(cand, parent) == pytest.approx(0.85)
    goals = Goals(quality_floor=0.85, max_kl=0.1, max_memory_mib=500, max_size_mib=60, min_tokens_per_s=50)
    misses = final_misses(cand, parent, goals)
    assert any(m.startswith("p: perplexity") for m in misses)  # 0.8 < 0.85
    assert not any(m.startswith("t:") for m in misses)  # 0.9 >= 0.85
    assert any("KL 0.2000 > 0.1" in m for m in misses)
    assert any("peak memory 600 MiB > 500" in m for m in misses)
    assert any("decode 40 tok/s < 50" in m for m in misses)
    assert not any("size" in m for m in misses)  # 50 MiB <= 60
    assert final_misses(cand, parent, Goals(quality_floor=0.8)) == []


@pytest.mark.parametrize("bad", [dict(quality_floor=1.5), dict(quality_floor=0), dict(prefer="cheap"),
                                 dict(max_size_mib=-1), dict(time_budget_s=0)])
def test_bad_goals_are_one_line_errors(bad):
    with pytest.raises(SlimlmError) as info:
        Goals(**bad).validate()
    assert "\n" not in str(info.value)
