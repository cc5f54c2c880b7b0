"""Knowledge-distillation losses: how far the student's next-token distribution is from the teacher's.

All losses take student logits [..., V] and a teacher given either as logits/log-probs [..., V] or
as its cached top-k (`TopK`: ids and log-probs, see below), and average a per-position divergence
over the positions selected by `mask` (the positions that have a label). p_T is the teacher's
distribution, p_S the student's; every divergence sums over the vocabulary:

- forward KL   KL(p_T || p_S): mass-covering, the classic (Hinton) distillation loss;
- reverse KL   KL(p_S || p_T): mode-seeking (MiniLLM); the student need not cover every teacher mode;
- jsd          generalized JSD (GKD, Agarwal et al. 2024) with P = teacher, Q = student:
               JSD_b = b KL(P || M) + (1 - b) KL(Q || M), M = b P + (1 - b) Q.
               It tends to b * forward KL as b -> 0 and to (1 - b) * reverse KL as b -> 1; at exactly
               b = 0 / b = 1 (where JSD_b itself is 0) it returns forward / reverse KL, as TRL's GKD does;
- skew_kl         KL(p_T || a p_T + (1 - a) p_S)   (DistiLLM's a-skew KL; a = 0 is forward KL);
- skew_reverse_kl KL(p_S || a p_S + (1 - a) p_T)   (a = 0 is reverse KL).
  Skewing keeps the loss and its gradient finite where one distribution has almost no mass.

Temperature T divides both logits before the softmax, and the loss is multiplied by T^2 (as in
Hinton et al.) so gradient magnitudes stay comparable across temperatures.

Top-k teacher (from an offline TeacherCache): `TopK(ids, logprobs)`, ids [..., k] integer token ids
and logprobs [..., k] the teacher's log-softmax over its full vocabulary at those ids. The tail
(the teacher mass outside the top k) is handled by **renormalizing over the top k**: the teacher
distribution becomes p~(i) = p(i) / sum_topk p for i in the top k and 0 elsewhere (at temperature
T: proportional to exp(logprob / T) over the top k, which is exact for the truncated teacher).
Every loss is then computed against that distribution over the full student vocabulary; reverse
KL is infinite against a distribution with zeros, so use skew_reverse_kl or jsd with a top-k teacher.

Vocabulary padding: models often pad their embedding matrix beyond the tokenizer (e.g. to a
multiple of 64), so teacher and student logits may have different widths although the vocabulary
is the same. Both are truncated to the shared real vocabulary (`vocab_size`, by default the
smaller width); `check_vocab_compat` checks that the tokenizers really are the same first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError

__all__ = ["TopK", "KINDS", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "divergence",
           "distill_loss", "check_vocab_compat", "teacher_logprobs"]

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")


class TopK(NamedTuple):
    """A teacher's top-k per position: token ids [..., k] and their log-probs [..., k]."""
    ids: torch.Tensor
    logprobs: torch.Tensor


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def teacher_logprobs(teacher, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's log-probs [..., vocab_size] at `temperature`; -inf outside a top-k teacher's ids."""
    if isinstance(teacher, TopK):
        lp = _float(teacher.logprobs) / temperature
        ids = teacher.ids.long()
        padding = ids >= vocab_size  # padding rows of the teacher's embedding are not real tokens
        if bool(padding.all(-1).any()):
            raise SlimlmError(f"a teacher top-k row holds no token id below the vocabulary size {vocab_size}: "
                              "pass the real vocabulary size (len(tokenizer))")
        lp = lp.masked_fill(padding, -math.inf)
        dense = torch.full((*lp.shape[:-1], vocab_size), -math.inf, dtype=lp.dtype, device=lp.device)
        dense.scatter_(-1, ids.clamp_max(vocab_size - 1), lp)
        return torch.log_softmax(dense, dim=-1)  # renormalized over the top k
    return torch.log_softmax(_float(teacher[..., :vocab_size]) / temperature, dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q) per position; terms with p = 0 are 0 (and carry no NaN gradient)."""
    p = logp.exp()
    keep = p > 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return (p * (torch.where(keep, logp, zero) - torch.where(keep, logq, zero))).sum(-1)


def _mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q)."""
    if w <= 0:
        return logq
    if w >= 1:
        return logp
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def divergence(kind: str, student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5,
               alpha: float = 0.1) -> torch.Tensor:
    """Per-position divergence between log-prob tensors [..., V] (see the module docstring)."""
    s, t = student_logp, teacher_logp
    if kind == "forward_kl":
        return _kl(t, s)
    if kind == "reverse_kl":
        if bool(torch.isinf(t).any()):
            raise SlimlmError("reverse KL is infinite against a top-k teacher (zero mass outside the top k): "
                              "use skew_reverse_kl or jsd, or a full-vocabulary teacher")
        return _kl(s, t)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise SlimlmError(f"jsd beta {beta} must be in [0, 1]")
        if beta == 0.0:
            return divergence("forward_kl", s, t)
        if beta == 1.0:
            return divergence("reverse_kl", s, t)
        m = _mix(t, s, beta)
        return beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    if kind in ("skew_kl", "skew_reverse_kl"):
        if not 0.0 <= alpha < 1.0:
            raise SlimlmError(f"skew alpha {alpha} must be in [0, 1)")
        return _kl(t, _mix(t, s, alpha)) if kind == "skew_kl" else _kl(s, _mix(s, t, alpha))
    raise SlimlmError(f"unknown distillation loss '{kind}': choose one of {', '.join(KINDS)}")


def _masked_mean(values: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.device).bool()
    n = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / n.clamp_min(1)


def _loss(kind, student_logits, teacher, mask=None, temperature=1.0, vocab_size=None, **kw) -> torch.Tensor:
    if temperature <= 0:
        raise SlimlmError(f"temperature {temperature} must be > 0")
    if vocab_size is None:
        vocab_size = student_logits.shape[-1] if isinstance(teacher, TopK) else \
            min(student_logits.shape[-1], teacher.shape[-1])
    s = torch.log_softmax(_float(student_logits[..., :vocab_size]) / temperature, dim=-1)
    t = teacher_logprobs(teacher, vocab_size, temperature).to(s.dtype)
    return _masked_mean(divergence(kind, s, t, **kw), mask) * temperature ** 2


def forward_kl(student_logits, teacher, mask=None, temperature: float = 1.0, vocab_size: int | None = None):
    """Mean over masked positions of KL(p_T || p_S), times T^2."""
    return _loss("forward_kl", student_logits, teacher, mask, temperature, vocab_size)


def reverse_kl(student_logits, teacher, mask=None, temperature: float = 1.0, vocab_size: int | None = None):
    """Mean over masked positions of KL(p_S || p_T), times T^2 (needs a full-vocabulary teacher)."""
    return _loss("reverse_kl", student_logits, teacher, mask, temperature, vocab_size)


def jsd(student_logits, teacher, mask=None, beta: float = 0.5, temperature: float = 1.0,
        vocab_size: int | None = None):
    """Generalized JSD with P = teacher weighted beta, Q = student, times T^2."""
    return _loss("jsd", student_logits, teacher, mask, temperature, vocab_size, beta=beta)


def skew_kl(student_logits, teacher, mask=None, alpha: float = 0.1, temperature: float = 1.0,
            vocab_size: int | None = None):
    """KL(p_T || alpha p_T + (1 - alpha) p_S), times T^2."""
    return _loss("skew_kl", student_logits, teacher, mask, temperature, vocab_size, alpha=alpha)


def skew_reverse_kl(student_logits, teacher, mask=None, alpha: float = 0.1, temperature: float = 1.0,
                    vocab_size: int | None = None):
    """KL(p_S || alpha p_S + (1 - alpha) p_T), times T^2."""
    return _loss("skew_reverse_kl", student_logits, teacher, mask, temperature, vocab_size, alpha=alpha)


def distill_loss(student_logits, labels, teacher, kind: str = "forward_kl", weight_ce: float = 0.0,
                 temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1, vocab_size: int | None = None,
                 shift: bool = True, ignore_index: int = -100, return_parts: bool = False):
    """(1 - weight_ce) * distillation loss + weight_ce * cross-entropy on the labels.

    `labels` are Hugging Face style: aligned with the input ids, `ignore_index` where no loss is
    taken; with `shift` (the default) the logits (student and teacher) at position t are scored
    against labels[t + 1], as transformers' own causal-LM loss does. Only positions with a label
    count, for both terms. The cross-entropy is at temperature 1. With return_parts, also returns
    {"kd": ..., "ce": ...} (detached)."""
    if not 0.0 <= weight_ce <= 1.0:
        raise SlimlmError(f"weight_ce {weight_ce} must be in [0, 1]")
    if kind not in KINDS:
        raise SlimlmError(f"unknown distillation loss '{kind}': choose one of {', '.join(KINDS)}")
    if shift:
        student_logits, labels = student_logits[..., :-1, :], labels[..., 1:]
        teacher = TopK(teacher.ids[..., :-1, :], teacher.logprobs[..., :-1, :]) if isinstance(teacher, TopK) \
            else teacher[..., :-1, :]
    mask = labels != ignore_index
    kw = {"beta": beta} if kind == "jsd" else {"alpha": alpha} if kind.startswith("skew") else {}
    kd = _loss(kind, student_logits, teacher, mask, temperature, vocab_size, **kw)
    v = vocab_size or student_logits.shape[-1]
    logits = _float(student_logits[..., :v])
    ce = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1).long(), ignore_index=ignore_index,
                         reduction="sum") / mask.sum().clamp_min(1)
    loss = (1 - weight_ce) * kd + weight_ce * ce
    return (loss, {"kd": kd.detach(), "ce": ce.detach()}) if return_parts else loss


def check_vocab_compat(teacher_tokenizer, student_tokenizer) -> int:
    """The shared vocabulary size, if teacher and student tokenize identically; otherwise a
    SlimlmError. Token-level distillation compares distributions over one vocabulary; when the
    tokenizers differ, sequence-level distillation (training the student on teacher outputs) is
    the way."""
    t, s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t != s:
        differ = sum(1 for tok, i in t.items() if s.get(tok) != i) + sum(1 for tok in s if tok not in t)
        raise SlimlmError(f"teacher and student tokenizers differ ({len(t)} vs {len(s)} tokens, {differ} not "
                          "shared with the same id): token-level distillation needs one vocabulary; use "
                          "sequence-level distillation (train the student on text the teacher generates) instead")
    return len(teacher_tokenizer)
