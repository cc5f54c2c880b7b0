#!/usr/bin/env python3
"""Distillation: how much of a pruned model's lost quality each way of training wins back, at equal tokens.

Teacher: the built-in SmolLM2-135M-Instruct (its dense fp32 conversion). Student: `slimlm prune
--method width --keep-params 0.5` of it (MLP channels and attention heads by activation importance,
calibrated on the training text). Training text: python-docs without its last N topics, packed into
--seq-len blocks, of which --tokens worth are taken evenly across the corpus; held-out text: those last
N topics, never seen by pruning or training. Every arm trains the same student with full fine-tuning
for the same steps on the same number of tokens (same seed, schedule and learning rate):

  (a) the pruned student, untrained;
  (b) cross-entropy on the training blocks (plain fine-tuning);
  (c) logit distillation, forward KL against the teacher's cached top-32 (`slimlm distill`);
  (d) sequence-level distillation: the teacher continues the first --prompt-tokens of each training
      block greedily and the student learns those continuations (`slimlm distill --mode sequence`).

Scored by `slimlm eval`'s perplexity with --reference (torch, fp32, context 512) on the held-out
text: perplexity, mean NLL, KL(teacher || student) and top-1 agreement with the teacher. Targets:
(c) closes >= 60% of (a)'s NLL gap to the teacher and beats (b); the teacher cache < 1 KB/token.
Also: training tokens/s of LoRA vs full fine-tuning of the student on this CPU.

    python bench/distill.py [--tokens 32768] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results import append_section  # noqa: E402  (bench/, beside this script)

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.compress.prune import prune
from slimlm.data import calibration_docs, held_out_docs
from slimlm.eval.loglik import make_scorer
from slimlm.eval.perplexity import run_perplexity
from slimlm.models.backends import llama_cpp_available, open_backend
from slimlm.models.loading import dense_folder, load_torch
from slimlm.models.reference import resolve
from slimlm.paths import cache_dir
from slimlm.train.core import TrainConfig, Trainer
from slimlm.train.data import TrainData, encode_text, pack
from slimlm.train.distill import distill
from slimlm.train.finetune import add_adapter, resolve_targets

TEACHER = "smollm2-135m-instruct"
TEACHER_FOLDER: list[Path] = []  # set in main: the teacher is scored by the remembering reference scorer
CONTEXT = 512


def student_folder(teacher: Path, train_docs: list[str], held: int) -> tuple[Path, float]:
    """The width-pruned student, kept in slimlm's cache between runs (pruning is deterministic)."""
    folder = cache_dir() / "bench-distill" / f"student-width-0.5-heldout{held}"
    if (folder / "slimlm.json").exists():
        return folder, 0.0
    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    prune(str(teacher), folder, method="width", target_params=0.5, calib=train_docs, record=False)
    return folder, time.perf_counter() - start


def training_blocks(tokenizer, docs: list[str], seq_len: int, tokens: int) -> list[dict]:
    """`tokens // seq_len` packed blocks spread evenly over the corpus, so every arm sees all topics."""
    blocks = [b for b in pack([encode_text(tokenizer, d) for d in docs], seq_len) if len(b["input_ids"]) == seq_len]
    n = max(1, min(len(blocks), tokens // seq_len))
    return [blocks[round(i * len(blocks) / n)] for i in range(n)]


class Remembered:
    """The teacher's scorer, remembering its answers: every arm is scored against the same windows,
    so the teacher runs over the held-out text once, not once per arm."""

    def __init__(self, scorer):
        self.scorer, self.seen = scorer, {}

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def score(self, requests, want_rows: bool = False):
        key = (tuple((tuple(r.ids), r.start) for r in requests), want_rows)
        if key not in self.seen:
            self.seen[key] = self.scorer.score(requests, want_rows=want_rows)
        return self.seen[key]


def score(folder: Path, reference, docs: list[str]) -> dict:
    engine = open_backend(str(folder), "torch", dtype="float32")
    scorer = reference if folder == TEACHER_FOLDER[0] else make_scorer(engine)
    metrics = run_perplexity(scorer, docs, source="held-out", context=CONTEXT, reference=reference,
                             reference_name=TEACHER).metrics
    engine.close()
    return metrics


def train_ce(student: Path, data: TrainData, config: TrainConfig, out: Path):
    """Arm (b): full fine-tuning with plain next-token cross-entropy, saved like the other arms."""
    model, tok = load_torch(student)
    result = Trainer(model, config, data).train()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return result


def speed(student: Path, data: TrainData, config: TrainConfig, method: str, steps: int) -> float:
    """Median training tokens/s over `steps` optimizer steps after one warm-up step."""
    model, _ = load_torch(student)
    if method == "lora":
        model = add_adapter(model, "lora", 16, 32, 0.0, resolve_targets(model, None))
    trainer = Trainer(model, config, data)
    history = trainer.train().history
    rates = [r["tokens_per_s"] for r in history if "tokens_per_s" in r][1:steps + 1]
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768, help="training tokens per arm (equal for all arms); the "
                    "default runs in about 25 minutes on a quiet 2-core CPU. At 8192 (16 steps) plain "
                    "cross-entropy was still ahead; distillation pulls away as training goes on")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--held-out-topics", type=int, default=3, help="the last N python-docs topics are held out")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="(d): tokens of each block the teacher continues")
    ap.add_argument("--gen-backend", default="llamacpp" if llama_cpp_available() else "torch",
                    help="(d): the teacher's backend for generating its continuations (llamacpp or torch)")
    ap.add_argument("--speed-steps", type=int, default=3, help="steps timed for LoRA vs full tokens/s (0: skip)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t_all, load = time.perf_counter(), os.getloadavg()  # other jobs on the machine slow every number here
    teacher = dense_folder(resolve(TEACHER))
    train_docs, held_docs = calibration_docs(args.held_out_topics), held_out_docs(args.held_out_topics)
    student, prune_s = student_folder(teacher, train_docs, args.held_out_topics)
    tok = load_torch(student)[1]
    blocks = training_blocks(tok, train_docs, args.seq_len, args.tokens)
    data = TrainData(blocks, [], "text", f"python-docs[:-{args.held_out_topics}]", args.seq_len, True)
    steps = max(1, len(blocks) // args.batch_size)
    config = TrainConfig(lr=args.lr, max_steps=steps, batch_size=args.batch_size, eval_every=0, save_every=0,
                         warmup_steps=max(1, steps // 10), seed=0)
    print(f"student {student} (pruned in {prune_s:.0f} s); {len(blocks)} blocks x {args.seq_len} tokens, "
          f"{steps} steps of {args.batch_size}", flush=True)
    reference = Remembered(make_scorer(open_backend(str(teacher), "torch", dtype="float32")))
    TEACHER_FOLDER.append(teacher)
    rows, runs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows["teacher"] = score(teacher, reference, held_docs)
        rows["(a) pruned, untrained"] = score(student, reference, held_docs)
        print("scored teacher and (a)", flush=True)
        start = time.perf_counter()
        runs["b"] = train_ce(student, data, TrainConfig(**{**config.to_dict(), "out": str(tmp / "b")}), tmp / "b")
        runs["b"].seconds = time.perf_counter() - start
        rows["(b) cross-entropy"] = score(tmp / "b", reference, held_docs)
        print(f"(b) {runs['b'].seconds:.0f} s: {rows['(b) cross-entropy']}", flush=True)
        start = time.perf_counter()
        kd = distill(teacher, student, data, tmp / "c", loss="forward_kl", top_k=32, train=config, record_run=False)
        kd.train.seconds = time.perf_counter() - start  # wall time including building (or reusing) the cache
        runs["c"], rows["(c) logit KD, cached top-32"] = kd.train, score(tmp / "c", reference, held_docs)
        print(f"(c) {kd.train.seconds:.0f} s: {rows['(c) logit KD, cached top-32']}", flush=True)
        start = time.perf_counter()
        # llama.cpp answers one prompt at a time but decodes ~4x faster than torch here; it reads the GGUF the
        # dense teacher was converted from (the same weights)
        gen_teacher = TEACHER if args.gen_backend == "llamacpp" else teacher
        answers = cache_dir() / "bench-distill" / (f"answers-{args.gen_backend}-{len(blocks)}x{args.seq_len}-"
                                                   f"p{args.prompt_tokens}-heldout{args.held_out_topics}.jsonl")
        sq = distill(gen_teacher, student, data, tmp / "d", mode="sequence", prompt_tokens=args.prompt_tokens,
                     cache=answers,  # kept between runs, resumable: generating is the slowest part here
                     max_new_tokens=args.seq_len - args.prompt_tokens, gen_batch_size=16, backend=args.gen_backend,
                     train=config, record_run=False)
        sq.train.seconds = time.perf_counter() - start
        runs["d"], rows["(d) sequence KD"] = sq.train, score(tmp / "d", reference, held_docs)
        print(f"(d) {sq.train.seconds:.0f} s: {rows['(d) sequence KD']}", flush=True)
        rates = {}
        if args.speed_steps:
            quick = TrainConfig(lr=args.lr, max_steps=args.speed_steps + 1, batch_size=args.batch_size, eval_every=0,
                                save_every=0)
            for method in ("full", "lora"):
                rates[method] = speed(student, data, TrainConfig(**{**quick.to_dict(), "out": str(tmp / method)}),
                                      method, args.speed_steps)
    a, b, c = rows["(a) pruned, untrained"], rows["(b) cross-entropy"], rows["(c) logit KD, cached top-32"]
    t_nll = rows["teacher"]["nll"]
    closed = (a["nll"] - c["nll"]) / (a["nll"] - t_nll)
    table = ["| arm | training tokens | train + teacher s | held-out ppl | mean NLL | KL vs teacher | "
             "top-1 vs teacher |", "|---|---:|---:|---:|---:|---:|---:|"]
    for (name, m), run in zip(rows.items(), [None, None, runs["b"], runs["c"], runs["d"]]):
        kl = "–" if name == "teacher" else f"{m['kl_mean']:.4f}"
        top = "–" if name == "teacher" else f"{m['top1_agreement']:.1%}"
        tokens = f"{run.tokens:,}" if run else "0"
        seconds = f"{run.seconds:.0f}" if run else "–"
        table.append(f"| {name} | {tokens} | {seconds} | {m['perplexity']:.2f} | {m['nll']:.4f} | {kl} | {top} |")
    verdict = "(c) beats (b)" if c["nll"] < b["nll"] else "(c) does NOT beat (b)"
    lines = [f"(c) closes {closed:.1%} of the NLL gap between (a) ({a['nll']:.3f}) and the teacher ({t_nll:.3f}) "
             f"(target >= 60%: {'met' if closed >= 0.6 else 'NOT met'})",
             f"(c) vs (b) at equal tokens: NLL {c['nll']:.4f} vs {b['nll']:.4f}, KL {c['kl_mean']:.4f} vs "
             f"{b['kl_mean']:.4f}: {verdict} on NLL",
             f"teacher cache: {kd.cache_bytes_per_token:.1f} bytes/token (target < 1024), top-32 ids int32 + "
             "log-probs float16; " + ("reused from an earlier run on the same blocks (not in (c)'s seconds)"
                                      if kd.cache_reused else "built in this run (in (c)'s seconds)"),
             f"(d) trained on {sq.data['train_examples']} packed blocks of teacher continuations "
             f"({'reused from an earlier run' if sq.cache_reused else 'generated by ' + args.gen_backend}; "
             f"{len(blocks)} prompts of {args.prompt_tokens} tokens, greedy, up to "
             f"{args.seq_len - args.prompt_tokens} new tokens; loss on the teacher's tokens only)"]
    if rates:
        lines.append(f"training tokens/s on this CPU, student, batch {args.batch_size} x {args.seq_len}: full "
                     f"{rates['full']:.0f}, LoRA (r16, attention + MLP) {rates['lora']:.0f} "
                     f"({rates['lora'] / rates['full']:.2f}x); no GPU in this run")
    pruned = f" (pruning {prune_s:.0f} s)" if prune_s else " (pruned student reused from the cache)"
    lines.append(f"whole run {time.perf_counter() - t_all:.0f} s{pruned}")
    print("\n".join(table + [""] + lines), flush=True)
    if not math.isfinite(closed) or args.no_write:
        return 0
    description = (f"Teacher {TEACHER} (dense fp32); student: `slimlm prune --method width --keep-params 0.5` of it "
                   f"(MLP and heads, {_params(student)}). Training text: python-docs minus its last "
                   f"{args.held_out_topics} topics, {len(blocks)} packed blocks of {args.seq_len} tokens spread over "
                   f"it; every arm: full fine-tuning, {steps} steps of {args.batch_size} blocks, lr {args.lr:g} "
                   f"cosine, seed 0. Held-out: the last {args.held_out_topics} topics "
                   f"({rows['teacher']['tokens']} tokens), torch fp32, context {CONTEXT}, KL and top-1 against the "
                   "teacher. Seconds: wall time of each arm, with building the teacher cache (c) and generating the "
                   f"teacher's continuations (d) unless reused (see below). Load average (1 min) at start / end: "
                   f"{load[0]:.1f} / {os.getloadavg()[0]:.1f} on 2 cores. "
                   f"Command: `python bench/distill.py --tokens {args.tokens}`.")
    print(f"appended to {append_section('distill', description, table + [''] + [f'- {x}' for x in lines])}")
    return 0


def _params(folder: Path) -> str:
    from slimlm.runs import read_manifest

    m = (read_manifest(folder) or {}).get("metrics", {})
    return f"{m.get('nonembedding_after', 0) / 1e6:.1f}M of {m.get('nonembedding_before', 0) / 1e6:.1f}M " \
           "non-embedding parameters" if m else "?"


if __name__ == "__main__":
    sys.exit(main())
