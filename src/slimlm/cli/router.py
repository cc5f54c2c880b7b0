"""`slimlm router train` and `slimlm router eval`: fit the learned router on your own prompts,
and show how each routing policy trades escalation for quality. Parsing, calling slimlm.routing
and printing only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import app, out

router_app = typer.Typer(no_args_is_help=True, help="Train the learned router on your prompts, and compare "
                         "routing policies by quality vs. share sent to the large model.")
app.add_typer(router_app, name="router")


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
    from slimlm.routing import train_router
    from slimlm.serve.upstream import Upstream

    result = train_router(prompts, small, large, out_dir, large_model=large_model, api_key_env=api_key_env,
                          scorer=scorer, max_tokens=max_tokens, holdout=holdout, target_escalation=target_escalation,
                          target_quality=target_quality, seed=seed, features=features, remote_client=Upstream)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"router: {small} vs {large_model or large}", show_header=False, box=None)
    table.add_row("prompts", f"{result['prompts']} ({result['train']} train, {result['holdout']} held out)")
    table.add_row("small model good enough", f"{result['small_good_enough']:.1%} (scorer {scorer})")
    table.add_row("features", features)
    table.add_row("threshold", f"{result['threshold']:.3f}")
    if "holdout_auc" in result:
        table.add_row("held-out AUC", f"{result['holdout_auc']:.3f} (random router {result['random_auc']:.3f})")
    table.add_row("wrote", f"{result['router']}, {result['labels']}")
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
    from slimlm.routing import RATES, evaluate_router, quality_at
    from slimlm.serve.upstream import Upstream

    result = evaluate_router(data, routers, small=small, large=large, large_model=large_model, api_key_env=api_key_env,
                             scorer=scorer, max_tokens=max_tokens, use_all=use_all, plot=plot, remote_client=Upstream)
    curves = {name: policy["curve"] for name, policy in result["policies"].items()}
    if as_json:
        print(json.dumps(result))
        return
    table = Table("to large", *(name.replace(":", "\n") for name in curves),
                  title=f"quality vs. share sent to the large model, {result['prompts']} {result['split']} of {data}")
    columns = [quality_at(c, RATES) for c in curves.values()]
    for i, rate in enumerate(RATES):
        table.add_row(f"{rate:.0%}", *(f"{col[i]:.3f}" for col in columns))
    table.add_row("AUC", *(f"{result['policies'][k]['auc']:.3f}" for k in curves), style="bold")
    out.print(table)
    out.print("[dim]oracle: knows each answer's quality (an upper bound); random: escalates at random.[/dim]")
    if plot:
        out.print(f"wrote {plot}")

