"""`slimlm router train` and `slimlm router eval`: fit the learned router on your own prompts,
and show how each routing policy trades escalation for quality. Parsing, answering and
printing only; the policies and curves are in slimlm.serve.router."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import app, out
from slimlm.errors import SlimlmError

router_app = typer.Typer(no_args_is_help=True, help="Train the learned router on your prompts, and compare "
                         "routing policies by quality vs. share sent to the large model.")
app.add_typer(router_app, name="router")
RATES = [i / 10 for i in range(11)]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; each needs a non-empty "prompt"."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SlimlmError(f"cannot read {path} ({exc.strerror or exc}): pass a JSONL file with a "
                          "\"prompt\" per line") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise SlimlmError(f"{path}:{number} is not JSON: one object per line, "
                              "e.g. {\"prompt\": \"...\"}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SlimlmError(f"{path}:{number} has no \"prompt\" text: each line needs one")
        rows.append(row)
    if not rows:
        raise SlimlmError(f"{path} has no prompts: one JSON object with a \"prompt\" per line")
    return rows


def answer_logprobs(engine, prompt: str, answer: str, top: int = 5):
    """The local answer's token log-probs (and the top-k at each step) by one teacher-forced
    forward pass, for the cascade policy; None when the backend does not expose its model."""
    if not all(hasattr(engine, a) for a in ("model", "tokenizer", "device")):
        return None, None
    import torch

    prompt_ids = engine.tokenize(engine.prompt_text(prompt))
    answer_ids = engine.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    if not answer_ids:
        return [], []
    ids = torch.tensor([prompt_ids + answer_ids], device=engine.device)
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(-1, torch.tensor(answer_ids, device=lp.device)[:, None])[:, 0]
    return chosen.tolist(), lp.topk(min(top, lp.shape[-1]), dim=-1).values.tolist()


def _answerers(small: str, large: str, large_model: Optional[str], api_key_env: Optional[str], max_tokens: int):
    """(small engine, small answer fn, large answer fn, close fn)."""
    from slimlm.models.backends import GenerationParams, open_backend

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0).validate()
    engine = open_backend(small)

    def local(e):
        return lambda prompt: e.generate(prompt, params).text

    if not large.startswith(("http://", "https://")):
        large_engine = engine if large == small else open_backend(large)
        return engine, local(engine), local(large_engine), lambda: None
    import asyncio

    from slimlm.serve.upstream import Upstream

    if not large_model:
        raise SlimlmError("--large is a URL: name the model to ask for with --large-model")
    loop = asyncio.new_event_loop()
    upstream = Upstream(large, api_key_env=api_key_env)

    def remote(prompt: str) -> str:
        body = {"model": large_model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0}
        answer = loop.run_until_complete(upstream.chat(body))
        return (answer.get("choices") or [{}])[0].get("message", {}).get("content") or ""

    def close():
        loop.run_until_complete(upstream.aclose())
        loop.close()

    return engine, local(engine), remote, close


def label_rows(rows: list[dict], small: str, large: str, large_model=None, api_key_env=None,
               scorer: str = "token_f1", max_tokens: int = 64) -> list[dict]:
    """Answer each row with both models and add answers, qualities, label and log-probs."""
    from slimlm.serve.router import build_labels

    engine, small_fn, large_fn, close = _answerers(small, large, large_model, api_key_env, max_tokens)
    try:
        refs = [r.get("references", r.get("reference")) for r in rows]
        labels = build_labels([r["prompt"] for r in rows], refs, small_fn, large_fn, scorer)
    finally:
        close()
    labelled = []
    for i, row in enumerate(rows):
        lps, top = answer_logprobs(engine, row["prompt"], labels.small_answers[i])
        labelled.append({**row, "small_answer": labels.small_answers[i], "large_answer": labels.large_answers[i],
                         "small_quality": labels.small_quality[i], "large_quality": labels.large_quality[i],
                         "label": labels.labels[i], "small_logprobs": lps, "small_top_logprobs": top})
    return labelled


@router_app.command("train")
def train(
    prompts: Path = typer.Argument(..., metavar="PROMPTS.jsonl", help="One {\"prompt\", optional \"reference\"} "
                                   "per line."),
    small: str = typer.Option(..., "--small", help="The local model (folder, .gguf or built-in name)."),
    large: str = typer.Option(..., "--large", help="The large model: a local model, or the URL of an "
                              "OpenAI-compatible API (https://.../v1)."),
    large_model: Optional[str] = typer.Option(None, "--large-model", help="Model name to ask a --large URL for."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the "
                                              "--large URL's API key."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write router.json and labels.jsonl to."),
    scorer: str = typer.Option("token_f1", "--scorer", help="exact_match, contains, regex or token_f1."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most tokens per answer."),
    holdout: float = typer.Option(0.25, "--holdout", help="Share of prompts kept out of training, for "
                                  "calibration and `router eval`."),
    target_escalation: Optional[float] = typer.Option(None, "--target-escalation", help="Calibrate the "
                                                      "threshold to send this share to the large model."),
    target_quality: Optional[float] = typer.Option(None, "--target-quality", help="Or: the least escalation "
                                                   "whose held-out quality reaches this."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/held-out split."),
    features: str = typer.Option("minilm-static", "--features", help="What the router reads from a prompt: "
                                 "minilm-static (MiniLM's token vectors, averaged; well under 1 ms), minilm "
                                 "(MiniLM sentence embeddings in context: tens of ms per prompt on a busy 2-core "
                                 "CPU) or hashing (word and character n-grams; no model)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Label your prompts with both models' answers, and fit the learned router on them.

    \b
    Example: slimlm router train prompts.jsonl --small smollm2-135m-instruct \\
             --large https://api.openai.com/v1 --large-model gpt-4o-mini --api-key-env OPENAI_API_KEY --out router/
    """
    from slimlm.serve.router import LearnedRouter, curve_auc, random_curve, router_curve

    if features not in ("minilm-static", "minilm", "hashing"):
        raise SlimlmError(f"--features {features!r}: choose minilm-static, minilm or hashing")
    if not 0 <= holdout < 1:
        raise SlimlmError(f"--holdout must be in [0, 1) (got {holdout})")
    rows = label_rows(read_jsonl(prompts), small, large, large_model, api_key_env, scorer, max_tokens)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_hold = int(round(holdout * len(rows)))
    for rank, i in enumerate(order):
        rows[i]["split"] = "holdout" if rank < n_hold else "train"
    train_rows = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "holdout"]
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
    out_dir.mkdir(parents=True, exist_ok=True)
    result["router"] = str(router.save(out_dir / "router.json"))
    labels_file = out_dir / "labels.jsonl"
    labels_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result.update(labels=str(labels_file), threshold=router.threshold)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"router: {small} vs {large_model or large}", show_header=False, box=None)
    table.add_row("prompts", f"{len(rows)} ({len(train_rows)} train, {len(held)} held out)")
    table.add_row("small model good enough", f"{result['small_good_enough']:.1%} (scorer {scorer})")
    table.add_row("features", features)
    table.add_row("threshold", f"{router.threshold:.3f}")
    if "holdout_auc" in result:
        table.add_row("held-out AUC", f"{result['holdout_auc']:.3f} (random router {result['random_auc']:.3f})")
    table.add_row("wrote", f"{result['router']}, {labels_file}")
    out.print(table)


@router_app.command("eval")
def evaluate(
    data: Path = typer.Argument(..., metavar="LABELS.jsonl", help="labels.jsonl from `router train`, or prompts "
                                "to answer with --small and --large."),
    routers: list[Path] = typer.Option([], "--router", help="A router.json to evaluate (repeatable)."),
    small: Optional[str] = typer.Option(None, "--small", help="Answer unlabelled prompts with this local model."),
    large: Optional[str] = typer.Option(None, "--large", help="...and this large model or URL."),
    large_model: Optional[str] = typer.Option(None, "--large-model"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env"),
    scorer: str = typer.Option("token_f1", "--scorer"),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    use_all: bool = typer.Option(False, "--all", help="Use every row, not only the held-out split."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the curves to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
):
    """Quality vs. share sent to the large model, per policy, against a random router.

    Example: slimlm router eval router/labels.jsonl --router router/router.json --plot curve.png
    """
    from slimlm.serve.router import CascadePolicy, LearnedRouter, curve_auc, quality_at, random_curve, router_curve

    rows = read_jsonl(data)
    if not all("small_quality" in r and "large_quality" in r for r in rows):
        if not (small and large):
            raise SlimlmError(f"{data} has no answers scored yet: pass --small and --large to answer it")
        rows = label_rows(rows, small, large, large_model, api_key_env, scorer, max_tokens)
    held = [r for r in rows if r.get("split") == "holdout"]
    if held and not use_all:
        rows, split = held, "held-out rows"
    else:
        split = "all rows"
    prompts = [r["prompt"] for r in rows]
    sq, lq = [r["small_quality"] for r in rows], [r["large_quality"] for r in rows]
    curves = {}
    for path in routers:
        name = "learned" if len(routers) == 1 else f"learned:{path}"
        curves[name] = router_curve(LearnedRouter.load(path).score(prompts), sq, lq)
    if all(r.get("small_logprobs") is not None for r in rows):
        for metric in ("mean", "min", "entropy"):
            cascade = CascadePolicy(0.0, metric=metric)
            if metric == "entropy" and not all(r.get("small_top_logprobs") for r in rows if r["small_logprobs"]):
                continue
            scores = [cascade.confidence(r["small_logprobs"], r.get("small_top_logprobs")) for r in rows]
            curves[f"cascade:{metric}"] = router_curve(scores, sq, lq)
    curves["oracle"] = router_curve([s - b for s, b in zip(sq, lq)], sq, lq)
    curves["random"] = random_curve(sq, lq)
    result = {"prompts": len(rows), "split": split, "all_local": curves["random"][0][1],
              "all_large": curves["random"][-1][1],
              "policies": {k: {"auc": curve_auc(c), "curve": c} for k, c in curves.items()}}
    if plot:
        _plot(curves, plot)
        result["plot"] = str(plot)
    if as_json:
        print(json.dumps(result))
        return
    table = Table("to large", *(name.replace(":", "\n") for name in curves),
                  title=f"quality vs. share sent to the large model, {len(rows)} {split} of {data}")
    columns = [quality_at(c, RATES) for c in curves.values()]
    for i, rate in enumerate(RATES):
        table.add_row(f"{rate:.0%}", *(f"{col[i]:.3f}" for col in columns))
    table.add_row("AUC", *(f"{result['policies'][k]['auc']:.3f}" for k in curves), style="bold")
    out.print(table)
    out.print("[dim]oracle: knows each answer's quality (an upper bound); random: escalates at random.[/dim]")
    if plot:
        out.print(f"wrote {plot}")


def _plot(curves: dict, path: Path) -> None:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
