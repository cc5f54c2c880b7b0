"""GGUF files with a type per tensor: llama.cpp's K-quant files (`--format gguf:Q4_K_M`, ...) and
per-tensor mixed precision under a size budget (`--format gguf --target-size MIB | --target-bpw B`).

Why a separate pipeline: quant_pipeline writes one block format for every weight; here each
weight gets its own type, chosen either by llama.cpp's rule for a K-quant file type
(kquant_formats.mix_type) or by an allocation that spends a byte budget where it buys the most
fidelity:

- candidates per weight: Q3_K, Q4_0, Q4_K, Q5_K, Q6_K, Q8_0, F16, each after llama.cpp's width fallback
  (a 576-wide weight cannot hold a 256-block: Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0);
  Q3_K lets a file go below an all-Q4_0 body where widths allow (SmolLM2's ffn_down), which is what
  reaches llama.cpp's Q4_0 size once the file's own metadata is paid for; Q2_K is left out (its
  large error makes the KL scaled from it, step 4 of sensitivity.py, a poor guide to the others);
  F16 is what a budget at or above an all-Q8_0 file buys beyond it: its most sensitive weights
  unquantized, paid for by Q6_K on the least;
- cost: the KL each weight's quantization at each type adds on calibration text
  (sensitivity.py, cached per model and text);
- allocation: minimize the summed KL subject to the file's bytes <= budget, a multiple-choice
  knapsack solved exactly by dynamic programming over the budget in at most 200,000 steps (each
  weight's extra bytes rounded up to a step, so the budget always holds);
- the token embedding and output head (`--embeddings auto`) join the allocation with the same
  candidates, their KL measured by a full forward (sensitivity.py), written with round-to-nearest
  whatever the method (GPTQ and AWQ code linear layers); they are a quarter of SmolLM2's weights and
  most of Gemma 3's, so a fixed type (llama.cpp's Q8_0 or Q6_K) left the allocation half its
  budget. An explicit --embeddings keeps that type, counted in the budget. The file's other bytes
  (header, vocabulary, norms) are measured exactly by writing the file once with 1-element tensors.

An MoE's routed experts are allocated a stacked tensor at a time (`blk.N.ffn_gate_exps`, ...), as
llama.cpp stores them under one type: the stack's bytes are its experts' blocks, its sensitivity
the KL of quantizing all of them together, each weighted by the tokens routed to it
(sensitivity.py).

A GGUF parent's own blocks are kept for every weight whose chosen type is the parent's
(source_blocks.py), at no KL in the allocation: they are the reference weights exactly.

The chosen types go into the file's metadata (`slimlm.tensor_types`, a JSON string
{gguf name: type}), into the result (`QuantizeResult.tensor_types`), and into FILE.tensor-types.txt
(`name=type` lines, as llama-quantize's --tensor-type takes them) so llama-quantize can be rerun
with slimlm's choices. The types come first (from sensitivities measured with the method's scale
rules: llama-quantize's importance-matrix rules for GPTQ, the reference rules otherwise); then the
method, knowing every weight's type (TypedJob), is asked for each weight's bytes: RTN gives
llama.cpp's reference quantizers byte for byte, GPTQ its own codes in the same layouts, AWQ RTN's
bytes of its rescaled model (the file written from the folder method.source_typed gives).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimlm.compress.kquant_formats import FILE_TYPES, fallback, file_type_for, kquant_name, mix_type, tensor_bytes
from slimlm.compress.quant_pipeline import QuantizeResult, QuantRequest, finish
from slimlm.compress.quant_steps import (
    KEEP,
    ROUTERS,
    calibration_texts,
    check_embeddings,
    embedding_encoder,
    embedding_type,
    quantizable,
    tensor_shapes,
)
from slimlm.compress.source_blocks import parent_gguf, source_blocks
from slimlm.errors import SlimlmError

__all__ = ["CANDIDATES", "TYPES_KEY", "TypedJob", "is_typed_request", "candidate_types", "allocate", "gguf_names",
           "quantize_typed", "type_summary"]

CANDIDATES = ("Q3_K", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")
TYPES_KEY = "slimlm.tensor_types"
MIXED_EMBEDDINGS = "Q4_K_M"  # whose automatic token embedding / output head types a mixed file keeps
_ALIGN = 32  # GGUF data alignment


@dataclass
class TypedJob:
    """One per-tensor-typed run as a method's typed hooks (source_typed, prepare_typed, encode_typed) see it."""
    folder: Path  # the dense input folder (method.source_typed may write the file from a rewrite of it)
    out: Path
    types: dict[str, str]  # Hugging Face weight name -> GGUF type (after llama.cpp's width fallback)
    texts: list[str] | None  # calibration documents, for methods with `calibrated = True`
    samples: int
    seq_len: int
    sequential: bool
    notes: list[str] = field(default_factory=list)
    kept: dict = field(default_factory=dict)  # name -> source_blocks.SourceBlock: the GGUF parent's bytes, written as they are


def is_typed_request(req: QuantRequest) -> bool:
    return kquant_name(req.format) is not None or req.target_size is not None or req.target_bpw is not None


def candidate_types(width: int) -> list[str]:
    """The distinct types a weight `width` wide can be stored in, from CANDIDATES after the fallback."""
    return list(dict.fromkeys(fallback(t, width) for t in CANDIDATES))


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def allocate(options: dict[str, dict[str, tuple[int, float]]], budget: int, steps: int = 200_000) -> dict[str, str]:
    """{name: type} minimizing the summed cost with summed bytes <= budget, for options
    {name: {type: (bytes, cost)}}: exact dynamic programming over the budget beyond the cheapest
    choice, in steps of ceil(slack / steps) bytes (each option's extra bytes rounded up)."""
    names = list(options)
    floor = sum(min(b for b, _ in options[n].values()) for n in names)
    if floor > budget:
        raise SlimlmError(f"the budget of {budget} bytes is below the {floor} the smallest types take")
    slack = budget - floor
    unit = max(1, math.ceil(slack / steps))
    cap = slack // unit
    best = np.zeros(cap + 1)
    choice = np.zeros((len(names), cap + 1), dtype=np.int8)
    for i, n in enumerate(names):
        lo = min(b for b, _ in options[n].values())
        new = np.full(cap + 1, np.inf)
        for k, (b, cost) in enumerate(options[n].values()):
            extra = math.ceil((b - lo) / unit)
            if extra > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[extra:] = best[:cap + 1 - extra] + cost
            better = cand < new
            new[better], choice[i, better] = cand[better], k
        best = new
    chosen, c = {}, cap
    for i in range(len(names) - 1, -1, -1):
        n = names[i]
        types = list(options[n])
        t = types[choice[i, c]]
        chosen[n] = t
        c -= math.ceil((options[n][t][0] - min(b for b, _ in options[n].values())) / unit)
    return {n: chosen[n] for n in names}


def gguf_names(folder: Path, shapes: dict) -> dict[str, str]:
    """{Hugging Face name: GGUF name} of the tensors export_gguf writes, as it maps them."""
    import gguf

    from slimlm.compress.gguf_export import read_config, spec_for

    config = read_config(folder)
    tie = config.get("tie_word_embeddings", True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec_for(config).arch.upper()], config["num_hidden_layers"])
    out = {}
    for n in shapes:
        if "rotary_emb" not in n and not (tie and n == "lm_head.weight"):
            g = names.get_name(n, try_suffixes=(".weight", ".bias"))
            if g is not None:
                out[n] = g
    return out


def _expert_names(folder: Path, shapes: dict) -> dict[str, str]:
    """{checkpoint expert weight: GGUF name of the stacked tensor it is written into} for an MoE
    (llama.cpp stores each layer's experts of one kind as one [E, rows, cols] tensor, typed as one)."""
    from slimlm.compress.gguf_export import stacked_name

    stacked = {n: stacked_name(n) for n in shapes}
    stacked = {n: s for n, s in stacked.items() if s}
    if not stacked:
        return {}
    stacked_names = gguf_names(folder, {s: () for s in set(stacked.values())})
    return {n: stacked_names[s] for n, s in stacked.items() if s in stacked_names}


def _stacks(targets: list[str], experts: dict[str, str]) -> dict[str, list[str]]:
    """{stacked checkpoint name (`...experts.w1.weight`): its experts} among `targets`."""
    from slimlm.compress.gguf_export import stacked_name

    out: dict[str, list[str]] = {}
    for n in targets:
        if n in experts:
            out.setdefault(stacked_name(n), []).append(n)
    return out


def type_summary(types: dict[str, str]) -> str:
    """'Q4_K x120, Q6_K x30' by count, most first."""
    return ", ".join(f"{t} x{c}" for t, c in Counter(types.values()).most_common())


def _head_types(folder: Path, shapes: dict, names: dict, embeddings: str, embed_fmt: str) -> dict[str, str]:
    from slimlm.compress.gguf_export import read_config

    tied = read_config(folder).get("tie_word_embeddings", True)
    out = {}
    for n, g in names.items():
        if len(shapes[n]) == 2 and any(k in n for k in KEEP):
            role = "output" if g.startswith("output") else "token_embd"
            out[n] = embedding_type(embeddings, embed_fmt, role, shapes[n][-1], tied)[1].upper()
    return out


def _fixed_bytes(folder: Path, shapes: dict, names: dict, targets: set, heads: dict, metadata: dict) -> int:
    """Every byte of the file except the quantized weights' data: written once with 1-element
    tensors (same header, vocabulary and metadata length), then each tensor's real bytes added."""
    from slimlm.compress.gguf_export import export_gguf

    seen = []

    def tiny(name_hf: str, name_gguf: str, w: np.ndarray):
        seen.append(name_hf)
        return np.zeros((1,) * w.ndim, np.float32), None

    with tempfile.TemporaryDirectory(prefix="slimlm-probe-") as tmp:
        probe = export_gguf(folder, Path(tmp) / "probe.gguf", tensor_writer=tiny, metadata=metadata,
                            file_type="Q8_0")
        size = probe.stat().st_size
    for n in seen:
        size -= _ALIGN
        if n in heads:
            size += _aligned(tensor_bytes(heads[n], shapes[n]))
        elif n not in targets:  # norms and an MoE's routers are written f32, other weights f16
            size += _aligned((4 if len(shapes[n]) < 2 or n.endswith(ROUTERS) else 2) * int(np.prod(shapes[n])))
    return size


def _check(req: QuantRequest, name: str | None) -> None:
    targeted = req.target_size is not None or req.target_bpw is not None
    if req.target_size is not None and req.target_bpw is not None:
        raise SlimlmError("give --target-size or --target-bpw, not both")
    if targeted and name is not None:
        raise SlimlmError(f"--target-size/--target-bpw choose a type per tensor: use --format gguf, not {req.format}")
    if targeted and req.format.lower() != "gguf":
        raise SlimlmError(f"--target-size/--target-bpw write a GGUF file: use --format gguf, not {req.format}")
    if targeted and (req.target_size if req.target_size is not None else req.target_bpw) <= 0:
        raise SlimlmError("--target-size and --target-bpw must be positive")
    if req.bits is not None or req.group_size is not None:
        raise SlimlmError("K-quant and mixed-precision files fix their own bits and group sizes: drop --bits "
                          "and --group-size")
    check_embeddings(req.embeddings)
    if req.calib_samples < 1 or req.calib_seq_len < 2:
        raise SlimlmError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    if Path(req.out).exists() and not req.force:
        raise SlimlmError(f"{req.out} already exists: choose another output path or pass --force")


def _budget(req: QuantRequest, params_total: int) -> int:
    if req.target_size is not None:
        return int(req.target_size * 2**20)
    return int(req.target_bpw * params_total / 8)


def quantize_typed(method, req: QuantRequest) -> QuantizeResult:
    """A K-quant file (req.format gguf:Q4_K ... gguf:Q5_K_M) or a mixed-precision file under
    req.target_size (MiB) / req.target_bpw (bits per parameter, the whole file), with the codes
    `method` (a QuantMethod with typed_formats) chooses."""
    from slimlm.compress.gguf_export import expert_count, read_config
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    name = kquant_name(req.format)
    _check(req, name)
    ref = resolve(str(req.model))
    folder = dense_folder(ref)
    shapes = tensor_shapes(folder)
    names = gguf_names(folder, shapes)
    experts = _expert_names(folder, shapes)  # an MoE's checkpoint experts -> their stacked GGUF name
    names = {**names, **experts}
    targets = [n for n, s in shapes.items() if quantizable(n, s) and n in names]
    stacks = _stacks(targets, experts)  # an MoE's allocation units: one type per stacked tensor
    heads = _head_types(folder, shapes, names, req.embeddings, name or MIXED_EMBEDDINGS)
    parent_file = parent_gguf(ref, folder) if method.keeps_parent_blocks else None
    params_total = sum(int(np.prod(s)) for s in shapes.values())
    notes: list[str] = []
    start = time.perf_counter()
    needs_text = method.calibrated or not name  # GPTQ's calibration, the allocation's sensitivities
    texts = calibration_texts(folder, req.calib, req.calib_field, req.calib_seq_len) if needs_text else None
    if name:
        cfg = read_config(folder)
        n_head = cfg["num_attention_heads"]
        n_layers, n_gqa = cfg["num_hidden_layers"], n_head // (cfg.get("num_key_value_heads") or n_head)
        n_expert = expert_count(cfg)
        types = {n: mix_type(name, names[n], n_layers, shapes[n][-1], n_gqa, n_expert) for n in targets}
        wanted = {n: mix_type(name, names[n], n_layers, 256, n_gqa, n_expert) for n in targets}  # no fallback
        fell = sorted({t for n, t in types.items() if t != wanted[n]})
        if fell:
            notes.append(f"widths not a multiple of 256 fall back to {', '.join(fell)}, as llama-quantize does")
        file_type, label = FILE_TYPES.get(name, name), name
        # the types are fixed: only the parent's tensors of the same type can be kept, so only those are checked
        parent = source_blocks(parent_file, folder, names, shapes, wanted={**types, **heads})
    else:
        parent = source_blocks(parent_file, folder, names, shapes)
        placeholder = {TYPES_KEY: json.dumps({names[n]: "Q4_0" for n in [*targets, *heads]})}
        allocated = list(heads) if check_embeddings(req.embeddings) == "auto" else []
        fixed = _fixed_bytes(folder, shapes, names, {*targets, *stacks, *allocated},
                             {n: t for n, t in heads.items() if n not in allocated}, placeholder)
        units = [n for n in targets if n not in experts] + list(stacks) + allocated
        candidates = {u: candidate_types(shapes[stacks.get(u, [u])[0]][-1]) for u in units}  # a stack: its experts' width

        def unit_bytes(u: str, t: str) -> int:  # a stack is one tensor: its experts' blocks, aligned once
            members = stacks.get(u, [u])
            return _aligned(len(members) * tensor_bytes(t, shapes[members[0]]))
        budget = _budget(req, params_total)
        least = fixed + sum(min(unit_bytes(u, t) for t in c) for u, c in candidates.items())
        if budget < least:
            raise SlimlmError(f"the budget ({budget / 2**20:.1f} MiB, {8 * budget / params_total:.2f} bits per "
                              f"weight) is below the smallest this model reaches: {least / 2**20:.1f} MiB "
                              f"({8 * least / params_total:.2f} bits per weight)")
        from slimlm.compress.sensitivity import sensitivities

        scores = sensitivities(folder, texts, candidates, tokens=req.calib_seq_len, notes=notes,
                               weighted=frozenset(targets) if method.importance_scales else frozenset(),
                               stacks=stacks)
        options = {u: {t: (unit_bytes(u, t), scores[u][t]) for t in c} for u, c in candidates.items()}
        for n, block in parent.items():  # the parent's own bytes decode to the reference exactly
            if n in options:
                options[n][block.type] = (_aligned(block.data.nbytes), 0.0)
        chosen = allocate(options, budget - fixed)
        types = {n: chosen[n] for n in targets if n not in experts}
        types.update({e: chosen[u] for u, members in stacks.items() for e in members})
        heads = {**heads, **{n: chosen[n] for n in allocated}}
        weights = Counter()
        for n, t in types.items():
            weights[t] += int(np.prod(shapes[n]))
        file_type, label = file_type_for(weights.most_common(1)[0][0]), "mixed"
        notes.append(f"estimated added KL {sum(scores[n][t] for n, t in chosen.items()):.4f} (sum over tensors) "
                     f"for {budget / 2**20:.1f} MiB" + "".join(f"; {names[n]} {heads[n]}" for n in allocated))
    final = {**types, **heads}
    all_types = {names[n]: t for n, t in final.items()}  # the experts of a stack share its type
    kept = {n: b for n, b in parent.items() if final.get(n) == b.type}
    if kept:
        notes.append(f"{len(kept)} weights kept as the GGUF parent stores them (their type is the parent's: "
                     "its bytes are the reference weights exactly)")
    job = TypedJob(folder, Path(req.out), types, texts, req.calib_samples, req.calib_seq_len, req.sequential, notes,
                   kept)
    with method.source_typed(job) as source:  # the input, or the method's rewrite of it (AWQ's scales)
        method.prepare_typed(job, source)
        quantized = _write(job, source, method, name or MIXED_EMBEDDINGS, req, label,
                           {TYPES_KEY: json.dumps(all_types)}, file_type, None if name else heads)
    out = Path(req.out)
    if not name and out.stat().st_size > budget:  # the accounting above is exact; this guards it
        raise SlimlmError(f"internal error: {out} is {out.stat().st_size} bytes, over the budget of {budget}")
    out.with_suffix(".tensor-types.txt").write_text("".join(f"{g}={t.lower()}\n" for g, t in all_types.items()))
    result = QuantizeResult(out=str(out), method=method.name, format=f"gguf:{label}",
                            size_before=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                            size_after=out.stat().st_size, params_quantized=quantized, params_total=params_total,
                            seconds=time.perf_counter() - start, notes=notes, tensor_types=all_types)
    extra = {"tensor_types": type_summary(all_types),
             **({} if name else {"target_size": req.target_size, "target_bpw": req.target_bpw}),
             **({"calib": req.calib, "calib_seq_len": req.calib_seq_len} if needs_text else {}),
             **({"calib_field": req.calib_field, "calib_samples": req.calib_samples, "sequential": req.sequential}
                if method.calibrated else {})}
    return finish(result, ref, folder, req.check, req.record, extra)


def _write(job: TypedJob, source: Path, method, embed_fmt: str, req: QuantRequest, label: str, metadata: dict,
           file_type: str, heads: dict[str, str] | None = None) -> int:
    """Write the file from `source`, each weight's bytes from method.encode_typed (in its type,
    job.types) or, where job.kept has it, the GGUF parent's own; the token embedding / output head
    in `heads`' types (round-to-nearest), else by --embeddings' rule."""
    from slimlm.compress.gguf_export import expert_names, export_gguf, read_config
    from slimlm.compress.kquant_formats import encode as encode_type
    from slimlm.progress import progress_bar

    tied = read_config(job.folder).get("tie_word_embeddings", True)
    embed = embedding_encoder(req.embeddings, embed_fmt, tied, job.notes)
    counted = [0]
    with progress_bar(f"{method.name} → {label}", len(job.types)) as advance:
        def writer(name_hf: str, name_gguf: str, w: np.ndarray):
            stack = expert_names(name_hf, len(w)) if w.ndim == 3 else None
            if stack and all(e in job.types for e in stack):
                # an MoE's stacked experts [E, rows, cols]: each coded as the checkpoint expert it came
                # from (its own calibration, if the method has one), bytes stacked expert by expert
                coded = [writer(e, name_gguf, w[i]) for i, e in enumerate(stack)]
                return np.stack([data for data, _ in coded]), coded[0][1]
            kept = job.kept.get(name_hf)
            if name_hf in job.types:
                counted[0] += w.size
                advance()
                return (kept.data, kept.qtype) if kept else method.encode_typed(job, name_hf, w)
            if kept:
                return kept.data, kept.qtype
            if heads and name_hf in heads:
                return encode_type(heads[name_hf], w)
            if name_hf.endswith(ROUTERS):  # kept f32, as llama-quantize keeps them from an f32 file
                return w, None
            return embed(name_gguf, w) if any(k in name_hf for k in KEEP) else None

        export_gguf(source, job.out, dtype="f16", force=req.force, tensor_writer=writer, file_type=file_type,
                    metadata=metadata)
    return counted[0]

