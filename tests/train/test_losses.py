"""Distillation losses against direct float64 computations: torch.distributions for the KLs, explicit
sums for JSD and the skewed KLs; JSD's beta limits; zero for equal distributions; masking,
temperature, the top-k teacher (renormalized over its k), vocabulary padding and the CE mix."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from slimlm.errors import SlimlmError
from slimlm.train.losses import (
    KINDS,
    TopK,
    check_vocab_compat,
    distill_loss,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
)

V = 11


def _logits(seed, shape=(2, 5, V), scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _mask():
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 0] = False
    return mask


def _mean(per_pos, mask):
    return per_pos[mask].mean()


def _kl(p, q):  # explicit sum over the vocabulary, p and q probabilities
    return (p * (p.log() - q.log())).sum(-1)


def test_forward_and_reverse_kl_match_torch_distributions():
    s, t, mask = _logits(0), _logits(1), _mask()
    fwd = kl_divergence(Categorical(logits=t), Categorical(logits=s))
    rev = kl_divergence(Categorical(logits=s), Categorical(logits=t))
    torch.testing.assert_close(forward_kl(s, t, mask), _mean(fwd, mask))
    torch.testing.assert_close(reverse_kl(s, t, mask), _mean(rev, mask))
    torch.testing.assert_close(forward_kl(s, torch.log_softmax(t, -1), mask), _mean(fwd, mask))  # log-probs work too
    torch.testing.assert_close(forward_kl(s, t), fwd.mean())  # no mask: every position


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_explicit_sum(beta):
    s, t, mask = _logits(2), _logits(3), _mask()
    P, Q = t.softmax(-1), s.softmax(-1)  # P = teacher, Q = student
    M = beta * P + (1 - beta) * Q
    direct = beta * _kl(P, M) + (1 - beta) * _kl(Q, M)
    torch.testing.assert_close(jsd(s, t, mask, beta=beta), _mean(direct, mask))


def test_jsd_beta_limits():
    s, t, mask = _logits(4), _logits(5), _mask()
    fwd, rev = forward_kl(s, t, mask), reverse_kl(s, t, mask)
    eps = 1e-7
    torch.testing.assert_close(jsd(s, t, mask, beta=eps) / eps, fwd, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(jsd(s, t, mask, beta=1 - eps) / eps, rev, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(jsd(s, t, mask, beta=0.0), fwd)
    torch.testing.assert_close(jsd(s, t, mask, beta=1.0), rev)
    torch.testing.assert_close(jsd(s, t, mask, beta=0.5), jsd(t, s, mask, beta=0.5))  # symmetric at 0.5
    with pytest.raises(SlimlmError, match="beta"):
        jsd(s, t, mask, beta=1.5)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5])
def test_skew_kls_match_explicit_sums(alpha):
    s, t, mask = _logits(6), _logits(7), _mask()
    P, Q = t.softmax(-1), s.softmax(-1)
    torch.testing.assert_close(skew_kl(s, t, mask, alpha=alpha), _mean(_kl(P, alpha * P + (1 - alpha) * Q), mask))
    torch.testing.assert_close(skew_reverse_kl(s, t, mask, alpha=alpha),
                               _mean(_kl(Q, alpha * Q + (1 - alpha) * P), mask))
    if alpha == 0.0:
        torch.testing.assert_close(skew_kl(s, t, mask, alpha=0.0), forward_kl(s, t, mask))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_when_distributions_are_equal(kind):
    s = _logits(8)
    loss = distill_loss(s, torch.zeros(2, 5, dtype=torch.long), teacher=s + 3.0, kind=kind, shift=False)
    assert abs(float(loss)) < 1e-12
    assert float(distill_loss(s, torch.zeros(2, 5, dtype=torch.long), teacher=_logits(9), kind=kind,
                              shift=False)) > 1e-3


def test_masking_ignores_unlabelled_positions():
    s, t, mask = _logits(10), _logits(11), _mask()
    s2 = s.clone()
    s2[~mask] = _logits(12)[~mask]  # change only the masked-out positions
    for fn in (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl):
        torch.testing.assert_close(fn(s2, t, mask), fn(s, t, mask))
        assert not torch.allclose(fn(s2, t), fn(s, t))
    empty = forward_kl(s, t, torch.zeros_like(mask))
    assert float(empty) == 0.0


def test_temperature_scales_logits_and_multiplies_by_t_squared():
    s, t, mask = _logits(13), _logits(14), _mask()
    T = 2.5
    direct = kl_divergence(Categorical(logits=t / T), Categorical(logits=s / T)) * T ** 2
    torch.testing.assert_close(forward_kl(s, t, mask, temperature=T), _mean(direct, mask))
    P, Q = (t / T).softmax(-1), (s / T).softmax(-1)
    M = 0.3 * P + 0.7 * Q
    torch.testing.assert_close(jsd(s, t, mask, beta=0.3, temperature=T),
                               _mean((0.3 * _kl(P, M) + 0.7 * _kl(Q, M)) * T ** 2, mask))


def _topk(t, k, T=1.0):
    lp = torch.log_softmax(t, -1)
    top = lp.topk(k, dim=-1)
    return TopK(top.indices, top.values), lp


def test_topk_teacher_renormalizes_over_its_k():
    s, t, mask = _logits(15), _logits(16), _mask()
    k, T = 4, 1.7
    teacher, _ = _topk(t, k)
    # direct: p~ = exp(logprob / T) over the top k, renormalized; zero elsewhere
    w = torch.zeros_like(t).scatter(-1, teacher.ids, (teacher.logprobs / T).exp())
    P = w / w.sum(-1, keepdim=True)
    Q = (s / T).softmax(-1)
    terms = torch.where(P > 0, P * (P.clamp_min(1e-300).log() - Q.log()), torch.zeros_like(P)).sum(-1)
    torch.testing.assert_close(forward_kl(s, teacher, mask, temperature=T), _mean(terms * T ** 2, mask))
    M = 0.5 * P + 0.5 * Q
    direct_jsd = 0.5 * torch.where(P > 0, P * (P.clamp_min(1e-300).log() - M.log()), torch.zeros_like(P)).sum(-1) \
        + 0.5 * _kl(Q, M)
    torch.testing.assert_close(jsd(s, teacher, mask, temperature=T), _mean(direct_jsd * T ** 2, mask))
    full, _ = _topk(t, V)  # k = V: the full teacher
    torch.testing.assert_close(forward_kl(s, full, mask), forward_kl(s, t, mask))
    with pytest.raises(SlimlmError, match="skew_reverse_kl"):
        reverse_kl(s, teacher, mask)
    # a student that is exactly the renormalized top-k teacher has zero loss
    student = torch.where(P > 0, P.clamp_min(1e-300).log(), torch.full_like(P, -1e4)) * T
    assert abs(float(forward_kl(student, teacher, mask, temperature=T))) < 1e-10


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_kl", "skew_reverse_kl"])
def test_topk_gradients_are_finite(kind):
    s = _logits(17).float().requires_grad_()
    teacher, _ = _topk(_logits(18).float(), 3)
    distill_loss(s, torch.ones(2, 5, dtype=torch.long), teacher=teacher, kind=kind).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_vocab_padding_is_truncated():
    s, t, mask = _logits(19), _logits(20), _mask()
    pad_s = torch.cat([s, torch.full((2, 5, 3), 5.0, dtype=s.dtype)], -1)  # padding rows with big logits
    pad_t = torch.cat([t, torch.full((2, 5, 8), 9.0, dtype=t.dtype)], -1)
    ref = forward_kl(s, t, mask)
    torch.testing.assert_close(forward_kl(s, pad_t, mask), ref)  # default: the smaller width
    torch.testing.assert_close(forward_kl(pad_s, pad_t, mask, vocab_size=V), ref)
    # a padded teacher whose top 4 holds one padding id: it is dropped, the real top 3 renormalized
    pad_t = torch.cat([t, t.amax(-1, keepdim=True) + 1, torch.full((2, 5, 7), -50.0, dtype=t.dtype)], -1)
    teacher, _ = _topk(pad_t, 4)
    assert (teacher.ids == V).any(-1).all()
    torch.testing.assert_close(forward_kl(pad_s, teacher, mask, vocab_size=V),
                               forward_kl(s, _topk(t, 3)[0], mask))
    with pytest.raises(SlimlmError, match="real vocabulary size"):
        forward_kl(s, _topk(pad_t, 1)[0], mask, vocab_size=V)


def test_distill_loss_shifts_labels_and_mixes_ce():
    s, t = _logits(21), _logits(22)
    labels = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    labels[1, 4] = -100
    w = 0.3
    loss, parts = distill_loss(s, labels, teacher=t, kind="skew_kl", weight_ce=w, alpha=0.2, return_parts=True)
    ss, tt, ll = s[:, :-1], t[:, :-1], labels[:, 1:]
    mask = ll != -100
    P, Q = tt.softmax(-1), ss.softmax(-1)
    kd = _mean(_kl(P, 0.2 * P + 0.8 * Q), mask)
    ce = -torch.log_softmax(ss, -1).gather(-1, ll.clamp_min(0)[..., None])[..., 0][mask].mean()
    torch.testing.assert_close(parts["kd"], kd)
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(loss, (1 - w) * kd + w * ce)
    torch.testing.assert_close(distill_loss(s, labels, teacher=t, weight_ce=1.0), ce)
    with pytest.raises(SlimlmError, match="unknown distillation loss"):
        distill_loss(s, labels, teacher=t, kind="kl")
    with pytest.raises(SlimlmError):
        divergence("skew_kl", s, t, alpha=1.0)


def test_check_vocab_compat(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    b = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert check_vocab_compat(a, b) == len(a)
    b.add_tokens(["<extra_token>"])
    with pytest.raises(SlimlmError, match="sequence-level distillation"):
        check_vocab_compat(a, b)
