"""`slimlm router eval` as a library call: each policy's quality-vs-escalation curve on labelled
rows, against a random router and an oracle.

Every curve is drawn on the same rows (the held-out split of `router train`, unless all rows are
asked for), so the areas under them compare: the learned routers from their scores, the cascade
metrics from the small model's answer log-probs stored with the labels, the oracle from each
answer's known quality (an upper bound), and the random line between all-local and all-large.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slimlm.data import read_prompts
from slimlm.errors import SlimlmError
from slimlm.routing.curves import curve_auc, plot_curves, random_curve, router_curve
from slimlm.routing.labels import label_rows
from slimlm.routing.learned import LearnedRouter
from slimlm.routing.policies import METRICS, CascadePolicy


def policy_curves(rows: list[dict], routers: list[str | Path] = ()) -> dict[str, list[tuple[float, float]]]:
    """Curves by policy name: "learned" (or "learned:PATH" for several), "cascade:METRIC" where
    the rows hold the log-probs the metric needs, "oracle" and "random"."""
    prompts = [r["prompt"] for r in rows]
    sq, lq = [r["small_quality"] for r in rows], [r["large_quality"] for r in rows]
    curves = {}
    for path in routers:
        name = "learned" if len(routers) == 1 else f"learned:{path}"
        curves[name] = router_curve(LearnedRouter.load(path).score(prompts), sq, lq)
    if all(r.get("small_logprobs") is not None for r in rows):
        for metric in METRICS:
            cascade = CascadePolicy(0.0, metric=metric)
            if metric == "entropy" and not all(r.get("small_top_logprobs") for r in rows if r["small_logprobs"]):
                continue
            scores = [cascade.confidence(r["small_logprobs"], r.get("small_top_logprobs")) for r in rows]
            curves[f"cascade:{metric}"] = router_curve(scores, sq, lq)
    curves["oracle"] = router_curve([s - b for s, b in zip(sq, lq)], sq, lq)
    curves["random"] = random_curve(sq, lq)
    return curves


def evaluate_router(data: str | Path, routers: list[str | Path] = (), *, small: str | None = None,
                    large: str | None = None, large_model: str | None = None, api_key_env: str | None = None,
                    scorer: str = "token_f1", max_tokens: int = 64, use_all: bool = False,
                    plot: str | Path | None = None, remote_client: Callable | None = None) -> dict:
    """Curves and their areas on `data` (labels.jsonl from `router train`, or prompts that are
    answered here with `small` and `large`); returns what `slimlm router eval --json` prints."""
    rows = read_prompts(data)
    if not all("small_quality" in r and "large_quality" in r for r in rows):
        if not (small and large):
            raise SlimlmError(f"{data} has no answers scored yet: pass --small and --large to answer it")
        rows = label_rows(rows, small, large, large_model, api_key_env, scorer, max_tokens, remote_client)
    held = [r for r in rows if r.get("split") == "holdout"]
    if held and not use_all:
        rows, split = held, "held-out rows"
    else:
        split = "all rows"
    curves = policy_curves(rows, list(routers))
    result = {"prompts": len(rows), "split": split, "all_local": curves["random"][0][1],
              "all_large": curves["random"][-1][1],
              "policies": {k: {"auc": curve_auc(c), "curve": c} for k, c in curves.items()}}
    if plot:
        plot_curves(curves, Path(plot))
        result["plot"] = str(plot)
    return result
