"""The steps of quantize() that every method shares: which output format, which calibration
text, which tensors get quantized, and how the chosen codes are written (a GGUF file, or a
packed Hugging Face folder). What differs between methods (the codes, a rewritten source folder,
a format constraint) is asked of the method's class (quant_methods/), never branched on here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimlm.compress.blocks import FORMATS, BlockFormat, get_format, pack, rtn
from slimlm.errors import SlimlmError

# Tensors kept in higher precision: the token embedding and output head (as llama.cpp's quantizer
# does for small models) and every 1-D tensor.
KEEP = ("embed_tokens", "lm_head", "wte", "word_embeddings")
# MoE routers stay unquantized (llama-quantize skips ffn_gate_inp too): they are tiny, and a rounding
# error there moves tokens to other experts.
ROUTERS = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", "shared_expert_gate.weight")


def parse_format(fmt: str) -> BlockFormat:
    """'gguf:Q4_0' (or just 'Q4_0') -> the block format."""
    kind, sep, name = fmt.partition(":")
    if sep and kind.lower() != "gguf":
        raise SlimlmError(f"unsupported output format '{fmt}': this version writes gguf:TYPE "
                          f"with TYPE one of {', '.join(FORMATS)}")
    return get_format(name if sep else kind)


def calibration_texts(folder: Path, calib: str, calib_field: str | None, seq_len: int) -> list[str]:
    """The calibration documents, checked to hold at least one sequence before any long work.
    `python-docs` leaves out its last three topics: quick_fidelity scores those."""
    from transformers import AutoTokenizer

    from slimlm.data import calibration_corpus

    texts = calibration_corpus(calib, calib_field)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    n = len(tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"])
    if n < seq_len:
        raise SlimlmError(f"calibration text is shorter than one sequence: {n} tokens in {calib} for "
                          f"--calib-seq-len {seq_len}: give more text or a shorter --calib-seq-len")
    return texts


def resolve_format(format: str, method, bits: int | None, group_size: int | None,
                   symmetric: bool) -> tuple[str, BlockFormat]:
    """("gguf" | "hf", format). GGUF block formats fix bits and group size; `hf` (a packed Hugging
    Face folder) takes any of bits 8/4/3/2 (or ternary), group size (0: per channel) and symmetry.
    `method` (a QuantMethod) picks its own format for `hf` and bare `gguf`, and rejects formats
    it cannot write (`check_format`)."""
    kind, sep, name = format.partition(":")
    if kind.lower() == "hf":
        if sep:
            raise SlimlmError(f"unsupported output format '{format}': --format hf takes no type; "
                              "choose the bits with --bits (8, 4, 3, 2) or --method ternary")
        fmt = method.hf_format(bits, HF_GROUP if group_size is None else group_size, symmetric)
        method.check_format("hf", fmt)
        return "hf", fmt
    if not sep and kind.lower() == "gguf":  # --format gguf --bits N
        name, sep = method.gguf_type(bits), ":"
        if not name:
            raise SlimlmError(f"no {bits}-bit llama.cpp block format that slimlm writes: use --format hf, or "
                              f"--method llamacpp --format gguf:Q{bits}_K_M for llama.cpp's K-quants")
    fmt = parse_format(format if name == "" else f"gguf:{name}")
    method.check_format("gguf", fmt)
    if bits is not None and bits != fmt.bits:
        raise SlimlmError(f"{fmt.name} holds {fmt.bits}-bit codes, not {bits}: drop --bits or use --format hf")
    if group_size is not None and group_size != fmt.block_size:
        raise SlimlmError(f"{fmt.name} fixes the group size at {fmt.block_size}: drop --group-size, or use "
                          "--format hf for other group sizes")
    return "gguf", fmt


HF_GROUP = 64  # divides the widths of every small model slimlm ships or tests (576, 640, 896, 1536, 2048)
GGUF_BY_BITS = {8: "Q8_0", 5: "Q5_0", 4: "Q4_0"}  # `--format gguf --bits N` (ternary: TQ2_0)


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return (len(shape) == 2 and name.endswith(".weight") and not any(k in name for k in KEEP)
            and not name.endswith(ROUTERS))


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without loading any weight (for checks up front)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as st:  # header only, as models/info.py reads it
            shapes.update({name: tuple(st.get_slice(name).get_shape()) for name in st.keys()})
    if not shapes:
        raise SlimlmError(f"{folder}: no safetensors weights found: quantize takes a Hugging Face folder "
                          "(run `slimlm convert` first for a GGUF file)")
    return shapes


def check_widths(shapes: dict[str, tuple[int, ...]], fmt: BlockFormat) -> None:
    for name, shape in shapes.items():
        if fmt.block_size and quantizable(name, shape) and shape[-1] % fmt.block_size:
            raise SlimlmError(f"{name}: the layer width {shape[-1]} is not a multiple of the {fmt.name} "
                              f"group size {fmt.block_size}: choose another format or --group-size "
                              "(--format hf takes any group size that divides the widths)")


def round_to_nearest(kind: str, fmt: BlockFormat, w: np.ndarray):
    """RTN codes (q, d, m) for one weight: llama.cpp's rule in a GGUF block format, or the same
    arithmetic with uint8 codes (8-bit codes 0..255 fit) for a packed folder's format."""
    from slimlm.compress.packed import for_width, int_rtn

    return int_rtn(for_width(fmt, w.shape[1]), w) if kind == "hf" else rtn(fmt, w)


EMBEDDING_TYPES = ("auto", "f16", "Q8_0", "Q6_K")  # --embeddings

EMBEDDING_DEFAULTS: dict[str, tuple[str, str]] = {
    # type: (output head, and the token embedding where the output is tied to it; untied token embedding)
    "Q4_0": ("Q6_K", "Q4_0"),
    "Q4_1": ("Q6_K", "Q4_1"),
    "Q5_0": ("Q6_K", "Q5_0"),
    "Q5_1": ("Q6_K", "Q5_1"),
    "Q8_0": ("Q8_0", "Q8_0"),
    "TQ1_0": ("Q6_K", "Q4_K"),
    "TQ2_0": ("Q6_K", "Q4_K"),
    "Q2_K": ("Q6_K", "Q2_K"),
    "Q3_K": ("Q6_K", "Q3_K"),
    "Q3_K_S": ("Q6_K", "Q3_K"),
    "Q3_K_M": ("Q6_K", "Q3_K"),
    "Q3_K_L": ("Q6_K", "Q3_K"),
    "Q4_K": ("Q6_K", "Q4_K"),
    "Q4_K_S": ("Q6_K", "Q4_K"),
    "Q4_K_M": ("Q6_K", "Q4_K"),
    "Q5_K": ("Q6_K", "Q5_K"),
    "Q5_K_S": ("Q6_K", "Q5_K"),
    "Q5_K_M": ("Q6_K", "Q5_K"),
    "Q6_K": ("Q6_K", "Q6_K"),
}
"""What llama-quantize stores the output head and the token embedding as, by default, for each GGUF
type slimlm writes (`--embeddings auto`): llama.cpp's `llama_tensor_get_type` in src/llama-quant.cpp
(the rule is in `llama_tensor_get_type_impl`, the shape fallback in `tensor_type_fallback`), as in
the llama.cpp that llama-cpp-python 0.3.36 vendors, run without --token-embedding-type,
--output-tensor-type, --pure or an importance matrix:

- the output head, or the token embedding where the output is tied to it (no output.weight), is
  Q6_K unless the type is Q8_0 (then Q8_0), or the type's own block does not divide the width (then
  Q8_0);
- an untied token embedding keeps the file's type, except for the ternary types (Q4_K); a K-quant
  mix's base type (Q2_K for Q2_K, Q3_K for Q3_K_S/M/L, Q4_K for Q4_K_S/M, Q5_K for Q5_K_S/M:
  kquant_formats.BASE_TYPE);
- a type whose block does not divide the width falls back: Q6_K -> Q8_0, Q5_K -> Q5_1, Q4_K -> Q5_0,
  Q3_K and Q2_K -> Q4_0, then f16 (EMBEDDING_FALLBACK; a 32-block type goes straight to f16).

Every type the rule picks slimlm writes as llama.cpp does: f16, Q8_0 and the file's own block type
with its block formats, Q6_K (kquants.py), Q4_K and Q5_K (kquants_q45.py), Q2_K and Q3_K
(kquants_q23.py) byte for byte as llama.cpp's reference quantizers."""
EMBEDDING_FALLBACK = {"Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}


def _block_size(kind: str) -> int:
    from slimlm.compress.kquant_formats import BASE_TYPE, block_size

    return block_size(BASE_TYPE.get(kind, kind)) if kind in BASE_TYPE else get_format(kind).block_size


def check_embeddings(embeddings: str) -> str:
    """The --embeddings value in canonical spelling ('auto', 'f16', 'Q8_0', 'Q6_K'), or SlimlmError."""
    for kind in EMBEDDING_TYPES:
        if embeddings.lower() == kind.lower():
            return kind
    raise SlimlmError(f"--embeddings {embeddings}: choose one of {', '.join(EMBEDDING_TYPES)}")


def embedding_type(embeddings: str, fmt_name: str, role: str, width: int, tied: bool) -> tuple[str, str]:
    """(type llama.cpp picks, type slimlm writes: the same) for the token embedding (role
    'token_embd') or the output head (role 'output') of width `width` in a `fmt_name` file: the
    EMBEDDING_DEFAULTS rule for --embeddings auto, else the type asked for; after the shape fallback."""
    kind = check_embeddings(embeddings)
    if kind == "f16":
        return "f16", "f16"
    if kind == "auto":
        head, untied_embd = EMBEDDING_DEFAULTS[fmt_name]
        if role == "output" or tied:
            kind = head if width % _block_size(fmt_name) == 0 else "Q8_0"
        else:
            kind = untied_embd
    while kind != "f16" and width % _block_size(kind):
        kind = EMBEDDING_FALLBACK.get(kind, "f16")
    return kind, kind


def embedding_encoder(embeddings: str, fmt_name: str = "Q8_0", tied: bool = True,
                      notes: list[str] | None = None):
    """(name_gguf, w) -> (bytes, type) or None (f16) for the token embedding / output head, typed by
    embedding_type (a fallback is noted in `notes`)."""
    from slimlm.compress.kquant_formats import encode as encode_type

    check_embeddings(embeddings)

    def encode(name_gguf: str, w: np.ndarray):
        if w.ndim != 2:
            return None
        role = "output" if name_gguf.startswith("output") else "token_embd"
        _, kind = embedding_type(embeddings, fmt_name, role, w.shape[-1], tied)
        asked = check_embeddings(embeddings)
        if notes is not None and asked not in ("auto", "f16") and asked != kind:
            notes.append(f"{name_gguf}: width {w.shape[-1]} is not a multiple of {_block_size(asked)}, so "
                         f"{asked} cannot hold it: stored as {kind}, as llama-quantize falls back")
        return None if kind == "f16" else encode_type(kind, w)

    return encode


def write_gguf(source: Path, out: Path, fmt, targets, choose, embeddings: str, force: bool, method: str,
               notes: list[str] | None = None) -> int:
    from slimlm.compress.gguf_export import expert_count, expert_names, export_gguf, read_config
    from slimlm.compress.kquant_formats import encode as encode_type
    from slimlm.progress import progress_bar

    config = read_config(source)
    tied = config.get("tie_word_embeddings", True)  # as export_gguf decides to write output.weight
    n_experts = expert_count(config)
    embed = embedding_encoder(embeddings, fmt.name, tied, notes)
    counted = [0]
    bumped: list[str] = []
    with progress_bar(f"{method} → {fmt.name}", len(targets)) as advance:
        def one(name_hf: str, w: np.ndarray) -> np.ndarray:
            q, d, m = choose(name_hf, w)
            counted[0] += w.size
            advance()
            return pack(fmt, q, d, m)

        def writer(name_hf: str, name_gguf: str, w: np.ndarray):
            experts = expert_names(name_hf, n_experts) if w.ndim == 3 else None
            if experts and all(e in targets for e in experts):
                # An MoE's stacked experts, [E, rows, cols]: each expert is coded as the checkpoint tensor
                # it came from (its own calibration, if the method has one), and the bytes are stacked as
                # llama.cpp lays them out (expert by expert, row by row).
                return np.stack([one(e, w[i]) for i, e in enumerate(experts)]), fmt.qtype
            if name_hf.endswith(ROUTERS):  # kept f32, as llama-quantize keeps them from an f32 file
                return w.astype(np.float32), None
            if name_hf not in targets:
                return embed(name_gguf, w) if any(k in name_hf for k in KEEP) else None
            if (n_experts == 8 and fmt.name != "Q8_0" and name_gguf.endswith(("attn_k.weight", "attn_v.weight"))
                    and w.shape[-1] % 32 == 0):
                # llama-quantize keeps an 8-expert model's attention keys and values in Q8_0 whatever the
                # file type ("bumping this to Q8_0 trades just ~128MB", llama-quant.cpp); so does slimlm,
                # rounding to nearest, so its file has llama.cpp's types and size.
                counted[0] += w.size
                advance()
                bumped.append(name_gguf)
                return encode_type("Q8_0", w)
            return one(name_hf, w), fmt.qtype

        export_gguf(source, out, dtype="f16", force=force, tensor_writer=writer, file_type=fmt.name)
    if bumped and notes is not None:
        notes.append(f"{len(bumped)} attention key/value tensors stored as Q8_0 (rounded to nearest), as "
                     "llama-quantize does for 8-expert models")
    return counted[0]


def write_hf(source: Path, out: Path, fmt, targets, choose, force: bool, method: str) -> int:
    from safetensors import safe_open

    from slimlm.compress.packed import save_packed
    from slimlm.progress import progress_bar

    choices, counted = {}, 0
    with progress_bar(f"{method} → {fmt.name}", len(targets)) as advance:
        for file in sorted(source.glob("*.safetensors")):
            with safe_open(file, framework="numpy") as st:
                for name in st.keys():
                    if name in targets:
                        w = st.get_tensor(name).astype(np.float32)
                        choices[name] = choose(name, w)
                        counted += w.size
                        advance()
    save_packed(source, out, choices, fmt, {"method": method}, force=force)
    return counted
