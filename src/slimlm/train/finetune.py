"""Fine-tune a model on your data: LoRA or DoRA adapters (through peft), or every weight.

LoRA trains two thin matrices beside each chosen projection and leaves the model's weights
frozen, so a small model fine-tunes on a laptop CPU and the result is a few megabytes that
peft (or llama.cpp, from the GGUF adapter) applies to the unchanged base. DoRA also learns
each weight column's magnitude, which often closes part of the gap to full fine-tuning for the
same rank. `merge=True` folds the adapter into the weights and writes an ordinary dense folder
that every slimlm command (and `slimlm export`) takes.

The run folder holds the result, `checkpoints/`, `train_log.jsonl` and `loss.png`; its
`slimlm.json` is written last, so a folder without one is an unfinished run (--resume).
The settings are one `FinetuneConfig` (train/configs.py), which a YAML recipe can hold.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from slimlm.config import make_config
from slimlm.errors import SlimlmError
from slimlm.train.configs import METHODS, FinetuneConfig
from slimlm.train.core import Trainer, TrainResult, process_state
from slimlm.train.data import load_data

__all__ = ["DEFAULT_TARGETS", "METHODS", "FinetuneConfig", "FinetuneResult", "add_adapter", "export_gguf_lora",
           "finetune", "linear_names", "prepare_out", "resolve_targets", "write_result"]
_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
# Attention and MLP projections per family, by transformers' module names.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _ATTN + _MLP, "mistral": _ATTN + _MLP, "qwen2": _ATTN + _MLP,
    "gemma2": _ATTN + _MLP, "gemma3_text": _ATTN + _MLP,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused projections
    "mixtral": _ATTN,  # the experts are one fused 3-D parameter per layer, not Linear modules
    "qwen2_moe": _ATTN,  # as mixtral (its shared expert is Linear, but peft's MoE conversion renames MLPs)
    # attention only, as for mixtral: peft rewrites MLP names in MoE models into the fused expert
    # parameters (its MoE conversion), which LoRA then trains without dropout and llama.cpp cannot load
    "deepseek_v3": ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
}
_RUN_FILES = ("slimlm.json", "checkpoints", "train_log.jsonl")


@dataclass
class FinetuneResult:
    out: Path
    method: str
    merged: bool
    adapter: Path | None  # the peft adapter folder (None for full fine-tuning)
    targets: list[str]
    trainable_params: int
    total_params: int
    train: TrainResult
    data: dict = field(default_factory=dict)
    model: object = field(default=None, repr=False)  # the trained model in memory (peft-wrapped for adapters)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return dict(d, out=str(self.out), adapter=str(self.adapter) if self.adapter else None,
                    train=self.train.to_dict())


def linear_names(model) -> list[str]:
    """The distinct last names of the model's Linear modules: what --target can name."""
    import torch

    from slimlm.train.qlora import packed_linear_class

    kinds = (torch.nn.Linear, packed_linear_class())  # a slimlm-quantized base's linears are packed
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)})


def resolve_targets(model, target_modules: list[str] | None) -> list[str]:
    """The module names LoRA wraps: the family's default, or the user's, each checked to match."""
    model_type = getattr(model.config, "model_type", "unknown")
    available = linear_names(model)
    names = [n for n, _ in model.named_modules()]
    if target_modules is None:
        default = DEFAULT_TARGETS.get(model_type)
        return [t for t in default if t in available] if default else [n for n in available if n != "lm_head"]
    targets = [t.strip() for item in target_modules for t in item.split(",") if t.strip()]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise SlimlmError(f"LoRA target '{t}' matches no module of this {model_type} model: "
                              f"its linear modules are {', '.join(available)}")
    if not targets:
        raise SlimlmError(f"no LoRA target given: name modules such as {', '.join(available)}")
    return targets


def add_adapter(model, method: str, rank: int, alpha: float, dropout: float, targets: list[str]):
    """Wrap `model` with a fresh LoRA/DoRA adapter (peft); only the adapter's weights train."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise SlimlmError(f"rank {rank} must be at least 1 (8-64 is typical)")
    from slimlm.train.qlora import has_packed, quiet_peft, register

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        use_dora=method == "dora", task_type="CAUSAL_LM")
    if has_packed(model):  # QLoRA-style: a frozen, slimlm-quantized base
        if method != "lora":
            raise SlimlmError(f"--method {method} needs float base weights; this base is quantized: use --method lora "
                              "(QLoRA-style), or train on the unquantized model")
        register(config)
        with quiet_peft():
            return get_peft_model(model, config)
    return get_peft_model(model, config)


def prepare_out(out: Path, resume: bool, force: bool, own: tuple[str, ...] = (),
                 resumable: tuple[str, ...] = ("checkpoints",)) -> None:
    """Refuse to overwrite work by accident; --force deletes only what looks like slimlm's output.
    `own`: more file names that mark a folder as slimlm's (distill adds its own); `resumable`: the
    names whose presence makes --resume worth suggesting."""
    if not out.exists() or not any(out.iterdir()):
        return
    ours = any((out / name).exists() for name in (*_RUN_FILES, "config.json", *own))
    if force and not resume:
        if not ours:
            raise SlimlmError(f"{out} is not a slimlm output folder; --force will not delete it: choose another --out")
        shutil.rmtree(out)
    elif not resume:
        hint = "pass --resume to continue it, " if any((out / name).exists() for name in resumable) else ""
        raise SlimlmError(f"{out} already exists: {hint}choose another --out, or pass --force to start over")


def _source_dtype(folder: Path):
    """The dtype the base was saved in, so a bf16/fp16 model stays that size after merging
    (training itself loads it in fp32)."""
    import torch

    from slimlm.models.loading import read_config

    config = read_config(folder)
    name = str(config.get("dtype") or config.get("torch_dtype") or "")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def finetune(model, data, out, config: FinetuneConfig | str | Path | dict | None = None, *, resume: bool = False,
             force: bool = False, record_run: bool = True, **overrides) -> FinetuneResult:
    """Train `model` on `data` (JSONL chat/pairs/text, .txt, or python-docs) and write the result to `out`.

    config: a FinetuneConfig, a YAML recipe's path or a mapping (None: the defaults); `overrides`
    are FinetuneConfig fields set on top of it (`rank=8`, `train=TrainConfig(...)`), checked by name
    and type. resume/force: continue the run in `out`, or delete it and start over.
    """
    from accelerate.utils import set_seed

    from slimlm.models.loading import dense_folder, load_torch
    from slimlm.models.reference import resolve

    out = Path(out)
    cfg = make_config(FinetuneConfig, config, "finetune()", **overrides)
    cfg = replace(cfg, train=replace(cfg.train, out=str(out))).validate()
    method, merge, gguf, state = cfg.method, cfg.merge, cfg.gguf, process_state()
    if state.is_main_process:
        prepare_out(out, resume, force)
    state.wait_for_everyone()
    ref = resolve(model)
    base, tokenizer = load_torch(ref)
    from slimlm.train.qlora import has_packed

    if has_packed(base):  # QLoRA-style: only a LoRA adapter can train on packed, frozen weights
        wrong = {"full": "--method full", "dora": "--method dora", "merge": "--merge", "gguf": "--gguf"}
        asked = [wrong[k] for k, on in (("full", method == "full"), ("dora", method == "dora"), ("merge", merge),
                                        ("gguf", gguf)) if on]
        if asked:
            raise SlimlmError(f"{model} is quantized (slimlm packed): {', '.join(asked)} needs float base weights; "
                              "train a plain LoRA adapter on it (QLoRA-style), or use the unquantized model")
    if gguf:
        from slimlm.compress.gguf_export import ARCHS

        if base.config.model_type not in ARCHS:
            raise SlimlmError(f"--gguf: llama.cpp export does not support {base.config.model_type}; "
                              f"supported: {', '.join(ARCHS)}")
    tc = replace(cfg.train, shuffle=False) if cfg.curriculum else cfg.train  # a curriculum is an order
    train_data = load_data(data, tokenizer, seq_len=cfg.seq_len, eval_fraction=cfg.eval_fraction, seed=tc.seed,
                           train_on_prompt=cfg.train_on_prompt, pack_examples=cfg.pack,
                           skip_bad_lines=cfg.skip_bad_lines, curriculum=cfg.curriculum,
                           buckets=cfg.curriculum_buckets)
    total = sum(p.numel() for p in base.parameters())
    targets: list[str] = []
    set_seed(tc.seed)  # the adapter's random initialization is part of the run
    if method == "full":
        trained = base
    else:
        targets = resolve_targets(base, cfg.target_modules)
        trained = add_adapter(base, method, cfg.rank, cfg.alpha, cfg.dropout, targets)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    trainer = Trainer(trained, tc, train_data)
    result = trainer.train(resume=resume)
    info = {"kind": train_data.kind, "train_examples": len(train_data.train), "eval_examples": len(train_data.eval),
            "train_tokens": train_data.train_tokens, "packed": train_data.packed, "truncated": train_data.truncated,
            "dropped": train_data.dropped, "skipped": len(train_data.skipped)}
    final = FinetuneResult(out, method, merge, None if method == "full" else (out / "adapter" if merge else out),
                           targets, trainable, total, result, info, trainer.unwrapped_model)
    if state.is_main_process:
        params = {"method": method, "targets": targets, "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
                  "merged": merge, "train_on_prompt": cfg.train_on_prompt, "data": str(data), "seq_len": cfg.seq_len,
                  "eval_fraction": cfg.eval_fraction, "train": tc.to_dict(), "data_info": info}
        metrics = {k: v for k, v in result.to_dict().items() if k not in ("out",)}
        final.model = write_result(trainer.unwrapped_model, tokenizer, ref, out, method, merge, params, metrics,
                             dense_folder(ref), gguf)
        if record_run:
            from slimlm.runs import record

            record("finetune", model=ref, params=params, metrics=metrics, artifact=out)
    state.wait_for_everyone()
    return final


def write_result(model, tokenizer, ref, out: Path, method: str, merge: bool, params: dict, metrics: dict,
           base: Path, gguf: bool):
    """Save into a temporary folder inside `out`, move the files up, and write the manifest last.
    Returns the model as written (merging replaces the peft wrapper with the dense model)."""
    from slimlm.runs import write_manifest

    tmp = out / ".result.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dense_dir = tmp
        if method != "full":
            adapter_dir = tmp / "adapter" if merge else tmp
            model.save_pretrained(adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
            if gguf:
                export_gguf_lora(adapter_dir, adapter_dir / "adapter.gguf", base=base)
            if merge:
                write_manifest(adapter_dir, parent=ref, operation="finetune", params=params, metrics=metrics)
                model = model.merge_and_unload()
        if method == "full" or merge:
            dtype = _source_dtype(base)
            (model.to(dtype) if dtype else model).save_pretrained(dense_dir)
            tokenizer.save_pretrained(dense_dir)
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        write_manifest(out, parent=ref, operation="finetune", params=params, metrics=metrics)
        return model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_gguf_lora(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Write a peft LoRA adapter as a llama.cpp LoRA GGUF (the format of llama.cpp's
    convert_lora_to_gguf.py): `llama-cli -m base.gguf --lora OUT`, or llama-cpp-python's lora_path.

    Tensors get llama.cpp's names (blk.N.attn_q.weight.lora_a/.lora_b), and lora_b takes the same
    layout changes slimlm's GGUF export applies to the weight it adapts (Llama's rotary row
    order, Gemma 2's folded query scale), so base GGUF + adapter computes what the merged model does.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from slimlm.compress.gguf_export import permute_rows, query_scale_fold, read_config, spec_for

    adapter, out = Path(adapter), Path(out)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise SlimlmError("llama.cpp cannot apply DoRA adapters: fine-tune with --merge and `slimlm export` the result")
    if cfg.get("use_rslora") or cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
        raise SlimlmError("only plain LoRA adapters (one rank and alpha, no rsLoRA) export to GGUF")
    config = read_config(Path(base or cfg["base_model_name_or_path"]))
    spec = spec_for(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.arch.upper()], config["num_hidden_layers"])
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        which = "a" if ".lora_A." in key else "b" if ".lora_B." in key else None
        if which is None:
            raise SlimlmError(f"{adapter.name}: tensor {key} is not a LoRA matrix; it cannot go into a GGUF LoRA")
        hf = key.replace("base_model.model.", "", 1).replace(f".lora_{which.upper()}.weight", ".weight")
        pairs.setdefault(hf, {})[which] = value.astype(np.float32)
    n_head, q_fold = config["num_attention_heads"], query_scale_fold(config, spec)
    writer = gguf.GGUFWriter(out, spec.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    for hf, ab in sorted(pairs.items()):
        name = names.get_name(hf, try_suffixes=(".weight",))
        if name is None:
            raise SlimlmError(f"{adapter.name}: {hf} has no llama.cpp name for {spec.arch}")
        b = ab["b"]
        if spec.rope_permute and hf.endswith("self_attn.q_proj.weight"):
            b = permute_rows(b, n_head)
        elif spec.rope_permute and hf.endswith("self_attn.k_proj.weight"):
            b = permute_rows(b, config.get("num_key_value_heads") or n_head)
        if spec.fold_query_scale and hf.endswith(spec.fold_query_scale) and q_fold != 1.0:
            b = b * np.float32(q_fold)
        writer.add_tensor(f"{name}.lora_a", ab["a"])
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
