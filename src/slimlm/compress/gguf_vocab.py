"""The tokenizer half of a GGUF export: vocabulary, merges, special tokens and chat template.

llama.cpp must tokenize and format chats from the GGUF file alone, so everything the Hugging
Face folder keeps in tokenizer.json and tokenizer_config.json is copied into `tokenizer.ggml.*`
keys. Two kinds are written:

- byte-level BPE (llama.cpp's "gpt2" tokenizer model: Llama 3, SmolLM2, Qwen 2.5, Phi-4 and every
  tiny test model): token strings in their byte-level form, the one BPE merges act on, plus merges;
- SentencePiece-style BPE with byte fallback (llama.cpp's "llama" model: Gemma 2/3, Llama 2,
  Mistral 7B): tokens with their "▁" spaces, scores and byte tokens. transformers keeps such a
  vocabulary as a BPE with merges; SentencePiece merges the adjacent pair whose joined piece has
  the highest score, so a piece's score is minus the rank of the first merge that makes it.

Anything else is refused with a clear message rather than exported wrongly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from slimlm.errors import SlimlmError

# llama.cpp picks its pre-tokenizer regex from `tokenizer.ggml.pre`. We recognise the split
# patterns of the common tokenizers by a fragment unique to each; anything else gets llama.cpp's
# "default", which only changes how *text* is split, never the ids a caller passes in.
_PRE_SIGNATURES: list[tuple[str, str]] = [
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}", "llama-bpe"),
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|", "qwen2"),
    (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+", "gpt-4o"),
]


def _walk(node) -> list[dict]:
    """Flatten a (possibly Sequence) pre_tokenizer tree into its steps."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get("pretokenizers", []) for step in _walk(child)]
    return [node]


def _pre_name(tokenizer: dict) -> str:
    steps = _walk(tokenizer.get("pre_tokenizer"))
    patterns = [s.get("pattern", {}).get("Regex", "") for s in steps if s.get("type") == "Split"]
    for pattern in patterns:
        for fragment, name in _PRE_SIGNATURES:
            if fragment in pattern:
                return name
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex inside ByteLevel itself
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    return "default"


def _is_byte_level(tokenizer: dict) -> bool:
    steps = _walk(tokenizer.get("pre_tokenizer"))
    decoder = tokenizer.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(s.get("type") == "ByteLevel" for s in steps) or any(d.get("type") == "ByteLevel" for d in decoders)


def load_tokenizer(folder: Path):
    """(transformers tokenizer, its tokenizer.json as a dict); fails fast if it cannot be exported.

    The JSON comes from the tokenizer transformers builds, not the file: transformers 5 rebuilds
    some families' pre-tokenizers from code (Qwen 2 splits newlines its own way), and llama.cpp
    must split text the way the model was really fed.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception on malformed files
        raise SlimlmError(f"cannot load the tokenizer in {folder}: {str(exc).splitlines()[0]}") from exc
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SlimlmError(f"{folder} has no fast tokenizer (tokenizer.json): GGUF export needs one")
    data = json.loads(backend.to_str())
    if tokenizer_kind(data) is None:
        raise SlimlmError(f"{folder.name}'s tokenizer is {data.get('model', {}).get('type', 'unknown')} without "
                          "byte-level pre-tokenization or byte fallback; GGUF export supports byte-level BPE "
                          "(Llama 3, SmolLM2, Qwen 2.5, Phi-4) and SentencePiece-style BPE (Gemma, Mistral 7B) only")
    return tok, data


def tokenizer_kind(data: dict) -> str | None:
    """llama.cpp's tokenizer model for this tokenizer.json: "gpt2", "llama", or None if neither fits."""
    model = data.get("model", {})
    if model.get("type") != "BPE":
        return None
    if _is_byte_level(data):
        return "gpt2"
    if model.get("byte_fallback"):
        return "llama"
    return None


def _adds_space_prefix(data: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2 does, Gemma does not)."""
    steps = _walk(data.get("normalizer")) + _walk(data.get("pre_tokenizer"))
    for step in steps:
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") in ("always", "first"):
            return True
    return False


def spm_tables(data: dict, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a byte-fallback BPE, as llama.cpp's "llama" tokenizer reads them."""
    from gguf import TokenType

    tokens, _, _, _ = vocab_tables(data, vocab_size)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in data["model"].get("merges", [])]
    rank: dict[str, int] = {}
    for i, (left, right) in enumerate(merges):
        rank.setdefault(left + right, i)
    # Pieces no merge makes (single characters, bytes, specials) are never a merge's result;
    # a score below every merge keeps SentencePiece from preferring them.
    floor = -float(len(merges) + 1)
    scores = [-float(rank[t]) if t in rank else floor for t in tokens]
    added = {int(a["id"]): a for a in data.get("added_tokens", [])}
    unk = data["model"].get("unk_token")
    types = []
    for i, token in enumerate(tokens):
        if i in added:
            types.append(int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        elif token == unk:
            types.append(int(TokenType.UNKNOWN))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(int(TokenType.BYTE))
        elif token.startswith("[PAD") and token.endswith("]") and token not in data["model"]["vocab"]:
            types.append(int(TokenType.UNUSED))
        else:
            types.append(int(TokenType.NORMAL))
    return tokens, scores, types


def vocab_tables(data: dict, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, pre-tokenizer name), padded to the model's vocab_size."""
    from gguf import TokenType

    by_id: dict[int, str] = {int(i): tok for tok, i in data["model"]["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(by_id, int(TokenType.NORMAL))
    for added in data.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    n = max(vocab_size, max(by_id) + 1)
    if n > vocab_size:
        raise SlimlmError(f"the tokenizer has {n} tokens but config.json says vocab_size={vocab_size}: "
                          "the tokenizer does not belong to this model")
    # Embedding rows past the tokenizer (padding to a multiple of 64 or 128) still need names.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    token_types = [types.get(i, int(TokenType.UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, token_types, merges, _pre_name(data)


def _special_ids(folder: Path, tok) -> dict[str, int | bool | str | None]:
    """bos/eos/pad/unk ids, whether encoding adds BOS/EOS, and the chat template, as transformers sees them."""
    probe = tok("a b")["input_ids"]
    template = tok.chat_template
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return {
        "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id,
        "add_bos": tok.bos_token_id is not None and bool(probe) and probe[0] == tok.bos_token_id,
        "add_eos": tok.eos_token_id is not None and bool(probe) and probe[-1] == tok.eos_token_id,
        "template": template,
    }


def add_vocab(writer, folder: Path, tokenizer, vocab_size: int) -> list[str]:
    """Write the tokenizer.ggml.* keys and the chat template; `tokenizer` is load_tokenizer's pair.

    Returns the token strings."""
    tok, data = tokenizer
    if tokenizer_kind(data) == "llama":
        tokens, scores, token_types = spm_tables(data, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(token_types)
        writer.add_add_space_prefix(_adds_space_prefix(data))
    else:
        tokens, token_types, merges, pre = vocab_tables(data, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        if merges:
            writer.add_token_merges(merges)
    special = _special_ids(Path(folder), tok)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if special[key] is not None and 0 <= int(special[key]) < len(tokens):
            add(int(special[key]))
    writer.add_add_bos_token(bool(special["add_bos"]))
    writer.add_add_eos_token(bool(special["add_eos"]))
    if special["template"]:
        writer.add_chat_template(special["template"])
    return tokens


# llama.cpp sets Phi-3 token attributes when general.name contains "phi3"/"phi-3", and fails to
# load if these tokens are then missing; such a vocabulary must not carry that name.
_PHI3_NAMES = re.compile(r"phi-?3", re.IGNORECASE)
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def clean_name(name: str, tokens: list[str]) -> str:
    """A readable general.name from a folder name, safe for llama.cpp's name-keyed vocab quirks."""
    name = re.sub(r"[^\w.\-]+", "-", name).strip("-") or "model"
    if _PHI3_NAMES.search(name) and not set(_PHI3_TOKENS) <= set(tokens):
        name = _PHI3_NAMES.sub("phi", name)
    return name
