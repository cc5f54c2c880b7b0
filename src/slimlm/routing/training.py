"""`slimlm router train` as a library call: label a prompts file with both models' answers, split
it, fit the learned router, calibrate its threshold, and write router.json and labels.jsonl.

The split is made once, by seed, and written into labels.jsonl (each row's "split"), so
`slimlm router eval` later scores the router on exactly the prompts it was not fitted on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from slimlm.data import read_prompts
from slimlm.errors import SlimlmError
from slimlm.routing.curves import curve_auc, random_curve, router_curve
from slimlm.routing.features import FEATURES
from slimlm.routing.labels import label_rows
from slimlm.routing.learned import LearnedRouter


def split_rows(rows: list[dict], holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Mark each row's "split" ("train" or "holdout", a `holdout` share of them, chosen by `seed`)
    and return (train rows, held-out rows), each in file order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_hold = int(round(holdout * len(rows)))
    for rank, i in enumerate(order):
        rows[i]["split"] = "holdout" if rank < n_hold else "train"
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "holdout"]


def train_router(prompts: str | Path, small: str, large: str, out_dir: str | Path, *, large_model: str | None = None,
                 api_key_env: str | None = None, scorer: str = "token_f1", max_tokens: int = 64,
                 holdout: float = 0.25, target_escalation: float | None = None, target_quality: float | None = None,
                 seed: int = 0, features: str = "minilm-static", remote_client: Callable | None = None) -> dict:
    """Label, split, fit, calibrate and write; returns what `slimlm router train --json` prints:
    counts, the share the small model handles, calibration, held-out and random AUC, the files
    written and the threshold."""
    if features not in FEATURES:
        *others, last = FEATURES
        raise SlimlmError(f"--features {features!r}: choose {', '.join(others)} or {last}")
    if not 0 <= holdout < 1:
        raise SlimlmError(f"--holdout must be in [0, 1) (got {holdout})")
    rows = label_rows(read_prompts(prompts), small, large, large_model, api_key_env, scorer, max_tokens,
                      remote_client)
    train_rows, held = split_rows(rows, holdout, seed)
    router = LearnedRouter(features=features).fit([r["prompt"] for r in train_rows], [r["label"] for r in train_rows])
    router.meta.update(small=small, large=large_model or large, scorer=scorer)
    result = {"prompts": len(rows), "train": len(train_rows), "holdout": len(held),
              "small_good_enough": sum(r["label"] for r in rows) / len(rows)}
    if target_escalation is not None or target_quality is not None:
        if not held:
            raise SlimlmError("calibration needs held-out prompts: set --holdout above 0")
        router.calibrate([r["prompt"] for r in held], [r["label"] for r in held], target_escalation, target_quality)
        result["calibration"] = router.meta["calibration"]
    if held:
        scores = router.score([r["prompt"] for r in held])
        sq, lq = [r["small_quality"] for r in held], [r["large_quality"] for r in held]
        result.update(holdout_auc=curve_auc(router_curve(scores, sq, lq)), random_auc=curve_auc(random_curve(sq, lq)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["router"] = str(router.save(out_dir / "router.json"))
    labels_file = out_dir / "labels.jsonl"
    labels_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result.update(labels=str(labels_file), threshold=router.threshold)
    return result
