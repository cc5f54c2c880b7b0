"""The steps of quantize() that depend on the method and the output: which format, which
calibration text, which folder's weights get rounded (AWQ rewrites them first), how each weight's
codes are chosen, and how they are written (a GGUF file, or a packed Hugging Face folder)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from slimlm.compress.blocks import FORMATS, BlockFormat, get_format, pack, rtn
from slimlm.errors import SlimlmError

# Tensors kept in higher precision: the token embedding and output head (as llama.cpp's quantizer
# does for small models) and every 1-D tensor.
KEEP = ("embed_tokens", "lm_head", "wte", "word_embeddings")


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


def resolve_format(format: str, method: str, bits: int | None, group_size: int | None,
                   symmetric: bool) -> tuple[str, BlockFormat]:
    """("gguf" | "hf", format). GGUF block formats fix bits and group size; `hf` (a packed Hugging
    Face folder) takes any of bits 8/4/3/2 (or ternary), group size (0: per channel) and symmetry."""
    from slimlm.compress.packed import int_format, ternary_format

    kind, sep, name = format.partition(":")
    if kind.lower() == "hf":
        if sep:
            raise SlimlmError(f"unsupported output format '{format}': --format hf takes no type; "
                              "choose the bits with --bits (8, 4, 3, 2) or --method ternary")
        group = HF_GROUP if group_size is None else group_size
        return "hf", ternary_format(group) if method == "ternary" else int_format(bits or 4, group, symmetric)
    if not sep and kind.lower() == "gguf":  # --format gguf --bits N
        name, sep = GGUF_BY_BITS.get("ternary" if method == "ternary" else bits or 4, ""), ":"
        if not name:
            raise SlimlmError(f"no {bits}-bit llama.cpp block format that slimlm writes: use --format hf, or "
                              f"--method llamacpp --format gguf:Q{bits}_K_M for llama.cpp's K-quants")
    fmt = parse_format(format if name == "" else f"gguf:{name}")
    if method == "ternary" and not fmt.name.startswith("TQ"):
        raise SlimlmError(f"the ternary method writes TQ1_0 or TQ2_0 (or --format hf), not {fmt.name}")
    if bits is not None and bits != fmt.bits:
        raise SlimlmError(f"{fmt.name} holds {fmt.bits}-bit codes, not {bits}: drop --bits or use --format hf")
    if group_size is not None and group_size != fmt.block_size:
        raise SlimlmError(f"{fmt.name} fixes the group size at {fmt.block_size}: drop --group-size, or use "
                          "--format hf for other group sizes")
    return "gguf", fmt


HF_GROUP = 64  # divides the widths of every small model slimlm ships or tests (576, 640, 896, 1536, 2048)
GGUF_BY_BITS = {8: "Q8_0", 5: "Q5_0", 4: "Q4_0", "ternary": "TQ2_0"}


@contextmanager
def source_folder(method, folder: Path, fmt, out: Path, texts, samples: int, seq_len: int):
    """(the folder whose weights get rounded, notes): the input, or for AWQ an fp32-equivalent copy
    whose weights round better, removed afterwards."""
    if method != "awq":
        yield folder, []
        return
    import tempfile

    from slimlm.compress.awq import apply_awq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.awq-", dir=out.parent))
    try:
        report = apply_awq(folder, tmp / "model", fmt, texts, samples=samples, seq_len=seq_len, progress=True)
        notes = [f"AWQ scaled {len(report['scaled'])} groups"] + [
            f"AWQ skipped layer {s['layer']} {s['group']}: {s['why']}" for s in report["skipped"]
            if s["group"] != "v->o"]
        yield tmp / "model", notes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def chooser(method, kind, fmt, source: Path, texts, samples, seq_len, sequential, notes):
    """choose(name, w) -> (q, d, m): the method's codes for one weight, in the output's layout."""
    from slimlm.compress.packed import for_width, int_rtn

    def plain(name, w):
        f = for_width(fmt, w.shape[1]) if kind == "hf" else fmt
        if method == "ternary":
            from slimlm.compress.ternary import ternary_quantize

            return ternary_quantize(w, f.block_size)
        return int_rtn(f, w) if kind == "hf" else rtn(f, w)

    if method != "gptq":
        return plain
    from slimlm.compress.gptq import GPTQ

    fmt_of = (lambda cols: for_width(fmt, cols)) if kind == "hf" else fmt  # noqa: E731
    identity = (lambda name, w: w) if kind == "hf" else None  # noqa: E731
    gptq = (GPTQ().prepare_sequential(source, fmt_of, texts, samples=samples, seq_len=seq_len, transform=identity)
            if sequential else GPTQ().prepare(source, texts, samples=samples, seq_len=seq_len))
    notes.extend(gptq.notes)
    return lambda name, w: gptq.quantize_tensor(fmt_of(w.shape[1]) if kind == "hf" else fmt, name, w)


def write_gguf(source: Path, out: Path, fmt, targets, choose, embeddings: str, force: bool, method: str) -> int:
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.progress import progress_bar

    embed_fmt = get_format("Q8_0") if embeddings.upper() == "Q8_0" else None
    counted = [0]
    with progress_bar(f"{method} → {fmt.name}", len(targets)) as advance:
        def writer(name_hf: str, name_gguf: str, w: np.ndarray):
            if name_hf not in targets:
                if embed_fmt is not None and w.ndim == 2 and any(k in name_hf for k in KEEP) \
                        and w.shape[-1] % embed_fmt.block_size == 0:
                    return pack(embed_fmt, *rtn(embed_fmt, w)), embed_fmt.qtype
                return None
            q, d, m = choose(name_hf, w)
            counted[0] += w.size
            advance()
            return pack(fmt, q, d, m), fmt.qtype

        export_gguf(source, out, dtype="f16", force=force, tensor_writer=writer, file_type=fmt.name)
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
