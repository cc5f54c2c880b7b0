#!/usr/bin/env python3
"""Batched decoding on the torch backend: slimlm's continuous batching (torch_decoder.py) and
transformers' own against a plain left-padded batch and one prompt at a time, same model, same
prompts, one run.

Why: issue 18 asks whether the torch path should serve through transformers' own continuous
batching (`generate_batch` with the paged attention, `paged|sdpa` on a CPU) rather than a
hand-written scheduler. This measures it where slimlm runs: SmolLM2-135M-Instruct converted to a
Hugging Face folder, float32, greedy, --tokens new tokens for each of --prompts prompts, the
median of --repeat runs after a warm-up, and checks that all three give the same tokens.

    python bench/torch_batching.py [--prompts 8] [--tokens 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from results import append_section

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.hardware import cpu_info
from slimlm.models.loading import dense_folder
from slimlm.models.reference import resolve

TOPICS = ["the sea", "a lighthouse", "prime numbers", "a market", "hash tables", "the moon", "a library", "rain",
          "bicycles", "volcanoes", "bread", "trains", "owls", "chess", "glass", "maps"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from slimlm.models.backends import open_backend
    from slimlm.models.backends.batch import generate_batch
    from slimlm.models.backends.decoder import Sampler

    torch.manual_seed(0)
    folder = dense_folder(resolve("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [tok(f"Write two sentences about {TOPICS[i % len(TOPICS)]}.")["input_ids"] for i in range(args.prompts)]
    eos = tok.eos_token_id
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    paged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="paged|sdpa").eval()
    cfg = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)

    def one_by_one():
        with torch.no_grad():
            return [plain.generate(torch.tensor([x]), generation_config=cfg)[0, len(x):].tolist() for x in ids]

    def padded():
        return [t for t, _ in generate_batch(plain, ids, args.tokens, eos, [eos])]

    def continuous():
        out = paged.generate_batch(inputs=ids, generation_config=cfg, progress_bar=False)
        return [out[f"req_{i}"].generated_tokens for i in range(len(ids))]

    backend = open_backend(str(folder), "torch", dtype="float32")

    def slimlm_decoder():
        """The serving engine's loop, reduced: every prompt admitted, stepped until each ends."""
        decoder = backend.decoder(len(ids), 512, max(map(len, ids)) + args.tokens + 1)
        slots = {decoder.admit(x): i for i, x in enumerate(ids)}
        out = [[] for _ in ids]
        while slots:
            for slot, logits in decoder.step().items():
                i, tok = slots[slot], Sampler()(logits)
                out[i].append(tok)
                if tok == eos or len(out[i]) >= args.tokens:
                    decoder.release(slot)
                    del slots[slot]
                else:
                    decoder.feed(slot, tok)
        decoder.close()
        return out

    paths = {"one prompt at a time (generate)": one_by_one, "left-padded batch (generate)": padded,
             "transformers continuous batching (paged|sdpa)": continuous,
             "slimlm continuous batching (torch_decoder.py)": slimlm_decoder}
    results, tokens = {}, {}
    for name, fn in paths.items():
        tokens[name] = fn()  # warm-up, and the tokens to compare
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        results[name] = statistics.median(times)
        print(f"{name}: {results[name]:.2f} s", flush=True)

    def trim(seq):  # up to and including the first end token
        return seq[:seq.index(eos) + 1] if eos in seq else seq

    base = [trim(t) for t in tokens["one prompt at a time (generate)"]]
    same = {name: sum(trim(t) == b for t, b in zip(tok_list, base)) for name, tok_list in tokens.items()}
    generated = sum(len(b) for b in base)
    body = ["| path | seconds | tokens/s | vs one at a time | same tokens as one at a time |", "|---|---:|---:|---:|---:|"]
    first = results["one prompt at a time (generate)"]
    for name, seconds in results.items():
        body.append(f"| {name} | {seconds:.2f} | {generated / seconds:.1f} | {first / seconds:.2f}x | "
                    f"{same[name]}/{len(ids)} |")
    best = min(results, key=results.get)
    body.append("")
    padded_time = results["left-padded batch (generate)"]
    body.append(f"- fastest here: {best}; transformers' continuous batching takes "
                f"{results['transformers continuous batching (paged|sdpa)'] / padded_time:.2f}x the padded batch's "
                f"time, slimlm's {results['slimlm continuous batching (torch_decoder.py)'] / padded_time:.2f}x")
    print("\n".join(body))
    if not args.no_write:
        desc = (f"SmolLM2-135M-Instruct as a Hugging Face folder, float32, torch {torch.__version__}, transformers "
                f"{__import__('transformers').__version__}, greedy, {args.prompts} prompts x {args.tokens} new "
                f"tokens, median of {args.repeat} after a warm-up, on {cpu_info().describe()}. Command: `python "
                f"bench/torch_batching.py {' '.join(sys.argv[1:])}`.")
        print(f"appended to {append_section('serve, torch batching', desc, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
