"""What a model is, read from its files without loading its weights.

Parameter counts come from the safetensors headers or the GGUF tensor table, so `slimlm info`
answers in well under a second even for models that would take minutes to load. For MoE models
the active count is total minus the routed experts a token does not visit.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.models.families import FAMILIES
from slimlm.models.reference import ModelRef, resolve


@dataclass
class ModelInfo:
    model: str
    format: str  # "hf" or "gguf"
    architecture: str  # transformers model_type (hf) or llama.cpp architecture (gguf)
    family: str | None
    params_total: int
    params_active: int
    dtype: str  # storage dtype or quantization type(s)
    size_bytes: int
    context_length: int | None
    chat_template: bool
    experts: int | None = None
    experts_per_token: int | None = None
    # Multiply-adds x 2 of one token's forward pass at zero context: every weight the token is
    # multiplied by (the active ones, the output projection included; the input embedding is a lookup).
    # Attention over the context adds about 4 x layers x context x attention width on top.
    flops_per_token: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _active(total: int, routed_expert_params: int, experts: int | None, used: int | None) -> int:
    if not experts or not used or not routed_expert_params:
        return total
    return total - routed_expert_params + routed_expert_params * used // experts


def _flops(active: int, embedding: int, vectors: int, tied: bool) -> int:
    """2 x active weight-matrix entries (norm and bias vectors are elementwise, not multiplies), less
    the input embedding unless the output projection reuses it."""
    return 2 * (active - vectors - (0 if tied else embedding))


def _is_embedding(name: str) -> bool:
    return "embed_tokens" in name or name.startswith("token_embd")


def _is_routed_expert(name: str) -> bool:
    return ".experts." in name or name.endswith(".experts") or "_exps" in name


def _hf_info(ref: ModelRef) -> ModelInfo:
    from safetensors import safe_open

    folder = ref.path
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type", "unknown")
    text_cfg = config.get("text_config", config)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"{folder} has no .safetensors weights: slimlm reads safetensors folders only")
    total, routed, embedding, vectors, dtypes = 0, 0, 0, 0, Counter()
    names = set()
    for f in files:
        with safe_open(f, framework="numpy") as st:  # header only; no tensor is read
            for name in st.keys():
                sl = st.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n
                routed += n if _is_routed_expert(name) else 0
                embedding += n if _is_embedding(name) else 0
                vectors += n if len(sl.get_shape()) < 2 else 0
                names.add(name)
                dtypes[sl.get_dtype()] += n
    fam = FAMILIES.get(model_type)
    experts = text_cfg.get(fam.experts_key) if fam and fam.experts_key else None
    used = text_cfg.get(fam.experts_used_key) if fam and fam.experts_used_key else None
    quant = config.get("quantization_config")
    dtype = quant.get("quant_method", "quantized") if isinstance(quant, dict) else (
        dtypes.most_common(1)[0][0].lower() if dtypes else "unknown")
    tok_cfg = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").exists() or (
        tok_cfg.exists() and "chat_template" in json.loads(tok_cfg.read_text()))
    active = _active(total, routed, experts, used)
    tied = not any(n.endswith("lm_head.weight") for n in names)
    return ModelInfo(
        model=ref.spec, format="hf", architecture=model_type, family=fam.label if fam else None,
        params_total=total, params_active=active, dtype=dtype,
        size_bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        context_length=text_cfg.get("max_position_embeddings"), chat_template=has_template,
        experts=experts, experts_per_token=used, flops_per_token=_flops(active, embedding, vectors, tied))


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _gguf_info(ref: ModelRef) -> ModelInfo:
    from gguf import GGUFReader

    from slimlm.models.loading import check_gguf

    check_gguf(ref.path)
    reader = GGUFReader(ref.path)
    arch = _gguf_field(reader, "general.architecture") or "unknown"
    total, routed, embedding, vectors, types = 0, 0, 0, 0, Counter()
    for t in reader.tensors:
        n = int(t.n_elements)
        total += n
        routed += n if _is_routed_expert(t.name) else 0
        embedding += n if _is_embedding(t.name) else 0
        vectors += n if sum(int(d) > 1 for d in t.shape) < 2 else 0
        types[t.tensor_type.name] += n
    experts = _gguf_field(reader, f"{arch}.expert_count")
    used = _gguf_field(reader, f"{arch}.expert_used_count")
    family = next((f.label for f in FAMILIES.values() if f.gguf_arch == arch), None)
    active = _active(total, routed, experts, used)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return ModelInfo(
        model=ref.spec, format="gguf", architecture=arch, family=family, params_total=total,
        params_active=active,
        dtype="/".join(name for name, _ in types.most_common(3)),
        size_bytes=ref.path.stat().st_size, context_length=_gguf_field(reader, f"{arch}.context_length"),
        chat_template=_gguf_field(reader, "tokenizer.chat_template") is not None,
        experts=experts, experts_per_token=used, flops_per_token=_flops(active, embedding, vectors, tied))


def model_info(model: str | Path | ModelRef) -> ModelInfo:
    """Architecture, parameters (total and active), dtype, size, context, chat template."""
    ref = resolve(model)
    return _gguf_info(ref) if ref.kind == "gguf" else _hf_info(ref)
