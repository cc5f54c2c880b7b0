"""The seeds' claim, measured (bench/curate.py --part claim): "keep only the best 10%".

LoRA fine-tunes of the built-in SmolLM2-135M-Instruct on three slices of one corpus, then each
scored on clean held-out text and on a multiple-choice task:
- top 10%: the corpus through `slimlm curate` with the `quality` step (FineWeb-Edu's recipe: a
  grader, a MiniLM-embedding regressor trained on its grades, every document scored, the best
  `keep` fraction kept);
- random 10%: as many documents, drawn at random from the same corpus;
- all: the whole corpus, so about ten times the tokens.
The top and random slices train for the same number of tokens (`max_tokens`, one pass over the
top slice); "all" trains one pass over everything.

The corpus is bench/curate_mix.py's labelled mix (good python-docs paragraphs and English prose;
generated boilerplate, spam, word salad, duplicates, non-English text, documents with eval items
inside), first deduplicated and decontaminated by the same steps for every slice, so the
multiple-choice task's questions are in none of them.

The grader is simulated, and that is a limit of this benchmark, said here and in its rows: no
offline model on this machine grades educational value usefully (SmolLM2-135M answers the
rubric at random), so a sample of the corpus is graded from its labels (good writing and copies
of it 4; boilerplate, spam, word salad and non-English text 0), which is what a good teacher would
say of this mix. What is measured is the rest of the
recipe: whether the regressor generalises those grades to the whole corpus, and whether the
slice it keeps trains a better model per token than a random one.

Held-out text: good documents from the same sources that are not in the mix. Multiple choice:
the built-in `multiple_choice:pydoc` task (questions written from Python's reference docs).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

# Labels whose text is good writing: copies of good documents, and good documents with an eval item
# inside (decontamination removes those before any grading matters). Graded 4; everything else 0.
GOOD_TEXT = {"good", "exact_dup", "near_dup", "contaminated"}


def _jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _kept(folder: Path) -> list[dict]:
    from slimlm.curate.ingest import read_shards

    return list(read_shards(folder / "data"))


def _slices(rows: list[dict], work: Path, keep: float, sample: int) -> tuple[dict, dict]:
    """{name: [texts]} for top / random / all, and what the quality step reported."""
    from slimlm.curate import RunOptions, curate, load_recipe

    src = _jsonl([{"text": r["text"]} for r in rows], work / "in" / "mix.jsonl")
    rng = random.Random(0)
    graded = rng.sample(rows, min(sample, len(rows)))
    grades = _jsonl([{"text": r["text"], "grade": 4 if r["label"] in GOOD_TEXT else 0} for r in graded],
                    work / "grades.jsonl")
    base = ["normalize", "exact_dedup", "near_dedup", "decontaminate"]
    out = {}
    for name, steps in (("all", base), ("top", [*base, {"quality": {"annotations": str(grades), "keep": keep}}])):
        folder = work / f"curated-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        recipe = load_recipe({"description": f"claim: {name}", "tokenizer": "smollm2-135m-instruct", "steps": steps})
        curate(recipe, [src], folder, RunOptions(tasks=2), force=True, say=lambda _: None)
        out[name] = [d["text"] for d in _kept(folder)]
        if name == "top":
            report = json.loads((folder / "curate.json").read_text())
    out["random"] = random.Random(1).sample(out["all"], len(out["top"]))
    label = {r["text"]: r["label"] for r in rows}
    info = {name: {"documents": len(texts), "good_share": sum(label.get(t) in GOOD_TEXT for t in texts) / len(texts)}
            for name, texts in out.items()}
    info["quality"] = next((s for s in report.get("funnel", []) if s.get("step") == "quality"), {})
    return out, info


def _count_tokens(texts: list[str]) -> int:
    from transformers import AutoTokenizer

    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    tok = AutoTokenizer.from_pretrained(str(dense_folder(resolve("smollm2-135m-instruct"))))
    return sum(len(tok(t)["input_ids"]) for t in texts)


def claim(rows: list[dict], held_out: list[str], work: Path, keep: float = 0.1, sample: int = 300,
          mc_limit: int = 200, seq_len: int = 256) -> list[str]:
    from slimlm.eval import evaluate
    from slimlm.train.core import TrainConfig
    from slimlm.train.finetune import finetune

    slices, info = _slices(rows, work, keep, sample)
    text_file = work / "held_out.txt"
    text_file.write_text("\n\n".join(held_out))
    budget = _count_tokens(slices["top"])
    arms = {"base model (no fine-tune)": None, "top 10% by quality": ("top", budget),
            "random 10%": ("random", budget), "all (deduplicated, decontaminated)": ("all", None)}
    lines = ["| trained on | documents | good share | tokens trained | train s | held-out ppl | pydoc MC acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    results = {}
    for arm, spec in arms.items():
        model, tokens, seconds, docs, share = "smollm2-135m-instruct", 0, 0.0, "–", "–"
        if spec is not None:
            name, max_tokens = spec
            data = _jsonl([{"text": t} for t in slices[name]], work / f"train-{name}.jsonl")
            out = work / f"lora-{name}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            result = finetune("smollm2-135m-instruct", data, out, method="lora", merge=True, seq_len=seq_len,
                              eval_fraction=0.05, record_run=False, force=True,
                              train=TrainConfig(lr=2e-4, epochs=1.0 if max_tokens is None else 20.0,
                                                max_tokens=max_tokens, batch_size=4, eval_every=0, save_every=0,
                                                seed=0))
            seconds = time.perf_counter() - start
            model, tokens = str(result.out), result.train.tokens
            docs, share = info[name]["documents"], f"{info[name]['good_share']:.2f}"
            print(f"  {arm}: {tokens} tokens in {seconds:.0f} s", flush=True)
        ppl = evaluate(model, f"perplexity:{text_file}", backend="torch", context=seq_len * 2, record=False,
                       systems=False).score
        mc = evaluate(model, "multiple_choice:pydoc", backend="torch", limit=mc_limit, record=False,
                      systems=False).score
        results[arm] = (ppl, mc)
        print(f"  {arm}: held-out ppl {ppl:.2f}, MC {mc:.3f}", flush=True)
        lines.append(f"| {arm} | {docs} | {share} | {tokens:,} | {seconds:.0f} | {ppl:.2f} | {mc:.3f} |")
    top, rnd, full = (results[a] for a in list(arms)[1:])
    q = info["quality"]
    grader, cut = q.get("details", {}).get("metrics", {}), q.get("details", {}).get("cut", {})
    lines += ["", f"- top vs random 10% at equal tokens: held-out ppl {top[0]:.2f} vs {rnd[0]:.2f}, MC {top[1]:.3f} vs "
              f"{rnd[1]:.3f}; top 10% vs all ({info['all']['documents']} documents): ppl {top[0]:.2f} vs {full[0]:.2f}, "
              f"MC {top[1]:.3f} vs {full[1]:.3f}",
              f"- the quality step: {q.get('docs_in')} documents in, {q.get('docs_out')} kept ({cut.get('key')} >= "
              f"{cut.get('cut')}); its regressor ({grader.get('features')} features) on {grader.get('held_out')} "
              f"held-out graded documents: F1 at grade 3 {grader.get('f1_at_3', float('nan')):.3f}, mean absolute "
              f"error {grader.get('mae', float('nan')):.2f}"]
    return lines
