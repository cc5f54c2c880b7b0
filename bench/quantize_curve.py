#!/usr/bin/env python3
"""KL against file size: slimlm's GGUF files against llama.cpp's at every size, per held-out corpus.

A user picks a quantized file by size and quality, so this benchmark compares files of the same
size. At each point llama.cpp offers (llama-quantize's Q3_K_M, Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0,
without and with an importance matrix from llama-imatrix), it builds:

- slimlm's mixed-precision file at exactly that file's size (`--format gguf --target-size`, one
  type per tensor chosen from measured sensitivity), with each `--methods` code choice (rtn, gptq);
- llama-quantize run with slimlm's chosen per-tensor types (`--tensor-type-file`, ± imatrix): the
  same types with llama.cpp's codes, which separates what the type choice buys from what the codes
  buy;
- slimlm's uniform K-quant files (Q4_K_M, Q5_K_M, Q6_K) with the codes of every method but rtn
  (rtn's are llama-quantize's bytes, tested byte for byte).

Every file is scored by `llama-perplexity --kl-divergence` against the f32 GGUF (chunks of 512, 2
threads, flash attention off, as bench/quantize.py) on each held-out corpus: python-docs (in the
domain of the tasks), general prose and ChatML chat (data/calibration_mix.py), none of which shares
a 13-word run with the calibration text (checked before anything runs). slimlm's GPTQ and
llama-imatrix calibrate on the same 128 x 256 tokens of the `mix` set. `--speed` adds each file's
decode tokens/s in llama.cpp (slimlm's llamacpp backend, 64 tokens, median of 3 passes over all the
files): run it when nothing else uses the CPU.

Everything lands in `--work` (files, saved f32 logits, results.json), so a rerun only builds and
scores what is missing. Writes a table, the verdict at each llama.cpp point and a plot per model
(bench/plots/) into bench/RESULTS.md.

    python bench/quantize_curve.py [--models smollm2-135m-instruct,gemma3-270m] [--methods rtn,gptq]
    python bench/quantize_curve.py --speed      # then decode speed of every file, on a quiet machine
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from llama_tools import build as build_llama_tools
from quantize import CALIB, CORPORA, PPL_ARGS, eval_corpora, llama_perplexity, run_tool
from results import append_section

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.compress.gguf_export import export_gguf
from slimlm.compress.quantize import quantize, tensor_shapes
from slimlm.data import calibration_corpus
from slimlm.errors import SlimlmError
from slimlm.models.loading import dense_folder
from slimlm.models.reference import resolve

PEER_TYPES = ("Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
UNIFORM_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")
PLOTS = Path(__file__).with_name("plots")
MiB = 2**20


def weights_digest(path: Path) -> str:
    """A hash of every tensor's name, type and bytes (not the metadata, which each writer fills its own way)."""
    from gguf import GGUFReader

    h = hashlib.sha256()
    for t in sorted(GGUFReader(path).tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{t.tensor_type.name}:".encode())
        h.update(t.data.tobytes())
    return h.hexdigest()


class Bench:
    """One model's work folder: the f32 GGUF, the saved f32 logits per corpus, the importance
    matrix, the files, and results.json ({job: record}), reused by every rerun."""

    def __init__(self, model: str, work: Path, tools: Path, corpora: dict[str, list[str]], calib: str,
                 max_chunks: int | None = None, threads: int = 2):
        self.model, self.tools, self.calib = model, tools, calib
        self.ppl_extra = ("--chunks", max_chunks) if max_chunks else ()  # the same cap for the base and every file
        self.ppl_extra += ("-t", threads)  # after PPL_ARGS' -t 2, so this wins (KL does not depend on it)
        self.dir = work / (model + (f"-chunks{max_chunks}" if max_chunks else ""))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.folder = dense_folder(resolve(model))
        self.results_path = self.dir / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.f32 = self.dir / "f32.gguf"
        if not self.f32.exists():
            export_gguf(self.folder, self.dir / "f32.tmp.gguf", dtype="f32").rename(self.f32)
        self.bases = {name: self._base(name, docs) for name, docs in corpora.items()}
        self.params = sum(int(np.prod(s)) for s in tensor_shapes(self.folder).values())

    def _base(self, name: str, docs: list[str]) -> tuple[Path, Path]:
        text, kld = self.dir / f"held-out-{name}.txt", self.dir / f"base-{name}.kld"
        if not kld.exists():
            text.write_text("\n\n".join(docs))
            tmp = kld.with_suffix(".tmp")
            run_tool(self.tools, "llama-perplexity", "-m", self.f32, "-f", text, *PPL_ARGS, *self.ppl_extra,
                     "--kl-divergence-base", tmp)
            tmp.rename(kld)
        return text, kld

    def imatrix(self) -> Path:
        out = self.dir / "imatrix.gguf"
        if not out.exists():
            calib = self.dir / "calib.txt"
            calib.write_text("\n\n".join(calibration_corpus(self.calib)))
            tmp = self.dir / "imatrix.tmp.gguf"
            run_tool(self.tools, "llama-imatrix", "-m", self.f32, "-f", calib, "-o", tmp, "-c",
                     CALIB["calib_seq_len"], "--chunks", CALIB["calib_samples"], "-t", 2)
            tmp.rename(out)
        return out

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.rename(self.results_path)

    def job(self, key: str, family: str, type_name: str, build) -> dict | None:
        """Build `key` with build(out) unless done, score it on every corpus, record it."""
        record = self.results.get(key)
        out = self.dir / f"{key}.gguf"
        if record and (record.get("unreachable") or (out.exists() and set(record["kl"]) >= set(self.bases))):
            return record
        start = time.perf_counter()
        try:
            if not out.exists():
                tmp = self.dir / f"{key}.tmp.gguf"
                build(tmp)
                tmp.rename(out)
                for side in tmp.parent.glob(f"{tmp.stem}.*"):  # slimlm's tensor-types and record files
                    side.rename(self.dir / side.name.replace(".tmp", ""))
        except SlimlmError as e:  # a budget below what the method reaches: recorded, not fatal
            record = {"family": family, "type": type_name, "unreachable": str(e)}
            print(f"{self.model} {family} {type_name}: {e}", flush=True)
            self.results[key] = record
            self.save()
            return record
        seconds = time.perf_counter() - start
        digest = weights_digest(out)
        twin = next((k for k, r in self.results.items() if r.get("sha256") == digest and k != key), None)
        if twin:  # the same weights, byte for byte, as a file already scored (slimlm rtn's types rerun by
            # llama-quantize): the same logits, so the same scores
            kl, top1 = dict(self.results[twin]["kl"]), dict(self.results[twin]["top1"])
        else:
            kl, top1 = {}, {}
            for name, (text, kld) in self.bases.items():
                scored = llama_perplexity(self.tools, out, text, kld, *self.ppl_extra)
                kl[name], top1[name] = scored["kl_mean"], scored["top1_agreement"]
        record = {"family": family, "type": type_name, "bytes": out.stat().st_size, "seconds": seconds,
                  "kl": kl, "top1": top1, "sha256": digest, **({"same_bytes_as": twin} if twin else {}),
                  **({"decode_tps": record["decode_tps"]} if record and "decode_tps" in record else {})}
        self.results[key] = record
        self.save()
        print(f"{self.model} {family} {type_name}: {out.stat().st_size / MiB:.1f} MiB, KL "
              + ", ".join(f"{k} {v:.4f}" for k, v in kl.items()), flush=True)
        return record

    # --- the builders ---------------------------------------------------------------------

    def peer(self, type_name: str, imatrix: bool, types_file: Path | None = None):
        def build(out: Path):
            args = (["--imatrix", self.imatrix()] if imatrix else []) + (
                ["--tensor-type-file", types_file] if types_file else [])
            run_tool(self.tools, "llama-quantize", *args, self.f32, out, type_name, 2)
        return build

    def slimlm(self, method: str, **kwargs):
        def build(out: Path):
            quantize(str(self.folder), out, method=method, check=False, record=False, calib=self.calib, **CALIB,
                     **kwargs)
        return build


def run_model(bench: Bench, methods: list[str], peer_types: list[str], mixed_at: list[str],
              uniform: list[str], type_files: bool = True, uniform_methods: list[str] | None = None) -> None:
    """Most telling first, so a run cut short still answers the question: llama.cpp's points, slimlm's
    mixed files at their sizes (each method), its uniform K-quant files, then llama-quantize with
    slimlm's types (what the type choice alone buys)."""
    for type_name in peer_types:
        for imatrix in (False, True):
            bench.job(f"llamacpp{'-imat' if imatrix else ''}-{type_name}",
                      f"llama.cpp{' + imatrix' if imatrix else ''}", type_name, bench.peer(type_name, imatrix))
    for method in methods:
        for type_name in mixed_at:  # slimlm's mixed precision at each llama.cpp file's size
            size = bench.results[f"llamacpp-{type_name}"]["bytes"]
            bench.job(f"slimlm-{method}-mixed-{type_name}", f"slimlm mixed {method}", f"<= {type_name}",
                      bench.slimlm(method, format="gguf", target_size=size / MiB))
    for method in methods if uniform_methods is None else uniform_methods:
        if method != "rtn":  # rtn's K-quant files are llama-quantize's bytes (tested)
            for type_name in uniform:
                bench.job(f"slimlm-{method}-{type_name}", f"slimlm {method}", type_name,
                          bench.slimlm(method, format=f"gguf:{type_name}"))
    for method in methods if type_files else []:
        for type_name in mixed_at:
            types_file = bench.dir / f"slimlm-{method}-mixed-{type_name}.tensor-types.txt"
            if types_file.exists():
                for imatrix in (False, True):
                    bench.job(f"llamacpp{'-imat' if imatrix else ''}-slimlm-{method}-types-{type_name}",
                              f"llama.cpp, slimlm {method}'s types{' + imatrix' if imatrix else ''}",
                              f"<= {type_name}", bench.peer("Q8_0", imatrix, types_file))


def measure_speed(bench: Bench, rounds: int = 3) -> None:
    """Decode tokens/s of every file: `rounds` passes over all the files (each file once a pass, with a
    new prompt each pass), median per file. Passes rather than file after file, so that a machine whose
    speed drifts over minutes slows every file alike instead of the files measured last."""
    from slimlm.models.backends import GenerationParams, open_backend

    keys = [k for k, record in bench.results.items() if not record.get("unreachable")]
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for prompt in ("The Python language reference", "A small language model is", "Tuples are")[:rounds]:
        for key in keys:
            engine = open_backend(str(bench.dir / f"{key}.gguf"), "llamacpp", n_ctx=512)
            rates[key].append(engine.generate(prompt, GenerationParams(max_tokens=64), raw=True).timings.decode_tps)
            engine.close()
    for key in keys:
        bench.results[key]["decode_tps"] = sorted(rates[key])[len(rates[key]) // 2]
        print(f"{bench.model} {key}: {bench.results[key]['decode_tps']:.0f} tok/s", flush=True)
    bench.save()


def points(bench: Bench) -> list[dict]:
    return sorted(({"key": k, **r} for k, r in bench.results.items() if not r.get("unreachable")),
                  key=lambda r: (r["bytes"], r["family"]))


def verdicts(bench: Bench) -> list[str]:
    """At each llama.cpp point: its better file (± imatrix) against slimlm's best file no larger."""
    rows = points(bench)
    ours = [r for r in rows if r["family"].startswith("slimlm")]
    lines = []
    for type_name in PEER_TYPES:
        peers = [r for r in rows if r["family"].startswith("llama.cpp") and "types" not in r["family"]
                 and r["type"] == type_name]
        if not peers:
            continue
        size = min(r["bytes"] for r in peers)
        fits = [r for r in ours if r["bytes"] <= max(r["bytes"] for r in peers)]
        if not fits:
            lines.append(f"{type_name} ({size / MiB:.1f} MiB): no slimlm file this small")
            continue
        parts, wins = [], 0
        for corpus in bench.bases:
            peer = min(peers, key=lambda r: r["kl"][corpus])
            best = min(fits, key=lambda r: r["kl"][corpus])
            ratio = best["kl"][corpus] / peer["kl"][corpus]
            wins += ratio < 1
            parts.append(f"{corpus} {best['kl'][corpus]:.4f} ({best['family']}, {best['bytes'] / MiB:.1f} MiB) = "
                         f"{ratio:.2f}x {peer['family']}'s {peer['kl'][corpus]:.4f}")
        lines.append(f"{type_name} ({size / MiB:.1f} MiB): lower KL on {wins}/{len(bench.bases)} corpora; "
                     + "; ".join(parts))
    return lines


def table(bench: Bench) -> list[str]:
    corpora = list(bench.bases)
    out = ["| file | type | MiB | bits/weight | " + " | ".join(f"KL {c}" for c in corpora)
           + " | top-1 prose | decode tok/s | build s |",
           "|---|---|---:|---:|" + "---:|" * len(corpora) + "---:|---:|---:|"]
    for r in points(bench):
        tps = f"{r['decode_tps']:.0f}" if "decode_tps" in r else "–"
        out.append(f"| {r['family']} | {r['type']} | {r['bytes'] / MiB:.1f} | {8 * r['bytes'] / bench.params:.2f} | "
                   + " | ".join(f"{r['kl'][c]:.4f}" for c in corpora)
                   + f" | {r['top1'].get('prose', float('nan')):.1%} | {tps} | {r['seconds']:.0f} |")
    for key, r in bench.results.items():
        if r.get("unreachable"):
            out.append(f"| {r['family']} | {r['type']} | – | – | " + " | ".join("–" for _ in corpora)
                       + f" | – | – | – |  <!-- {key}: {r['unreachable']} -->")
    return out


def plot(bench: Bench) -> Path:
    """One panel per corpus: KL (log) against file MiB, a line per family."""
    from matplotlib.figure import Figure

    from slimlm.eval.report import png_bytes

    rows = points(bench)
    fig = Figure(figsize=(6.0 * len(bench.bases), 4.8), layout="constrained")
    fig.suptitle(f"{bench.model}: KL to the f32 model vs file size (llama-perplexity, held-out text)")
    families = list(dict.fromkeys(r["family"] for r in rows))
    for k, corpus in enumerate(bench.bases):
        ax = fig.add_subplot(1, len(bench.bases), k + 1)
        for family in families:
            pts = [r for r in rows if r["family"] == family]
            style = "--" if family.startswith("llama.cpp") else "-"
            ax.plot([r["bytes"] / MiB for r in pts], [r["kl"][corpus] for r in pts], style, marker="o",
                    markersize=4, label=family)
        ax.set_yscale("log")
        ax.set_xlabel("file MiB")
        ax.set_ylabel("mean KL (nats)")
        ax.set_title(corpus)
        ax.grid(True, which="both", alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7)
    PLOTS.mkdir(exist_ok=True)
    path = PLOTS / f"quantize-curve-{bench.model}.png"
    path.write_bytes(png_bytes(fig))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--methods", default="rtn,gptq", help="slimlm's code choices for the mixed and K-quant files")
    ap.add_argument("--calib", default="mix")
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--work", default="build/bench-curve", help="files and results, reused by a rerun")
    ap.add_argument("--max-chunks", type=int, help="score at most N chunks of 512 tokens per corpus (a bigger model)")
    ap.add_argument("--types", default=",".join(PEER_TYPES), help="llama.cpp's points (llama-quantize types)")
    ap.add_argument("--mixed-at", default=",".join(PEER_TYPES), help="llama.cpp points to build slimlm's mixes at")
    ap.add_argument("--uniform", default=",".join(UNIFORM_TYPES), help="slimlm's uniform K-quant files (not rtn)")
    ap.add_argument("--uniform-methods", help="the methods of the uniform K-quant files (default: --methods)")
    ap.add_argument("--no-type-files", action="store_true",
                    help="skip llama-quantize with slimlm's per-tensor types (saves time on a bigger model)")
    ap.add_argument("--threads", type=int, default=2,
                    help="llama-perplexity threads: 1 scores faster while other jobs share a 2-core CPU")
    ap.add_argument("--speed", action="store_true", help="measure decode tokens/s of every file (quiet machine)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    corpora = eval_corpora([c for c in args.corpora.split(",") if c], calibration_corpus(args.calib))
    tools = build_llama_tools()
    for model in args.models.split(","):
        bench = Bench(model, Path(args.work), tools, corpora, args.calib, args.max_chunks, args.threads)
        run_model(bench, [m for m in args.methods.split(",") if m], args.types.split(","),
                  [t for t in args.mixed_at.split(",") if t], [t for t in args.uniform.split(",") if t],
                  not args.no_type_files,
                  [m for m in args.uniform_methods.split(",") if m] if args.uniform_methods else None)
        if args.speed:
            measure_speed(bench)
        body = table(bench) + [""] + [f"- {x}" for x in verdicts(bench)]
        picture = plot(bench)
        print("\n".join(body) + f"\nplot: {picture}", flush=True)
        if not args.no_write:
            body += ["", f"![KL vs size, {model}](plots/{picture.name})"]
            command = " ".join(["python bench/quantize_curve.py", *sys.argv[1:]])
            append_section("quantize, KL vs file size", DESCRIPTION.format(command=command, calib=args.calib), body)
    return 0


DESCRIPTION = ("KL against the f32 GGUF from `llama-perplexity --kl-divergence` (chunks of 512, `-fa off`, 2 threads) on "
               "held-out python-docs and the out-of-domain held-out prose and ChatML chat of data/calibration_mix.py "
               "(none shares a 13-word run with the calibration text). slimlm mixed: `--format gguf --target-size` set "
               "to the llama.cpp file's size at that type; llama.cpp, slimlm METHOD's types: llama-quantize with the "
               "`--tensor-type-file` of that slimlm mix. GPTQ and llama-imatrix calibrate on {calib}, "
               f"{CALIB['calib_samples']} x {CALIB['calib_seq_len']} tokens. bits/weight: file bits / all parameters. "
               "Decode tok/s (where shown) measured in one quiet pass (`--speed`). The f32 reference is the "
               "dequantized GGUF the built-in package ships (SmolLM2: Q4_1; Gemma 3: Q4_K_M), so a type that holds "
               "its grid exactly (Q5_1 for Q4_1 blocks, with an importance-matrix scale search) scores at the floor "
               "of llama.cpp's quantized kernels; above ~5 bits the curve measures that recovery as much as "
               "quantization. Command: `{command}`.")

if __name__ == "__main__":
    sys.exit(main())
