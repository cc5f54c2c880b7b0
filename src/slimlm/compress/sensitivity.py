"""How much each weight's quantization hurts: the KL divergence it adds on calibration text, per
candidate GGUF type, for the per-tensor type allocation (mixed_precision.py).

Measuring the KL of every (tensor, type) pair directly costs one forward pass per pair (a
135M-parameter model has 210 weights and four or five types each). The scheme here costs one
forward per tensor:

1. one fp32 torch forward on a calibration slice (`tokens` tokens of the calibration text)
   records the reference next-token distributions, each decoder layer's inputs, and E[x_j^2] of
   every linear layer's input column j (forward hooks);
2. for each tensor, its weighted quantization error at each candidate type,
   err(t) = sum_ij E[x_j^2] (W - Q_t(W))_ij^2 (Q_t: llama.cpp's round-trip through the type, by
   its importance-matrix rule with E[x^2] as the importance for the weights a calibrated method
   writes so, GPTQ's: on a model whose weights already sit on a coarser grid, such as the built-in
   SmolLM2 (dequantized from Q4_1), that rule stores Q5_1 losslessly and the reference rule does not);
3. its KL at the candidate with the largest error (the lowest type) is measured directly: the
   weight is swapped for its quantized values and the model is rerun from that layer's recorded
   input (earlier layers are unchanged), one tensor at a time; the token embedding and output
   head, which mixed files allocate too, get a full forward (a tied embedding is both ends; its
   error is weighted by the head's input, an untied embedding's counts unweighted);
4. the other types' KL is scaled from that one by the ratio of their errors:
   KL(t) = KL(low) * err(t) / err(low) (KL is second order in a small output change, and so is err).

An MoE's routed experts are allocated a stack at a time (llama.cpp stores each layer's experts of
one kind as one tensor of one type): a unit is the stacked name (`...experts.w1.weight`) with its
checkpoint experts as members. Its error is summed over the members, each weighted by E[x^2] of
the tokens its router sends it (gptq_experts.ExpertHessianHooks, the diagonal of its Hessian; an
expert no token reached counts unweighted), and its KL at the lowest type is measured with every
member quantized at once, in the fused parameters transformers keeps them in.

tests/compress/test_mixed_precision.py checks that this ranks tensors as direct measurement does
(Spearman >= 0.8 on a tiny model). Results are cached as JSON under the cache folder's
`sensitivity/`, keyed by a hash of the weight files, the calibration text and the settings, so a
second budget for the same model and calibration text costs only the allocation and the write.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

from slimlm.compress.kquant_formats import dequantize_type
from slimlm.errors import SlimlmError

__all__ = ["SCHEME", "cache_key", "cache_path", "sensitivities", "measure", "kl_direct"]

SCHEME = "kl-low-type+weighted-err/v1"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def cache_key(folder: Path, texts: list[str], tokens: int, candidates: dict[str, list[str]],
              weighted: frozenset = frozenset(), stacks: dict[str, list[str]] | None = None) -> str:
    h = hashlib.blake2b(digest_size=16)
    for file in sorted(Path(folder).glob("*.safetensors")) + [Path(folder) / "config.json"]:
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    h.update(json.dumps([SCHEME, tokens, candidates, texts] + ([sorted(weighted)] if weighted else [])
                        + ([stacks] if stacks else []), sort_keys=True).encode())
    return h.hexdigest()


def cache_path(key: str) -> Path:
    from slimlm.paths import cache_dir

    return cache_dir() / "sensitivity" / f"{key}.json"


def sensitivities(folder: Path, texts: list[str], candidates: dict[str, list[str]], tokens: int = 256,
                  notes: list[str] | None = None, weighted: frozenset = frozenset(),
                  stacks: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """{weight name: {type: added KL}} for each weight and candidate type, from the cache when the
    same weights, text and candidates were measured before. The weights in `weighted` are
    quantized by llama-quantize's importance-matrix rules (their input's E[x²] as the importance),
    as the method that writes them will (GPTQ); the others by the reference rules (RTN's bytes).
    `stacks` ({stacked name: its checkpoint experts}) names the MoE units among the candidates."""
    from slimlm.paths import atomic_write_text

    path = cache_path(cache_key(folder, texts, tokens, candidates, frozenset(weighted), stacks))
    if path.exists():
        try:
            scores = json.loads(path.read_text())["scores"]
            if notes is not None:
                notes.append(f"sensitivities read from the cache ({path})")
            return scores
        except (OSError, ValueError, KeyError):
            pass  # a broken cache file is measured again and rewritten
    start = time.perf_counter()
    found = measure(folder, texts, candidates, tokens, weighted, stacks)
    seconds = time.perf_counter() - start
    atomic_write_text(path, json.dumps({"scheme": SCHEME, "model": str(folder), "tokens": tokens,
                                        "seconds": seconds, **found}, indent=1))
    if notes is not None:
        notes.append(f"sensitivities measured in {seconds:.0f} s on {tokens} calibration tokens, cached in {path}")
    return found["scores"]


def _load(folder: Path, texts: list[str], tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer("\n\n".join(texts)[: tokens * 12], add_special_tokens=False, verbose=False)["input_ids"][:tokens]
    if len(ids) < 2:
        raise SlimlmError("the calibration text holds fewer than 2 tokens: sensitivities need some text")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    return model.eval(), torch.tensor([ids])


class _Runner:
    """The model with one reference forward recorded: rerun from any layer with one weight changed."""

    def __init__(self, model, ids, names: list[str], experts: list[str] = ()):
        import torch

        from slimlm.compress.gptq_experts import ExpertHessianHooks, checkpoint_keys, expert_modules, expert_views

        self.model, self.torch, self.ids = model, torch, ids
        self.layers = model.model.layers
        self.inputs: dict[int, tuple] = {}
        self.sq: dict[str, torch.Tensor] = {}
        handles = []
        modules = dict(model.named_modules())
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._keep(i), with_kwargs=True))
        for name in names:  # an untied token embedding has no input to weight by: its error counts unweighted
            source = _input_of(model, modules, name)
            if source is not None:
                handles.append(modules[source].register_forward_pre_hook(self._square(name)))
        keys = checkpoint_keys(experts)
        self.views = expert_views(model, keys) if experts else {}  # checkpoint expert -> its fused slice
        routed = ExpertHessianHooks(expert_modules(model)) if experts else None
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0].float()
        for h in handles:
            h.remove()
        if routed is not None:  # E[x^2] over the tokens routed to each expert: its Hessian's diagonal / 2
            for key, H in routed.remove(keys).items():
                self.sq[key + ".weight"] = torch.diagonal(H).float() / 2
        self.ref_logp = torch.log_softmax(logits, -1)
        self.ref_p = self.ref_logp.exp()
        self.cap = getattr(model.config, "final_logit_softcapping", None)

    def _keep(self, i: int):
        def hook(module, args, kwargs):
            self.inputs[i] = (args, dict(kwargs))
        return hook

    def _square(self, name: str):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sq[name] = (x * x).mean(0)
        return hook

    def logits_from(self, start: int):
        """Logits of a rerun from layer `start` on its recorded input (later layers rerun too)."""
        args, kwargs = self.inputs[start]
        h = None
        for i in range(start, len(self.layers)):
            a, kw = self.inputs[i]
            if h is not None:
                if a:
                    a = (h, *a[1:])
                else:
                    kw = dict(kw, hidden_states=h)
            out = self.layers[i](*a, **kw)
            h = out[0] if isinstance(out, tuple) else out
        logits = self.model.lm_head(self.model.model.norm(h))[0].float()
        if self.cap:
            logits = self.torch.tanh(logits / self.cap) * self.cap
        return logits

    def kl(self, name: str, weight: np.ndarray) -> float:
        """Mean KL(reference || model with `name` replaced by `weight`) over the slice."""
        return self.kl_of({name: weight})

    def kl_of(self, weights: dict[str, np.ndarray]) -> float:
        """The same with several weights of one layer replaced (parameters or checkpoint experts)."""
        torch = self.torch
        params = dict(self.model.named_parameters())
        targets = [(self.views[n] if n in self.views else params[n].data, w) for n, w in weights.items()]
        old = [t.clone() for t, _ in targets]
        match = _LAYER.search("." + next(iter(weights)))
        try:
            with torch.no_grad():
                for t, w in targets:
                    t.copy_(torch.from_numpy(w))
                if match:
                    logits = self.logits_from(int(match.group(1)))
                else:  # the token embedding / output head: a full forward (a tied one is both ends)
                    logits = self.model(self.ids, use_cache=False).logits[0].float()
                logp = torch.log_softmax(logits, -1)
        finally:
            for (t, _), o in zip(targets, old):
                t.copy_(o)
        return float((self.ref_p * (self.ref_logp - logp)).sum(-1).mean())


def _input_of(model, modules: dict, name: str) -> str | None:
    """The module whose input weights `name`'s error: its own (a linear layer); for a token
    embedding tied to the output head, the head (its error reaches every logit through the head's
    input; as a lookup it only moves the few rows the text uses); None for an untied embedding."""
    import torch

    module = modules[name.removesuffix(".weight")]
    if not isinstance(module, torch.nn.Embedding):
        return name.removesuffix(".weight")
    head = getattr(model, "lm_head", None)
    return "lm_head" if head is not None and head.weight is module.weight else None


def measure(folder: Path, texts: list[str], candidates: dict[str, list[str]], tokens: int = 256,
            weighted: frozenset = frozenset(), stacks: dict[str, list[str]] | None = None) -> dict:
    """The scheme of the module docstring, uncached: {"scores": {name: {type: KL}}, "kl_low":
    {name: (type, KL)}, "err": {name: {type: weighted error}}}."""
    from slimlm.progress import progress_bar

    stacks = stacks or {}
    model, ids = _load(folder, texts, tokens)
    runner = _Runner(model, ids, [n for n in candidates if n not in stacks],
                     [m for members in stacks.values() for m in members])
    params = dict(model.named_parameters())
    scores, kl_low, errs = {}, {}, {}
    with progress_bar("sensitivity (KL per tensor)", len(candidates)) as advance:
        for name, types in candidates.items():
            members = stacks.get(name, [name])
            quantized, err = {t: {} for t in types}, dict.fromkeys(types, 0.0)
            for m in members:  # one weight, or each expert of a stack
                w = (runner.views[m] if m in runner.views else params[m]).detach().float().numpy().copy()
                sq = runner.sq[m].numpy().astype(np.float64) if m in runner.sq else np.ones(w.shape[-1])
                imp = sq.astype(np.float32) if m in weighted and m in runner.sq else None
                for t in types:
                    q = quantized[t][m] = dequantize_type(t, w, imp)
                    err[t] += float((((w - q).astype(np.float64) ** 2) * sq[None, :]).sum())
            low = max(types, key=lambda t: err[t])
            kl = max(runner.kl_of(quantized[low]), 0.0)
            scores[name] = {t: kl * err[t] / err[low] if err[low] > 0 else 0.0 for t in types}
            kl_low[name], errs[name] = (low, kl), err
            advance()
    return {"scores": scores, "kl_low": kl_low, "err": errs, "tokens": int(ids.shape[1])}


def kl_direct(folder: Path, texts: list[str], name_types: list[tuple[str, str]], tokens: int = 256) -> list[float]:
    """The KL of quantizing each (weight, type) alone, measured directly (for tests of the scheme)."""
    model, ids = _load(folder, texts, tokens)
    runner = _Runner(model, ids, [])
    params = dict(model.named_parameters())
    return [runner.kl(n, dequantize_type(t, params[n].detach().float().numpy())) for n, t in name_types]
