"""`slimlm moe upcycle`: a dense model becomes a sparse mixture of experts of a family that
transformers and llama.cpp already run.

The output family is chosen by the parent's (`MOE_TARGETS`, data): Llama and Mistral parents
become Mixtral, Qwen 2 parents Qwen-MoE (which has always-on shared experts, `--shared-experts`);
their attention, norms and rotary embedding are the parent's maths, so every tensor but the MLP is
copied unchanged; each MLP becomes N experts and a router by the chosen split
(splits.py). Every backend, `info`, `eval`, `export`, `serve` and the run registry then work on the
result as on any Mixtral checkpoint. A manifest (slimlm.json) records N, K, the split and the parent.

The copied experts of `--split copy` are identical, so the MoE needs training before they differ
(`slimlm moe train`, recover.py), as every published upcycle does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.train.moe.blocks import moe_layers
from slimlm.train.moe.splits import UPCYCLE_SPLITS, DenseMLP, SplitSettings


@dataclass(frozen=True)
class MoeTarget:
    model_type: str  # the MoE family written
    carried: tuple[str, ...]  # parent config keys copied as they are
    width_key: str  # config key: neurons of one routed expert
    shared_key: str | None = None  # config key: neurons of the shared experts together (None: it has none)
    fixed: dict = field(default_factory=dict)  # settings the upcycled model needs whatever the parent
    refuse: dict = field(default_factory=dict)  # parent settings the family cannot hold
    renormalized: bool = True  # the K chosen experts' weights are rescaled to sum to 1

    @property
    def shared_experts(self) -> bool:
        return self.shared_key is not None


_ATTENTION_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                   "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
                   "initializer_range", "sliding_window")
_MIXTRAL = MoeTarget("mixtral", _ATTENTION_KEYS, "intermediate_size",
                    refuse={"attention_bias": True, "mlp_bias": True})
# Qwen-MoE: every layer sparse; the top-k weights are the softmax's, not rescaled, because llama.cpp's
# qwen2moe graph never rescales them (with norm_topk_prob it gave other logits than transformers).
_QWEN_MOE = MoeTarget("qwen2_moe", _ATTENTION_KEYS + ("intermediate_size", "use_sliding_window", "max_window_layers"),
                      "moe_intermediate_size", "shared_expert_intermediate_size",
                      fixed={"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
                             "qkv_bias": True}, renormalized=False)
MOE_TARGETS: dict[str, MoeTarget] = {"llama": _MIXTRAL, "mistral": _MIXTRAL, "qwen2": _QWEN_MOE}


@dataclass
class UpcycleResult:
    out: str
    parent: str
    family: str
    split: str
    experts: int
    active: int
    shared_experts: int
    expert_width: int
    params_parent: int
    params_total: int
    params_active: int
    seconds: float
    calib_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _check(experts: int, active: int, split: str, shared: int, parent_type: str) -> MoeTarget:
    UPCYCLE_SPLITS.create(split)  # an unknown split names the known ones
    if experts < 2:
        raise SlimlmError(f"--experts {experts}: a mixture needs at least 2 experts")
    if not 1 <= active <= experts:
        raise SlimlmError(f"--active {active} must be between 1 and --experts {experts}: a token cannot use more "
                          "experts than there are")
    target = MOE_TARGETS.get(parent_type)
    if target is None:
        raise SlimlmError(f"{parent_type} has no MoE counterpart slimlm writes: upcycle a model of family "
                          f"{', '.join(MOE_TARGETS)}")
    if shared and not target.shared_experts:
        with_shared = [p for p, t in MOE_TARGETS.items() if t.shared_experts]
        raise SlimlmError(f"{target.model_type} has no shared experts: drop --shared-experts"
                          + (f", or upcycle a {'/'.join(with_shared)} parent" if with_shared else ""))
    if target.shared_experts and shared < 1:
        raise SlimlmError(f"{target.model_type} always has a shared expert: give --shared-experts 1 or more")
    return target


def moe_config(parent, target: MoeTarget, experts: int, active: int, width: int, shared: int = 0):
    """The MoE family's transformers config for `parent`'s attention and `experts` x `width` MLPs
    (plus `shared` always-on experts of `width` neurons where the family has them)."""
    from transformers import AutoConfig

    from slimlm.models.families import FAMILIES

    for key, bad in target.refuse.items():
        if getattr(parent, key, None) == bad:
            raise SlimlmError(f"the parent has {key}={bad}, which {target.model_type} cannot hold")
    fam = FAMILIES[target.model_type]
    kwargs = {k: getattr(parent, k) for k in target.carried if getattr(parent, k, None) is not None}
    kwargs.update(target.fixed)
    kwargs.update({target.width_key: width, fam.experts_key: experts, fam.experts_used_key: active})
    if target.shared_key:
        kwargs[target.shared_key] = shared * width
    return AutoConfig.for_model(target.model_type, **kwargs)


def _mlp_inputs(model, windows, progress: bool) -> dict[int, torch.Tensor]:
    """Every layer's MLP input (the post-attention norm's output) on the calibration windows."""
    from slimlm.compress.calibration import run_calibration

    layers = model.model.layers
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda _m, _i, out, i=i: seen[i].append(out.detach().reshape(-1, out.shape[-1]).float()))
        for i, layer in enumerate(layers)]
    try:
        run_calibration(model, windows, batch_size=4, label="calibration", progress=progress)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


def upcycle_model(parent, split: str, settings: SplitSettings, windows=None, progress: bool = False):
    """The upcycled torch model (float32) from a loaded dense `parent`, and each layer's neuron lists."""
    from transformers import AutoModelForCausalLM

    target = _check(settings.experts, settings.active, split, settings.shared, parent.config.model_type)
    settings = replace(settings, renormalized=target.renormalized)
    method = UPCYCLE_SPLITS.create(split)
    width = method.width(parent.config.intermediate_size, settings)
    config = moe_config(parent.config, target, settings.experts, settings.active, width, settings.shared)
    inputs = _mlp_inputs(parent, windows, progress) if method.needs_activations else {}
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.device("meta"):
        moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    moe = moe.to_empty(device="cpu")
    dense = {k: v for k, v in parent.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(dense, strict=False)
    unexplained = [k for k in missing if ".mlp." not in k and "rotary_emb" not in k]
    if unexplained or unexpected:
        raise SlimlmError(f"the parent's tensors do not map onto {target.model_type}: "
                          f"{(unexplained + list(unexpected))[:3]}")
    for buf_name, buf in parent.named_buffers():  # rotary inverse frequencies are buffers, not in the state dict
        if "rotary_emb" in buf_name:
            moe.get_buffer(buf_name).copy_(buf)
    neurons = []
    for layer, moe_layer in zip(parent.model.layers, moe_layers(moe)):
        mlp = layer.mlp
        experts = method.split(DenseMLP(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                                        mlp.down_proj.weight.detach(), mlp.act_fn),
                               settings, inputs.get(moe_layer.index), gen)
        with torch.no_grad():
            moe_layer.router.copy_(experts.router)
            moe_layer.experts.gate_up_proj.copy_(torch.cat([experts.gate, experts.up], dim=1))
            moe_layer.experts.down_proj.copy_(experts.down)
            if experts.shared is not None:
                block = moe_layer.block
                for linear, w in zip((block.shared_expert.gate_proj, block.shared_expert.up_proj,
                                      block.shared_expert.down_proj), experts.shared):
                    linear.weight.copy_(w)
                # sigmoid(w . x) = 1/2, which the split doubled. Not w = 0 exactly: llama.cpp computes this
                # sigmoid as silu(z) / z, which is 0/0 at z = 0 (NaN logits, measured); 1e-6 moves it by ~1e-6.
                block.shared_expert_gate.weight.normal_(0.0, 1e-6, generator=gen)
        neurons.append(experts.neurons)
    if moe.config.tie_word_embeddings:
        moe.tie_weights()
    return moe.eval(), neurons


def upcycle(model: str | Path, out: str | Path, experts: int = 8, active: int = 2, split: str = "neurons", *,
            active_fraction: float = 1.0, shared_experts: int = 0, drop: float = 0.0, noise: float = 0.0,
            router_sharpness: float = 10.0, calib: list[str] | None = None, calib_samples: int = 32,
            calib_seq_len: int = 256, seed: int = 0, force: bool = False, record: bool = True,
            progress: bool = True) -> UpcycleResult:
    """Upcycle `model` (a dense Hugging Face folder or model reference) into the MoE folder `out`."""
    from slimlm.compress.calibration import calibration_windows
    from slimlm.compress.prune_structured import param_counts
    from slimlm.models.info import model_info
    from slimlm.models.loading import atomic_dir, load_torch
    from slimlm.models.reference import resolve

    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    if not 0.0 <= drop < 1.0:
        raise SlimlmError(f"--drop {drop} must be in [0, 1): the fraction of each expert's neurons re-drawn")
    ref = resolve(str(model))
    start = time.perf_counter()
    parent, tokenizer = load_torch(ref)
    _check(experts, active, split, shared_experts, parent.config.model_type)
    settings = SplitSettings(experts, active, shared_experts, active_fraction, drop, noise, router_sharpness,
                             seed=seed)
    windows = None
    if UPCYCLE_SPLITS[split].needs_activations:
        from slimlm.data import calibration_docs

        windows = calibration_windows(tokenizer, calib if calib is not None else calibration_docs(),
                                      calib_samples, calib_seq_len)
    moe, neurons = upcycle_model(parent, split, settings, windows, progress)
    result = UpcycleResult(out=str(out), parent=ref.spec, family=moe.config.model_type, split=split,
                           experts=experts, active=active, shared_experts=shared_experts,
                           expert_width=getattr(moe.config, MOE_TARGETS[parent.config.model_type].width_key),
                           params_parent=param_counts(parent)[0], params_total=0, params_active=0, seconds=0.0,
                           calib_tokens=int(windows.numel()) if windows is not None else 0)
    if split == "copy" and not (drop or noise):
        result.notes.append("the experts are identical copies: train before they can differ (slimlm moe train)")
    with atomic_dir(out, force=force) as tmp:
        moe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = model_info(str(tmp))
        result.params_total, result.params_active = info.params_total, info.params_active
        result.seconds = time.perf_counter() - start
        _write_manifest(tmp, ref, result, settings, neurons, calib_samples, calib_seq_len)
    if record:
        from slimlm.runs import record as record_run

        record_run("moe upcycle", ref, params={"experts": experts, "active": active, "split": split,
                                                "out": str(out)}, metrics=result.to_dict(), artifact=out)
    return result


def _write_manifest(folder: Path, ref, result: UpcycleResult, s: SplitSettings, neurons, samples, seq_len) -> None:
    import json

    from slimlm.runs import write_manifest

    params = {"experts": s.experts, "active": s.active, "shared_experts": s.shared, "split": result.split,
              "active_fraction": s.active_fraction,
              "drop": s.drop, "noise": s.noise, "router_sharpness": s.router_sharpness, "seed": s.seed,
              "calib_samples": samples, "calib_seq_len": seq_len}
    write_manifest(folder, parent=ref, operation="moe upcycle", params=params, metrics=result.to_dict())
    if any(n is not None for n in neurons):  # which parent neurons each expert holds, per layer
        (folder / "moe_partition.json").write_text(json.dumps({"layers": neurons}))
