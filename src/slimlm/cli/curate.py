"""`slimlm curate`: parsing and printing only; the pipeline is slimlm.curate.

Two forms, as the issue of record asks: `slimlm curate [RECIPE] IN... --out DIR` runs a recipe,
`slimlm curate inspect DIR` shows what a run removed. The first is the group's default command
(`run`), so a recipe path never has to be preceded by a subcommand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimlm.cli.app import app, out
from slimlm.cli.choices import default_command_group
from slimlm.curate import CURATE_STEPS, EXECUTORS, preset_names

curate_app = typer.Typer(
    cls=default_command_group("run"), no_args_is_help=True,
    help="Curate a corpus: keep the best documents, remove duplicates, personal data and eval questions.\n\n"
         "slimlm curate [RECIPE] IN... --out DIR    run a recipe (or --preset web|code|chat|docs)\n\n"
         "slimlm curate inspect DIR                 what each step removed, and why\n\n"
         f"Steps a recipe can use: {CURATE_STEPS.describe()}.")
app.add_typer(curate_app, name="curate")


def _funnel_table(funnel: list[dict], title: str) -> Table:
    table = Table(title=title)
    for name in ("step", "docs in", "docs out", "tokens in", "tokens out", "removed (by reason)"):
        table.add_column(name, justify="left" if name in ("step", "removed (by reason)") else "right")
    for s in funnel:
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(s["removed"].items(), key=lambda x: -x[1]))
        table.add_row(s["step"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", f"{s['tokens_in']:,}",
                      f"{s['tokens_out']:,}", reasons)
    return table


@curate_app.command("run")
def run(
    paths: list[str] = typer.Argument(..., help="RECIPE.yaml (unless --preset) then the input files or folders: "
                                      ".txt/.md (a document each), .jsonl (a record per line: --field, or chat "
                                      "`messages`), .parquet (--field column)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="The folder to write: data/ (kept documents), removed/ "
                                 "(each step's, with the reason), curate.json, report.html."),
    preset: Optional[str] = typer.Option(None, "--preset", help=f"A shipped recipe instead of a file: "
                                         f"{', '.join(preset_names())} (slimlm/curate/presets/)."),
    field: str = typer.Option("text", "--field", help="The text field of JSONL records / column of Parquet files."),
    on_error: str = typer.Option("fail", "--on-error", help="An unreadable file or record: fail (name it and stop) "
                                 "or skip (report it and go on)."),
    tasks: int = typer.Option(4, "--tasks", help="Shards the corpus is split into (datatrove tasks)."),
    workers: int = typer.Option(0, "--workers", help="Processes at once (0: one per CPU core)."),
    executor: str = typer.Option("local", "--executor", help=f"{' or '.join(EXECUTORS)}: this machine's cores, or a "
                                 "Ray cluster (--address)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (--executor ray); none: "
                                          "start a local Ray."),
    output_format: str = typer.Option("jsonl", "--format", help="Output shards: jsonl (gzip) or parquet."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Count tokens with this model's tokenizer "
                                            "(or `words`); default: the recipe's."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists; start over an unfinished run of "
                               "another recipe."),
    as_json: bool = typer.Option(False, "--json", help="Print curate.json on stdout and nothing else."),
):
    """Run a curation recipe over your documents; a killed run continues where it stopped when rerun.

    \b
    Example: slimlm curate --preset web crawl/ --out curated/
    Your own: slimlm curate my-recipe.yaml tickets.jsonl --field body --out curated/
    """
    from slimlm.curate import RunOptions, curate, load_recipe

    if preset is None and len(paths) < 2:
        raise typer.BadParameter("give a recipe file and at least one input, or --preset NAME and the inputs")
    recipe = load_recipe(preset if preset is not None else paths[0])
    inputs = paths if preset is not None else paths[1:]
    if tokenizer:
        recipe.tokenizer = tokenizer
    options = RunOptions(text_field=field, on_error=on_error, tasks=tasks, workers=workers, executor=executor,
                         address=address, output_format=output_format)
    result = curate(recipe, inputs, out_dir, options, force=force,
                    say=(lambda line: None) if as_json else (lambda line: out.print(line, markup=False)))
    if as_json:
        print((out_dir / "curate.json").read_text())
        return
    out.width = max(out.width, 120)
    kept = result.funnel[-1]["docs_out"]
    out.print(_funnel_table(result.funnel, f"slimlm curate {recipe.source}: {result.input['documents']:,} -> "
                            f"{kept:,} documents in {result.seconds:.1f} s"))
    for step in result.funnel:  # what a scoring step measured about itself
        metrics, cut = step.get("details", {}).get("metrics"), step.get("details", {}).get("cut")
        if metrics:
            out.print(f"  {step['step']}: grader F1 at grade 3 = {metrics['f1_at_3']:.3f}, mean abs. error "
                      f"{metrics['mae']:.2f} on {metrics['held_out']} held-out grades", markup=False)
        if cut:
            out.print(f"  {step['step']}: kept {cut['key']} {'<=' if cut['lower_is_better'] else '>='} {cut['cut']:.3f}",
                      markup=False)
    for line in result.skipped[:5]:
        out.print(f"  skipped {line}", markup=False, soft_wrap=True)
    out.print(f"kept: {out_dir / 'data'}", markup=False, soft_wrap=True)
    out.print(f"report: {out_dir / 'report.html'}   what was removed: slimlm curate inspect {out_dir}", markup=False,
              soft_wrap=True)


@curate_app.command("inspect")
def inspect(
    folder: Path = typer.Argument(..., help="The --out folder of a finished `slimlm curate` run."),
    step: Optional[str] = typer.Option(None, "--step", help="Only this step (its name or label, e.g. near_dedup)."),
    n: int = typer.Option(3, "-n", help="Examples per step and reason."),
    chars: int = typer.Option(300, "--chars", help="Characters of each example shown."),
    as_json: bool = typer.Option(False, "--json", help="Print the samples as JSON."),
):
    """What each step of a curation run removed, and why: the funnel and examples per reason."""
    from slimlm.curate import load_run, removed_samples

    run = load_run(folder)
    samples = removed_samples(folder, per_reason=n, chars=chars)
    if step:
        samples = {k: v for k, v in samples.items() if step in (k, k.split("-", 1)[1])}
    if as_json:
        print(json.dumps(samples, indent=1, ensure_ascii=False))
        return
    out.width = max(out.width, 120)
    out.print(_funnel_table(run["funnel"], f"{folder}: {run['recipe']['source']}"))
    for label, reasons in samples.items():
        for reason, docs in reasons.items():
            out.print(f"\n[bold]{label}[/bold] removed for [bold]{reason}[/bold]:")
            for d in docs:
                task = f" (overlaps {d['task']})" if "task" in d else ""
                out.print(f"  {d['id']}{task}: {d['text']!r}", markup=False, soft_wrap=True)


@app.command()
def synth(
    teacher: str = typer.Option(..., "--teacher", help="Who writes: a model slimlm loads (folder, .gguf, built-in "
                                "name) or an OpenAI-compatible URL (…/v1)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="The folder to write: train.jsonl (chat records for "
                                 "finetune/distill), synth.json, and curate's data/, removed/, report.html."),
    mode: str = typer.Option("textbook", "--mode", help="textbook: passages from topic x audience x format prompts; "
                             "qa: question/answer pairs grounded in --docs."),
    n: int = typer.Option(100, "--n", help="textbook: passages to write; qa: passages of your documents to ask about."),
    topics: Optional[Path] = typer.Option(None, "--topics", help="textbook: a file with one topic per line "
                                          "(default: the titles of Python's reference topics)."),
    docs: Optional[list[str]] = typer.Option(None, "--docs", help="qa: files or folders (.txt, .md, .jsonl, "
                                             ".parquet); repeat for several."),
    k: int = typer.Option(3, "--k", help="qa: question/answer pairs per passage."),
    audiences: Optional[list[str]] = typer.Option(None, "--audience", help="textbook: repeat for several "
                                                  "(default: high school, college, professionals, curious adults)."),
    formats: Optional[list[str]] = typer.Option(None, "--style", help="textbook: repeat for several (default: "
                                                "textbook section, tutorial, exercises with solutions, article)."),
    prompt: Optional[Path] = typer.Option(None, "--prompt", help="Your own template file ({topic} {audience} "
                                          "{format}, or {text} {k} for qa)."),
    max_tokens: int = typer.Option(768, "--max-tokens", help="The teacher's longest answer."),
    batch: int = typer.Option(4, "--batch", help="Prompts sent at once to a URL teacher (kept after each batch)."),
    teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="The `model` name sent to a URL."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="The environment variable holding the "
                                              "URL's API key (never pass a key as an argument)."),
    seed: int = typer.Option(0, "--seed", help="Which prompts of the grid, in which order."),
    tokenizer: str = typer.Option("smollm2-135m-instruct", "--tokenizer", help="Counts tokens in the report "
                                  "(or `words`)."),
    executor: str = typer.Option("local", "--executor", help="Where the dedup and decontamination run: local or ray."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (--executor ray)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
):
    """Have a teacher write textbook-style passages or grounded Q/A pairs, then dedupe and decontaminate them.

    \b
    Resumable: answers are kept as they arrive; rerun the same command after a kill or an outage.
    Example: slimlm synth --teacher gemma3-270m --n 50 --out synth/
    Grounded: slimlm synth --teacher http://127.0.0.1:8080/v1 --mode qa --docs handbook/ --out qa/
    """
    from slimlm.curate.synth import AUDIENCES, FORMATS, SynthOptions
    from slimlm.curate.synth import synth as do_synth

    options = SynthOptions(mode=mode, n=n, topics=str(topics) if topics else None, docs=list(docs or []), k=k,
                           audiences=list(audiences or AUDIENCES), formats=list(formats or FORMATS),
                           max_tokens=max_tokens, batch=batch, prompt=str(prompt) if prompt else None, seed=seed,
                           teacher_model=teacher_model, api_key_env=api_key_env, tokenizer=tokenizer,
                           executor=executor, address=address)
    summary = do_synth(teacher, out_dir, options, force=force, say=lambda line: out.print(line, markup=False))
    out.print(f"{summary['prompts']} prompts -> {summary['records']} records -> {summary['kept']} kept after dedup "
              "and decontamination", markup=False)
    out.print(f"train on it: slimlm finetune MODEL --data {out_dir / 'train.jsonl'} --out ./lora", markup=False,
              soft_wrap=True)
