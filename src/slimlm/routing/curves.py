"""How a router is judged: its quality-vs-escalation curve.

Escalating prompts in order of the router's doubt, how fast does quality climb from all-local
to all-large? A router that knows nothing is the straight line between the two
(`random_curve`); the area under the curve (`curve_auc`) is the one number to compare routers by.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

RATES = [i / 10 for i in range(11)]  # the escalation rates `slimlm router eval` tabulates


def router_curve(policy_scores: Sequence[float], small_quality: Sequence[float],
                 large_quality: Sequence[float]) -> list[tuple[float, float]]:
    """(escalation rate, mean quality) as prompts are sent up in order of increasing score
    (the policy's confidence in the small model). Points are taken only between distinct
    scores, so the straight segments across a run of ties are exactly the expected curve
    under random tie-breaking: a constant policy gives the random-router line."""
    s, sq, lq = (np.asarray(a, dtype=np.float64) for a in (policy_scores, small_quality, large_quality))
    if not (len(s) == len(sq) == len(lq)) or len(s) == 0:
        raise SlimlmError("router_curve needs one score, small quality and large quality per prompt")
    n = len(s)
    order = np.argsort(s, kind="stable")
    gained = np.concatenate([[0.0], np.cumsum((lq - sq)[order])])
    ranked = s[order]
    ks = [0] + [k for k in range(1, n) if ranked[k] != ranked[k - 1]] + [n]
    return [(k / n, float((sq.sum() + gained[k]) / n)) for k in ks]


def random_curve(small_quality: Sequence[float], large_quality: Sequence[float],
                 points: int = 11) -> list[tuple[float, float]]:
    """The expected curve of a router that escalates at random: a straight line between the
    all-local and the all-large quality."""
    lo, hi = float(np.mean(small_quality)), float(np.mean(large_quality))
    return [(r, lo + r * (hi - lo)) for r in np.linspace(0.0, 1.0, points).tolist()]


def curve_auc(curve: Sequence[tuple[float, float]]) -> float:
    """Area under a quality-vs-escalation curve (trapezoid rule over escalation 0..1)."""
    rates, quality = zip(*curve)
    return float(np.trapezoid(quality, rates))


def quality_at(curve: Sequence[tuple[float, float]], rates: Sequence[float]) -> list[float]:
    """The curve read at the given escalation rates (linear between its points)."""
    xs, ys = zip(*curve)
    return np.interp(rates, xs, ys).tolist()


def plot_curves(curves: dict[str, Sequence[tuple[float, float]]], path: Path) -> None:
    """The curves to a PNG, the two reference lines (random, oracle) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        xs, ys = zip(*curve)
        ax.plot(xs, ys, linestyle="--" if name in ("random", "oracle") else "-", label=name)
    ax.set(xlabel="share sent to the large model", ylabel="mean quality", title="router: quality vs. escalation")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
