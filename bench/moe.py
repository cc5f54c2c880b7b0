"""What a mixture of experts buys and costs on this machine: SmolLM2-135M upcycled into 8 experts with
2 active, against the dense parent, trained for the same tokens (issue 19).

Arms, each trained with the same recipe (distillation from the parent, forward KL to its cached
top-32, mixed half and half with cross-entropy; `slimlm moe train` for the MoEs, `slimlm distill`
for the dense control) for the same number of python-docs tokens:
- dense: the parent itself (the control: what the same tokens do without an MoE);
- neurons: `moe upcycle --split neurons` (8 x 768 neurons, 2 active: the parent's MLP cost);
- copy: `moe upcycle --split copy` (8 copies of the parent MLP, 2 active: twice its MLP cost).

Each is scored before and after training on the held-out 10% of the training blocks (the split the
trainer holds out; seed 0) and on python-docs' held-out topics: perplexity, and KL to the parent.
Then: Q8_0 GGUF files of the trained dense and neurons models (slimlm export f16, then llama.cpp's own
llama-quantize) with llama.cpp prefill and decode tokens/s, interleaved, median of 3; expert pruning of
the trained neurons MoE and of a tiny random Mixtral (8, 6, 4, 2 experts kept); `moe stats` on
100k tokens. Everything lands in --work (results.json), so a rerun only does what is missing.

    python bench/moe.py [--tokens 32768] [--work build/bench-moe]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

MODEL = "smollm2-135m-instruct"


class Bench:
    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / "results.json"
        self.results = json.loads(self.path.read_text()) if self.path.exists() else {}

    def step(self, key: str, fn):
        if key not in self.results:
            self.results[key] = fn()
            self.path.write_text(json.dumps(self.results, indent=2, default=str))
            print(f"{key}: {json.dumps(self.results[key], default=str)[:300]}", flush=True)
        return self.results[key]


def score(folder, parent, blocks) -> dict:
    """Perplexity and KL(parent || model) per token over `blocks` (a list of token tensors)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll = kl = n = 0.0
    with torch.no_grad():
        for ids in blocks:
            x = ids[None]
            lq = F.log_softmax(model(x).logits[0, :-1].float(), -1)
            lp = F.log_softmax(parent(x).logits[0, :-1].float(), -1)
            nll += F.nll_loss(lq, ids[1:], reduction="sum").item()
            kl += (lp.exp() * (lp - lq)).sum().item()
            n += len(ids) - 1
    return {"ppl": math.exp(nll / n), "kl": kl / n, "tokens": int(n)}


def train(arm: str, folder: Path, parent_folder: Path, data: Path, out: Path, args) -> dict:
    from slimlm.train.configs import DistillConfig
    from slimlm.train.core import TrainConfig
    from slimlm.train.distill import distill
    from slimlm.train.moe.recover import MoeTrainConfig, moe_train

    tc = TrainConfig(lr=args.lr, max_tokens=args.tokens, batch_size=4, eval_every=0, save_every=0, seed=0)
    dc = DistillConfig(weight_ce=0.5, seq_len=args.seq_len, train=tc)
    start = time.perf_counter()
    if arm == "dense":
        result = distill(str(parent_folder), str(folder), str(data), out, dc, force=True, record_run=False)
    else:
        result = moe_train(str(folder), str(data), out, teacher=str(parent_folder),
                           config=MoeTrainConfig(distill=dc), force=True, record_run=False)
    run = result.train
    return {"tokens": run.tokens, "steps": run.steps, "seconds": time.perf_counter() - start,
            "train_seconds": run.seconds, "tokens_per_s": run.tokens / max(run.seconds, 1e-9),
            "eval_loss": run.eval_loss}


def q8_file(folder: Path, work: Path, name: str) -> dict:
    import llama_tools

    from slimlm.compress.gguf_export import export_gguf

    f16, q8 = work / f"{name}-f16.gguf", work / f"{name}-Q8_0.gguf"
    if not q8.exists():
        export_gguf(folder, f16, dtype="f16", force=True)
        tools = llama_tools.built() or llama_tools.build()
        subprocess.run([str(tools / "llama-quantize"), str(f16), str(q8), "Q8_0"], check=True,
                       capture_output=True)
        f16.unlink()
    return {"file": str(q8), "mib": q8.stat().st_size / 2**20}


def speeds(files: dict[str, str], text: str, rounds: int = 3) -> dict:
    """llama.cpp prefill and decode tokens/s of each file, interleaved round by round (median). Each
    round's prompt is new text (the backend reuses a cached prefix, which would time no prefill)."""
    from slimlm.models.backends import GenerationParams, open_backend

    got: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in files}
    engines = {k: open_backend(path, "llamacpp", n_ctx=1024) for k, path in files.items()}
    try:
        for r in range(rounds):
            prompt = text[r * 1500:(r + 1) * 1500]
            for key, engine in engines.items():
                t = engine.generate(prompt, GenerationParams(max_tokens=64), raw=True).timings
                got[key]["prefill"].append(t.prefill_tps)
                got[key]["decode"].append(t.decode_tps)
    finally:
        for engine in engines.values():
            engine.close()
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in got.items()}


def prune_curve(folder: Path, parent, blocks, work: Path, name: str, keeps=(6, 4, 2), tiny: bool = False) -> dict:
    from slimlm.train.moe.prune import prune_experts

    rows = {"8": score(folder, parent, blocks) if parent is not None else None}
    for keep in keeps:
        out = work / f"{name}-keep{keep}"
        prune_experts(str(folder), out, keep=keep, force=True, record=False, progress=False,
                      calib_tokens=4096 if tiny else 32_768, seq_len=64 if tiny else 256)
        rows[str(keep)] = score(out, parent, blocks) if parent is not None else None
    return rows


def tiny_mixtral_curve(work: Path) -> dict:
    """A tiny random Mixtral (8 experts, top-2): perplexity on python-docs vs experts kept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.models.families import tiny_config
    from slimlm.train.moe.prune import prune_experts

    folder = work / "tiny-mixtral"
    tok = AutoTokenizer.from_pretrained(work / "parent-tokenizer")
    if not folder.exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("mixtral", len(tok), num_local_experts=8))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    from slimlm.data.splits import held_out_docs

    ids = tok("\n\n".join(held_out_docs()), return_tensors="pt").input_ids[0][:1024]
    blocks = [ids[i:i + 256] for i in range(0, len(ids) - 255, 256)]
    rows = {"8": _ppl(folder, blocks)}
    for keep in (6, 4, 2):
        out = work / f"tiny-mixtral-keep{keep}"
        prune_experts(str(folder), out, keep=keep, force=True, record=False, progress=False, calib_tokens=4096,
                      seq_len=128)
        rows[str(keep)] = _ppl(out, blocks)
    return rows


def _ppl(folder, blocks) -> float:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        nll = sum(F.cross_entropy(model(b[None]).logits[0, :-1], b[1:], reduction="sum").item() for b in blocks)
    return math.exp(nll / sum(len(b) - 1 for b in blocks))


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.data.splits import calibration_docs, held_out_docs
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve
    from slimlm.train.data import load_data
    from slimlm.train.moe.stats import moe_stats
    from slimlm.train.moe.upcycle import upcycle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32_768, help="training tokens per arm")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-moe")
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--note", default="", help="a sentence about this run for RESULTS.md (e.g. what else ran)")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    b = Bench(args.work)
    parent_folder = dense_folder(resolve(MODEL))
    tok = AutoTokenizer.from_pretrained(parent_folder)
    tok.save_pretrained(args.work / "parent-tokenizer")
    data = args.work / "train.txt"
    data.write_text("\n\n".join(calibration_docs()))
    held = load_data(str(data), tok, seq_len=args.seq_len, eval_fraction=0.1, seed=0).eval  # the trainer's split
    blocks = [torch.tensor(e["input_ids"]) for e in held[:16]]
    topics = tok("\n\n".join(held_out_docs()), return_tensors="pt").input_ids[0]
    blocks += [topics[i:i + args.seq_len] for i in range(0, len(topics) - args.seq_len + 1, args.seq_len)]
    parent = AutoModelForCausalLM.from_pretrained(parent_folder, dtype=torch.float32).eval()

    arms = {"dense": parent_folder}
    for split in ("neurons", "copy"):
        folder = args.work / f"smol-8x2-{split}"
        b.step(f"upcycle-{split}", lambda s=split, f=folder: upcycle(MODEL, f, 8, 2, s, force=True, record=False,
                                                                      progress=False).to_dict())
        arms[split] = folder
    for arm, folder in arms.items():
        b.step(f"before-{arm}", lambda f=folder: score(f, parent, blocks))
        trained = args.work / f"{arm}-trained"
        b.step(f"train-{arm}", lambda a=arm, f=folder, t=trained: train(a, f, parent_folder, data, t, args))
        b.step(f"after-{arm}", lambda t=trained: score(t, parent, blocks))
    files = {arm: b.step(f"q8-{arm}", lambda a=arm: q8_file(args.work / f"{a}-trained", args.work, a))["file"]
             for arm in ("dense", "neurons")}
    text = "\n\n".join(held_out_docs())
    b.step("speed", lambda: speeds(files, text))
    b.step("prune-neurons", lambda: prune_curve(args.work / "neurons-trained", parent, blocks, args.work, "neurons"))
    b.step("prune-tiny-mixtral", lambda: tiny_mixtral_curve(args.work))

    def stats():
        s = moe_stats(str(args.work / "neurons-trained"), max_tokens=100_000, record=False, progress=False)
        return {"tokens": s.tokens, "seconds": s.seconds, "balance": [lay.balance for lay in s.layers]}
    b.step("stats", stats)
    lines = report(b.results, args)
    print("\n".join(lines))
    if not args.no_write:
        from results import append_section

        append_section("moe: SmolLM2-135M upcycled to 8 experts, 2 active, vs the dense parent", DESCRIPTION.format(
            tokens=args.tokens, seq_len=args.seq_len, lr=args.lr) + (" " + args.note if args.note else ""), lines)
    return 0


DESCRIPTION = ("`python bench/moe.py --tokens {tokens}`: every arm trained on the same {tokens} tokens of python-docs "
               "(calibration part; seq {seq_len}, batch 4, lr {lr}, cosine) by distillation from the parent (forward "
               "KL to its top-32, weight_ce 0.5; the MoEs add load balancing 0.01 and z-loss 0.001). Perplexity and "
               "KL to the parent on the trainer's held-out blocks (16 x {seq_len}) plus python-docs' held-out topics. "
               "Speeds: llama.cpp (slimlm's llamacpp backend, 2 threads) on Q8_0 files made by llama-quantize from "
               "slimlm's f16 export; a new prompt of ~350 tokens each round, 64 new tokens, median of 3 interleaved rounds.")


def report(r: dict, args) -> list[str]:
    lines = ["| arm | total params | active params | ppl before | KL before | ppl after | KL after | "
             "train tok/s | Q8_0 MiB | prefill tok/s | decode tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense_params = r["upcycle-neurons"]["params_parent"]
    for arm in ("dense", "neurons", "copy"):
        up = r.get(f"upcycle-{arm}", {})
        total, active = up.get("params_total", dense_params), up.get("params_active", dense_params)
        before, after, tr = r[f"before-{arm}"], r[f"after-{arm}"], r[f"train-{arm}"]
        q8, sp = r.get(f"q8-{arm}"), r["speed"].get(arm)
        kl0, kl1 = max(before["kl"], 0.0), max(after["kl"], 0.0)  # a float-rounding -1e-9 is 0
        speed = f"{q8['mib']:.1f} | {sp['prefill']:.0f} | {sp['decode']:.0f}" if q8 and sp else "– | – | –"
        lines.append(f"| {arm} | {total / 1e6:.1f}M | {active / 1e6:.1f}M | {before['ppl']:.2f} | {kl0:.3f} | "
                     f"{after['ppl']:.2f} | {kl1:.3f} | {tr['tokens_per_s']:.0f} | {speed} |")
    sp = r["speed"]
    lines += ["", f"MoE / dense in llama.cpp: prefill {sp['neurons']['prefill'] / sp['dense']['prefill']:.2f}x, "
                  f"decode {sp['neurons']['decode'] / sp['dense']['decode']:.2f}x; Q8_0 file "
                  f"{r['q8-neurons']['mib'] / r['q8-dense']['mib']:.2f}x.", "",
              "Expert pruning (least-routed; top-k 2, or the experts kept if fewer):", "",
              "| experts kept | neurons MoE ppl | neurons MoE KL | tiny random Mixtral ppl |", "|---:|---:|---:|---:|"]
    for keep in ("8", "6", "4", "2"):
        p = r["prune-neurons"][keep]
        lines.append(f"| {keep} | {p['ppl']:.2f} | {p['kl']:.3f} | {r['prune-tiny-mixtral'][keep]:.1f} |")
    s = r["stats"]
    lines += ["", f"`moe stats` on {s['tokens']:,} tokens of the trained neurons MoE: {s['seconds']:.1f} s "
                  f"(balance per layer {min(s['balance']):.2f}-{max(s['balance']):.2f}; 1.0 is even)."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
