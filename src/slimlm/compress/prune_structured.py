"""Structured pruning: drop whole decoder blocks, or narrow every block, into a smaller dense model.

Both methods measure importance on calibration text in one full-precision pass (the calibration
loop is calibration.run_calibration, shared with GPTQ and AWQ) and return a new config and state dict of
the *same family*, so `AutoModelForCausalLM.from_pretrained` loads the result with no custom code
and every later slimlm verb (eval, quantize, export) works on it unchanged.

layers (ShortGPT, Men et al. 2024): a block's "block influence" is 1 - cos(x_in, x_out) averaged over
calibration tokens: a block whose output hidden state points where its input did changes little
and is the cheapest to remove. The least influential blocks are dropped and the rest renumbered;
per-layer config lists (`layer_types`, e.g. Gemma 2/3's sliding/full pattern) keep the entries
of the kept blocks, so every kept block keeps the attention it was trained with.

width (Minitron, Muralidharan et al. 2024): importance is mean |activation| over calibration
tokens: of each MLP channel (the input of down_proj), of each attention head (its slice of the
o_proj input), and of each hidden channel (summed over the outputs of the hidden-size norms).
Every block keeps the same number of channels/heads (the config has one width), each block
choosing its own best ones. Grouped-query attention stays valid by construction: the result keeps
g KV groups with m query heads each, chosen from all (g, m) for the attention-parameter count
closest to the target, so whole KV groups go with their query heads and query heads go from every
group alike. head_dim is written explicitly so a smaller head count does not change it.
Narrowing the hidden size also changes what RMSNorm averages over (and Gemma's sqrt(hidden)
embedding scale), so that cut is approximate: distill afterwards, as Minitron does.
"""

from __future__ import annotations

import re

from slimlm.compress.calibration import find_decoder_layers, run_calibration
from slimlm.errors import SlimlmError

__all__ = ["block_influence", "drop_layers", "width_importance", "plan_width", "narrow", "materialize",
           "param_counts", "decoder_layers"]

_IN_COLS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "qkv_proj.weight", "gate_proj.weight",
            "up_proj.weight", "gate_up_proj.weight")
_OUT_ROWS = ("o_proj.weight", "down_proj.weight", "o_proj.bias", "down_proj.bias")
_EMBED = ("embed_tokens.weight", "lm_head.weight")
_UNTOUCHED = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "qkv_proj.bias", "gate_proj.bias", "up_proj.bias",
              "gate_up_proj.bias", "q_norm.weight", "k_norm.weight")


# --- shared helpers --------------------------------------------------------------------------

def decoder_layers(model):
    """(the ModuleList of decoder blocks, its state-dict prefix such as 'model.layers')."""
    layers = find_decoder_layers(model)
    if layers is None:
        raise SlimlmError(f"{type(model).__name__} has no list of decoder layers: it cannot be pruned")
    return layers, next(n for n, m in model.named_modules() if m is layers)


def param_counts(model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters): tied weights count once; the input embedding
    and the output head are the 'embedding' part, as in scaling-law papers."""
    embed = set()
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        if m is not None:
            embed.update(id(p) for p in m.parameters())
    total = emb = 0
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        total += p.numel()
        emb += p.numel() if id(p) in embed else 0
    return total, total - emb


def materialize(config, state_dict):
    """A model of `config` holding `state_dict` (no random init: built on the meta device and given
    the tensors). Every weight must be there; only a tied output head may be absent."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit the new config: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    return model


def _config_with(config, **changes):
    """A validated copy of `config` with `changes`, or None if transformers rejects it."""
    data = config.to_dict()
    data.update(changes)
    try:
        return type(config).from_dict(data)
    except (ValueError, TypeError):
        return None


def _calibrate(model, windows, hooks, label: str, batch_size: int, progress: bool) -> None:
    handles = [register(fn) for register, fn in hooks]
    try:
        run_calibration(model.eval(), windows, batch_size, label, progress)
    finally:
        for h in handles:
            h.remove()


# --- layers ----------------------------------------------------------------------------------

def block_influence(model, windows, batch_size: int = 4, progress: bool = False) -> list[float]:
    """ShortGPT's BI per decoder block: mean over calibration tokens of 1 - cos(input, output)."""
    import torch

    layers, _ = decoder_layers(model)
    sums, counts = [0.0] * len(layers), [0] * len(layers)

    def make(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.double().reshape(-1, x.shape[-1]),
                                                        y.double().reshape(-1, y.shape[-1]), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()
        return hook

    hooks = [(lambda fn, layer=layer: layer.register_forward_hook(fn, with_kwargs=True), make(i))
             for i, layer in enumerate(layers)]
    _calibrate(model, windows, hooks, "calibrating (block influence)", batch_size, progress)
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def drop_layers(model, keep: list[int]):
    """(config, state dict) of `model` with only the decoder blocks `keep`, renumbered 0..k-1."""
    layers, prefix = decoder_layers(model)
    n, keep = len(layers), sorted(keep)
    if not keep:
        raise SlimlmError(f"pruning would remove all {n} decoder layers: use a smaller --ratio")
    remap = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    state = {}
    for key, value in model.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value
        elif int(m[1]) in remap:
            state[f"{prefix}.{remap[int(m[1])]}.{m[2]}"] = value
    changes = {"num_hidden_layers": len(keep)}
    for key, value in model.config.to_dict().items():  # per-layer lists: layer_types, mlp_layer_types, ...
        if "layer" in key and isinstance(value, list) and len(value) == n:
            changes[key] = [value[i] for i in keep]
    first_dense = getattr(model.config, "first_k_dense_replace", None)
    if isinstance(first_dense, int):  # DeepSeek: the first k blocks are dense
        changes["first_k_dense_replace"] = sum(1 for i in keep if i < first_dense)
    config = _config_with(model.config, **changes)
    if config is None:
        raise SlimlmError(f"transformers rejects a {model.config.model_type} config with {len(keep)} layers: "
                          "this family cannot be layer-pruned")
    return config, state


# --- width -----------------------------------------------------------------------------------

def _parts(model):
    layers, prefix = decoder_layers(model)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        o, down = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
        if o is None or down is None or o.in_features != heads * head_dim \
                or down.in_features != cfg.intermediate_size:
            raise SlimlmError(f"layer {i} of {cfg.model_type} is not a dense attention + MLP block "
                              "(MoE or MLA?): width pruning supports llama, mistral, qwen2, phi3 and gemma2/3; "
                              "use --method layers")
    return layers, prefix, heads, kv, head_dim


def width_importance(model, windows, batch_size: int = 4, progress: bool = False) -> dict:
    """Mean |activation| over calibration tokens: 'mlp' [layer][channel], 'heads' [layer][head],
    'hidden' [channel] (summed over every hidden-size norm output), float64 tensors."""
    import torch

    layers, _, heads, _, head_dim = _parts(model)
    hidden = model.config.hidden_size
    acc: dict = {"mlp": [None] * len(layers), "heads": [None] * len(layers), "hidden": None}
    counts = {"mlp": [0] * len(layers), "heads": [0] * len(layers)}

    def add(kind, i, value, tokens):
        slot = acc[kind]
        slot[i] = value if slot[i] is None else slot[i] + value
        counts[kind][i] += tokens

    def mlp_hook(i):
        return lambda m, args: add("mlp", i, args[0].detach().abs().reshape(-1, args[0].shape[-1]).sum(0).double(),
                                   args[0].numel() // args[0].shape[-1])

    def head_hook(i):
        def hook(m, args):
            x = args[0].detach().abs().reshape(-1, heads, head_dim)
            add("heads", i, x.sum((0, 2)).double() / head_dim, x.shape[0])
        return hook

    def norm_hook(m, args, output):
        value = output.detach().abs().reshape(-1, hidden).sum(0).double()
        acc["hidden"] = value if acc["hidden"] is None else acc["hidden"] + value

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append((layer.mlp.down_proj.register_forward_pre_hook, mlp_hook(i)))
        hooks.append((layer.self_attn.o_proj.register_forward_pre_hook, head_hook(i)))
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if name.endswith("norm") and "q_norm" not in name and "k_norm" not in name \
                and isinstance(w, torch.Tensor) and w.shape == (hidden,):
            hooks.append((module.register_forward_hook, norm_hook))
    _calibrate(model, windows, hooks, "calibrating (activation importance)", batch_size, progress)
    return {"mlp": [a / c for a, c in zip(acc["mlp"], counts["mlp"])],
            "heads": [a / c for a, c in zip(acc["heads"], counts["heads"])],  # every norm sees every token:
            "hidden": acc["hidden"] / windows.numel() if acc["hidden"] is not None else torch.ones(hidden)}


def plan_width(config, ratio: float, axes=("mlp", "heads")):
    """The narrowed config for removing `ratio` of each axis ('mlp', 'heads', 'hidden'), rounded to
    what the family accepts (e.g. llama and gemma need hidden_size % num_attention_heads == 0)."""
    keep = 1.0 - ratio
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_group = heads // kv
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inter = int(config.intermediate_size * keep + 0.5) if "mlp" in axes else config.intermediate_size
    hidden = int(config.hidden_size * keep + 0.5) if "hidden" in axes else config.hidden_size
    if inter < 1 or hidden < 1:
        raise SlimlmError(f"--ratio {ratio} leaves no MLP channels or hidden size: use a smaller --ratio")
    options = [(kv, per_group)]
    if "heads" in axes:  # g KV groups of m query heads; attention params ~ g*m (q, o) + g (k, v)
        target = keep * (kv * per_group + kv)
        options = sorted(((g, m) for g in range(1, kv + 1) for m in range(1, per_group + 1)),
                         key=lambda gm: (abs(gm[0] * gm[1] + gm[0] - target), -gm[0], -gm[1]))
    for g, m in options:
        new = _config_with(config, intermediate_size=inter, hidden_size=hidden, num_attention_heads=g * m,
                           num_key_value_heads=g, head_dim=head_dim)
        if new is not None:
            return new
    raise SlimlmError(f"no attention shape fits {config.model_type} with hidden size {hidden}: "
                      "try another --ratio, or leave the hidden size alone")


def _top(scores, k: int):
    import torch

    return torch.sort(torch.topk(scores, k).indices).values


def _head_rows(heads, head_dim: int):
    import torch

    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _choose_heads(scores, kv: int, per_group: int, g: int, m: int):
    """Indices of the kept query heads and KV heads: the best m queries of each group, then the g
    groups whose kept queries matter most. Query head j belongs to KV head j // per_group."""
    import torch

    best = [_top(scores[k * per_group:(k + 1) * per_group], m) + k * per_group for k in range(kv)]
    groups = _top(torch.stack([scores[b].sum() for b in best]), g)
    return torch.cat([best[k] for k in groups.tolist()]), groups


def narrow(model, importance: dict, config):
    """(config, state dict) of `model` cut to the widths of `config` (from plan_width), keeping the
    most important channels and heads of each block in their original order."""
    import torch

    layers, prefix, heads, kv, d = _parts(model)
    old, state = model.config, dict(model.state_dict())
    inter = old.intermediate_size
    g, m = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads

    def cut(key, dim, index):
        if key in state:
            state[key] = state[key].index_select(dim, index)

    for i in range(len(layers)):
        a, f = f"{prefix}.{i}.self_attn.", f"{prefix}.{i}.mlp."
        q_keep, kv_keep = _choose_heads(importance["heads"][i], kv, heads // kv, g, m)
        q_rows, kv_rows = _head_rows(q_keep, d), _head_rows(kv_keep, d)
        if a + "qkv_proj.weight" in state:  # phi3: rows are [q | k | v]
            rows = torch.cat([q_rows, kv_rows + heads * d, kv_rows + (heads + kv) * d])
            cut(a + "qkv_proj.weight", 0, rows)
            cut(a + "qkv_proj.bias", 0, rows)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            cut(a + name + ".weight", 0, rows)
            cut(a + name + ".bias", 0, rows)
        cut(a + "o_proj.weight", 1, q_rows)
        channels = _top(importance["mlp"][i], config.intermediate_size)
        for name in ("gate_proj", "up_proj"):
            cut(f + name + ".weight", 0, channels)
            cut(f + name + ".bias", 0, channels)
        if f + "gate_up_proj.weight" in state:  # phi3: rows are [gate | up]
            cut(f + "gate_up_proj.weight", 0, torch.cat([channels, channels + inter]))
        cut(f + "down_proj.weight", 1, channels)
    if config.hidden_size != old.hidden_size:
        _narrow_hidden(state, _top(importance["hidden"], config.hidden_size), old.hidden_size)
    return config, state


def _narrow_hidden(state: dict, keep, hidden: int) -> None:
    for key in list(state):
        t = state[key]
        if key.endswith(_IN_COLS) or key.endswith(_EMBED):
            state[key] = t.index_select(1, keep)
        elif key.endswith(_OUT_ROWS) or (key.endswith("norm.weight") and not key.endswith(_UNTOUCHED)
                                         and t.shape == (hidden,)):
            state[key] = t.index_select(0, keep)
        elif not key.endswith(_UNTOUCHED) and hidden in t.shape:
            raise SlimlmError(f"{key} {tuple(t.shape)} has a hidden-size dimension slimlm does not know how to "
                              "narrow: leave the hidden size alone (width axes mlp,heads)")
