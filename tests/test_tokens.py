"""Token-level losses (distill.functional.tokens) against numbers worked out independently.

The references here are written with ``math`` on Python floats, or with plain float64 softmaxes
(``exp / sum``, then ``log``) and the formulas spelled out, never by calling the code under test.
Hyper-parameters are non-default (T = 2, β = 0.3, α = 0.2) so that a dropped ``T²``, a β read as
``1 − β`` or an α on the wrong side changes the numbers.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.functional.tokens import (
    DIVERGENCES,
    TopK,
    fused_linear_token_loss,
    token_divergence,
    token_loss,
    token_mask,
    token_weights,
    topk_logprobs,
    topk_token_divergence,
)

T, BETA, ALPHA = 2.0, 0.3, 0.2
KW = dict(temperature=T, beta=BETA, alpha=ALPHA)


# ---------------------------------------------------------------- independent references


def softmax_list(z, temp):
    e = [math.exp(v / temp) for v in z]
    return [v / sum(e) for v in e]


def kl_list(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def ref_list(s, t, divergence, temp=T, beta=BETA, alpha=ALPHA):
    """The divergence between two distributions given by logits, in plain Python floats."""
    q, p = softmax_list(s, temp), softmax_list(t, temp)
    if divergence == "forward_kl":
        d = kl_list(p, q)
    elif divergence == "reverse_kl":
        d = kl_list(q, p)
    elif divergence == "jsd" and beta in (0.0, 1.0):  # the end points: the limits, forward / reverse KL
        d = kl_list(p, q) if beta == 0.0 else kl_list(q, p)
    elif divergence == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        d = beta * kl_list(p, m) + (1 - beta) * kl_list(q, m)
    elif divergence == "skew_kl":
        d = kl_list(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    elif divergence == "skew_reverse_kl":
        d = kl_list(q, [(1 - alpha) * x + alpha * y for x, y in zip(p, q)])
    else:
        d = 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    return temp * temp * d


def ref_rows(s: torch.Tensor, t: torch.Tensor, divergence: str, **kw) -> torch.Tensor:
    """Row by row with :func:`ref_list` (float64 tensors in, (N,) out; no gradient)."""
    kw = {"temp": kw.get("temperature", T), "beta": kw.get("beta", BETA), "alpha": kw.get("alpha", ALPHA)}
    return torch.tensor([ref_list(a.tolist(), b.tolist(), divergence, **kw) for a, b in zip(s, t)],
                        dtype=torch.float64)


def randn(*shape, seed=0, dtype=torch.float64, scale=1.5):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# ---------------------------------------------------------------- a 3-token vocabulary by hand

S3, T3 = [1.0, 0.0, -1.0], [0.5, 2.0, -1.0]


def test_three_token_forward_kl_written_out():
    # p = softmax(t / 2), q = softmax(s / 2), T² · Σ p log(p / q)
    zp = math.exp(0.25) + math.exp(1.0) + math.exp(-0.5)
    zq = math.exp(0.5) + 1.0 + math.exp(-0.5)
    p = [math.exp(0.25) / zp, math.exp(1.0) / zp, math.exp(-0.5) / zp]
    q = [math.exp(0.5) / zq, 1.0 / zq, math.exp(-0.5) / zq]
    expected = 4.0 * (p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]) + p[2] * math.log(p[2] / q[2]))
    got = token_divergence(torch.tensor([S3]), torch.tensor([T3]), "forward_kl", temperature=2.0)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # by hand: p = (0.27860, 0.58979, 0.13160), q = (0.50648, 0.30720, 0.18632),
    # KL = -0.16652 + 0.38471 - 0.04576 = 0.17243, times T² = 4
    assert expected == pytest.approx(0.68973, abs=1e-4)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_three_token_vocabulary_each_divergence(divergence):
    got = token_divergence(torch.tensor([S3], dtype=torch.float64), torch.tensor([T3], dtype=torch.float64),
                           divergence, **KW)
    assert got.item() == pytest.approx(ref_list(S3, T3, divergence), rel=1e-9)


def test_three_token_jsd_weights_the_teacher_with_beta():
    """β is the teacher's share: JSD_β(p, q) = JSD_{1−β}(q, p); swapping β for 1 − β is another number."""
    s, t = torch.tensor([S3], dtype=torch.float64), torch.tensor([T3], dtype=torch.float64)
    a = token_divergence(s, t, "jsd", beta=0.3)
    assert a.item() == pytest.approx(token_divergence(t, s, "jsd", beta=0.7).item(), rel=1e-9)
    assert a.item() != pytest.approx(token_divergence(s, t, "jsd", beta=0.7).item(), rel=1e-3)


def test_jsd_end_points_and_limits():
    """β = 0 and β = 1 are forward and reverse KL (TRL's convention), the limits of JSD_β / β and
    JSD_β / (1 − β) (GKD, after Huszár 2015)."""
    s, t = randn(4, 6, seed=1), randn(4, 6, seed=2)
    fkl = ref_rows(s, t, "forward_kl", temperature=1.0)
    rkl = ref_rows(s, t, "reverse_kl", temperature=1.0)
    assert torch.allclose(token_divergence(s, t, "jsd", beta=0.0), fkl, rtol=1e-9)
    assert torch.allclose(token_divergence(s, t, "jsd", beta=1.0), rkl, rtol=1e-9)
    eps = 1e-5
    assert torch.allclose(token_divergence(s, t, "jsd", beta=eps) / eps, fkl, rtol=1e-3)
    assert torch.allclose(token_divergence(s, t, "jsd", beta=1 - eps) / eps, rkl, rtol=1e-3)


def test_skew_at_alpha_zero_is_plain_kl():
    s, t = randn(3, 5, seed=3), randn(3, 5, seed=4)
    assert torch.allclose(token_divergence(s, t, "skew_kl", alpha=0.0), token_divergence(s, t, "forward_kl"))
    assert torch.allclose(token_divergence(s, t, "skew_reverse_kl", alpha=0.0), token_divergence(s, t, "reverse_kl"))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float16_and_bfloat16_logits_are_computed_in_float32(divergence):
    s, t = randn(5, 11, seed=5, scale=3.0), randn(5, 11, seed=6, scale=3.0)
    ref = ref_rows(s, t, divergence)
    for dtype in (torch.float16, torch.bfloat16):
        s16, t16 = s.to(dtype), t.to(dtype)
        got = token_divergence(s16, t16, divergence, **KW)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref_rows(s16.double(), t16.double(), divergence), rtol=1e-5, atol=1e-6)
    assert torch.allclose(token_divergence(s, t, divergence, **KW), ref, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- properties


finite_logits = st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=7)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), divergence=st.sampled_from(DIVERGENCES), temp=st.floats(0.3, 5.0),
       beta=st.floats(0.0, 1.0), alpha=st.floats(0.0, 0.95))
def test_zero_at_equality_non_negative_and_only_the_student_gets_a_gradient(data, divergence, temp, beta, alpha):
    s_list = data.draw(finite_logits)
    t_list = data.draw(st.lists(st.floats(-8, 8, allow_nan=False), min_size=len(s_list), max_size=len(s_list)))
    s = torch.tensor([s_list], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([t_list], dtype=torch.float64, requires_grad=True)
    kw = dict(temperature=temp, beta=beta, alpha=alpha)
    d = token_divergence(s, t, divergence, **kw)
    assert d.item() >= -1e-12
    assert d.item() == pytest.approx(ref_list(s_list, t_list, divergence, temp, beta, alpha), rel=1e-6, abs=1e-9)
    d.sum().backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()
    same = token_divergence(t.detach(), t.detach(), divergence, **kw)
    assert abs(same.item()) < 1e-12


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_entries_give_no_nan(divergence):
    """Logits of -inf in both (a masked vocabulary entry) contribute nothing: equal to the
    divergence over the other entries, with finite gradients that are 0 at the masked entry."""
    s, t = randn(4, 6, seed=7), randn(4, 6, seed=8)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, 2] = -math.inf
    t_inf[:, 2] = -math.inf
    keep = [0, 1, 3, 4, 5]
    s_inf.requires_grad_(True)
    d = token_divergence(s_inf, t_inf, divergence, **KW)
    assert torch.allclose(d, ref_rows(s[:, keep], t[:, keep], divergence), rtol=1e-9)
    d.sum().backward()
    assert torch.isfinite(s_inf.grad).all() and (s_inf.grad[:, 2] == 0).all()


def test_mass_where_the_other_has_none_is_infinite_kl_not_nan():
    s = torch.tensor([[0.0, -math.inf, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    assert token_divergence(s, t, "forward_kl").item() == math.inf  # the teacher has mass the student lacks
    assert token_divergence(s, t, "reverse_kl").item() == pytest.approx(math.log(1.5), rel=1e-9)  # q = (1/2, 0, 1/2)
    assert math.isfinite(token_divergence(s, t, "jsd", beta=0.4).item())  # the mixture covers both
    assert math.isfinite(token_divergence(s, t, "skew_kl", alpha=0.2).item())


# ---------------------------------------------------------------- masks and reductions


def test_token_mask_causal_shift():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 3, -100]])
    # mask[:, t] = labels[:, t + 1] != -100; last position False; a label at position 0 never counts
    assert token_mask(labels).tolist() == [[True, False, True, False], [False, True, False, False]]
    assert token_mask(labels, causal=False).tolist() == [[True, True, False, True], [False, False, True, False]]


def test_token_weights_by_hand():
    mask = torch.tensor([[True, True, True, False], [False, True, False, False], [False] * 4])
    assert token_weights(mask, "sum").tolist() == [[1, 1, 1, 0], [0, 1, 0, 0], [0] * 4]
    assert torch.allclose(token_weights(mask, "token"), mask.float() / 4)
    # per sequence: 1 / (n in the sequence · 2 sequences with a token)
    expected = torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [0, 1 / 2, 0, 0], [0] * 4])
    assert torch.allclose(token_weights(mask, "sequence"), expected)
    assert token_weights(torch.zeros(2, 3, dtype=torch.bool), "token").sum() == 0


def _batch(seed=0, B=3, L=6, V=7):
    s = randn(B, L, V, seed=seed).requires_grad_(True)
    t = randn(B, L, V, seed=seed + 100)
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))
    labels[0, :2] = -100
    labels[1, 4:] = -100
    return s, t, labels


@pytest.mark.parametrize("reduction", ["token", "sequence", "sum"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_token_loss_equals_a_loop_over_shifted_tokens(divergence, reduction):
    s, t, labels = _batch()
    B, L, _ = s.shape
    per_seq = []
    for b in range(B):
        terms = [ref_list(s[b, i].tolist(), t[b, i].tolist(), divergence)
                 for i in range(L - 1) if labels[b, i + 1] != -100]
        per_seq.append(terms)
    n = sum(len(x) for x in per_seq)
    if reduction == "token":
        expected = sum(sum(x) for x in per_seq) / n
    elif reduction == "sum":
        expected = sum(sum(x) for x in per_seq)
    else:
        expected = sum(sum(x) / len(x) for x in per_seq if x) / sum(1 for x in per_seq if x)
    got = token_loss(s, t, labels, divergence, reduction=reduction, **KW)
    assert got.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_positions_change_neither_loss_nor_gradients(divergence):
    s, t, labels = _batch(seed=1)
    loss = token_loss(s, t, labels, divergence, **KW)
    (g,) = torch.autograd.grad(loss, s)
    dead = ~token_mask(labels)
    s2 = s.detach().clone()
    s2[dead] = s2[dead] * 7 + 3  # perturb the logits of every position without a (shifted) label
    s2[0, 0, 0] = math.inf  # even to something that would be NaN if it were computed
    t2 = t.clone()
    t2[dead] = -t2[dead]
    s2.requires_grad_(True)
    loss2 = token_loss(s2, t2, labels, divergence, **KW)
    (g2,) = torch.autograd.grad(loss2, s2)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.equal(g2, g) and (g2[dead] == 0).all()


def test_causal_shift_label_at_position_zero_and_last_logit_row_never_count():
    s, t, labels = _batch(seed=2)
    base = token_loss(s, t, labels, "forward_kl").item()
    other_labels = labels.clone()
    other_labels[:, 0] = torch.where(labels[:, 0] == -100, 0, -100)  # toggle the first label of every sequence
    assert token_loss(s, t, other_labels, "forward_kl").item() == pytest.approx(base, rel=1e-12)
    s2 = s.detach().clone()
    s2[:, -1] = 10 * torch.randn(s.shape[0], s.shape[2], dtype=s.dtype)
    assert token_loss(s2, t, labels, "forward_kl").item() == pytest.approx(base, rel=1e-12)
    # without the shift (encoders) both would count
    assert token_loss(s2, t, labels, "forward_kl", causal=False).item() != pytest.approx(
        token_loss(s, t, labels, "forward_kl", causal=False).item(), rel=1e-6)


def test_a_batch_without_labels_is_zero_with_a_warning_and_backward_works():
    s, t, labels = _batch(seed=3)
    labels[:] = -100
    with pytest.warns(RuntimeWarning, match="no token with a label"):
        loss = token_loss(s, t, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all()


def test_bad_labels_and_shapes_are_named():
    s, t, labels = _batch(seed=4)
    bad = labels.clone()
    bad[1, 2] = 7  # V = 7: not a token id
    with pytest.raises(ValueError, match=r"labels contain 7.*\[0, 7\)"):
        token_loss(s, t, bad)
    bad[1, 2] = -5
    with pytest.raises(ValueError, match="labels contain -5"):
        token_loss(s, t, bad)
    bad[1, 2] = -101
    with pytest.raises(ValueError, match="labels contain -101"):
        token_loss(s, t, bad)
    with pytest.raises(ValueError, match=r"\(3, 6, 7\) but teacher logits \(3, 6, 8\)"):
        token_loss(s, torch.zeros(3, 6, 8, dtype=torch.float64), labels)
    with pytest.raises(ValueError, match=r"labels have shape \(3, 5\)"):
        token_loss(s, t, labels[:, :5])
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        token_loss(s, t, labels, "kl")
    with pytest.raises(ValueError, match="beta"):
        token_divergence(s[0], t[0], "jsd", beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        token_divergence(s[0], t[0], "skew_kl", alpha=1.0)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(s[0], t[0], temperature=0.0)
    with pytest.raises(ValueError, match="unknown reduction"):
        token_weights(token_mask(labels), "mean")


# ---------------------------------------------------------------- top-k teachers


def test_topk_hand_worked_four_tokens_k2():
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.1, 0.2, 0.3, 0.4]
    t = torch.tensor([[math.log(x) for x in p]], dtype=torch.float64)
    s = torch.tensor([[math.log(x) for x in q]], dtype=torch.float64)
    top = topk_logprobs(t, 2)
    assert top.indices.tolist() == [[0, 1]]
    assert torch.allclose(top.values.exp(), torch.tensor([[0.5, 0.3]], dtype=torch.float64))
    assert top.tail.item() == pytest.approx(0.2, rel=1e-12)
    # bins: teacher (0.5, 0.3, 0.2), student (0.1, 0.2, 0.7)
    fkl = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.7)
    rkl = 0.1 * math.log(0.1 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.7 * math.log(0.7 / 0.2)
    assert fkl == pytest.approx(0.675806, abs=1e-6)
    got = topk_token_divergence(s, top.values, top.indices, "forward_kl", tail=top.tail)
    assert got.item() == pytest.approx(fkl, rel=1e-9)
    got = topk_token_divergence(s, top.values, top.indices, "reverse_kl")  # tail = 1 - Σ exp(values)
    assert got.item() == pytest.approx(rkl, rel=1e-9)
    assert topk_token_divergence(s, top.values, top.indices, "tvd").item() == pytest.approx(0.5, rel=1e-9)
    # at T = 2 with the teacher's top-k made at T = 2: the tempered collapsed KL, times T²
    top2 = topk_logprobs(t, 2, temperature=2.0)
    pt = [x ** 0.5 / sum(y ** 0.5 for y in p) for x in p]
    qt = [x ** 0.5 / sum(y ** 0.5 for y in q) for x in q]
    pb, qb = [pt[0], pt[1], pt[2] + pt[3]], [qt[0], qt[1], qt[2] + qt[3]]
    expected = 4.0 * sum(a * math.log(a / b) for a, b in zip(pb, qb))
    got = topk_token_divergence(s, top2.values, top2.indices, "forward_kl", tail=top2.tail, temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_k_equal_to_the_vocabulary_is_the_full_divergence(divergence):
    s, t = randn(6, 9, seed=11).requires_grad_(True), randn(6, 9, seed=12)
    top = topk_logprobs(t, 9, temperature=T)
    assert (top.tail == 0).all()
    full = token_divergence(s, t, divergence, **KW)
    part = topk_token_divergence(s, top.values, top.indices, divergence, tail=top.tail, **KW)
    assert torch.allclose(part, full, rtol=1e-9, atol=1e-12)
    (g_full,) = torch.autograd.grad(full.sum(), s)
    (g_part,) = torch.autograd.grad(part.sum(), s)
    assert torch.isfinite(g_part).all() and torch.allclose(g_part, g_full, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_equals_the_divergence_on_the_collapsed_distributions(divergence):
    s, t = randn(5, 8, seed=13), randn(5, 8, seed=14)
    top = topk_logprobs(t, 3, temperature=T)
    got = topk_token_divergence(s, top.values, top.indices, divergence, tail=top.tail, **KW)
    for row in range(5):
        p, q = softmax_list(t[row].tolist(), T), softmax_list(s[row].tolist(), T)
        idx = top.indices[row].tolist()
        pb = [p[i] for i in idx] + [sum(p[i] for i in range(8) if i not in idx)]
        qb = [q[i] for i in idx] + [sum(q[i] for i in range(8) if i not in idx)]
        # a "distribution with logits log(bins)" at temperature 1, scaled by T² by hand
        expected = T * T * ref_list([math.log(x) for x in qb], [math.log(x) for x in pb], divergence, temp=1.0)
        assert got[row].item() == pytest.approx(expected, rel=1e-9)


def test_topk_tail_is_exact_when_tiny():
    # one token holds almost all the mass: 1 − Σ top would cancel to 0, logsumexp of the rest does not
    t = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    top = topk_logprobs(t, 1)
    assert top.tail.item() == pytest.approx(3 * math.exp(-60.0), rel=1e-5)
    assert top.values.dtype == torch.float32 and top.indices.dtype == torch.long
    assert topk_logprobs(t.to(torch.bfloat16), 2).values.dtype == torch.float32
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\]"):
        topk_logprobs(t, 5)


def test_topk_teacher_values_in_float16_are_renormalised():
    s, t = randn(4, 10, seed=15), randn(4, 10, seed=16)
    top = topk_logprobs(t, 4)
    exact = topk_token_divergence(s, top.values, top.indices, "forward_kl", tail=top.tail)
    half = topk_token_divergence(s, top.values.half(), top.indices, "forward_kl", tail=top.tail.half())
    assert torch.allclose(half.double(), exact.double(), atol=2e-3)
    assert (half > -1e-6).all()


# ---------------------------------------------------------------- the fused, chunked loss


def _naive(hidden, weight, bias, teacher_logits, weights, divergence, ce_labels=None, ce_weight=0.0, **kw):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    per = token_divergence(logits, teacher_logits, divergence, **kw)
    if ce_weight:
        per = per + ce_weight * F.cross_entropy(logits.float(), ce_labels, ignore_index=-100, reduction="none")
    return (weights * per).sum()


def _fused_case(N=13, H=5, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_(True)
    bias = torch.randn(V, generator=g, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(N, V, generator=g, dtype=dtype) * 2
    weights = torch.rand(N, generator=g, dtype=dtype)
    weights[[1, N // 2, N // 2 + 1]] = 0.0  # masked rows
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, N // 2 + 1]] = -100
    return hidden, weight, bias, teacher, weights, labels


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 100])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_equals_naive_values_and_gradients(divergence, chunk_size):
    hidden, weight, bias, teacher, weights, labels = _fused_case()
    kw = dict(KW, ce_labels=labels, ce_weight=0.7)
    fused = fused_linear_token_loss(hidden, weight, teacher, weights, divergence, bias=bias, chunk_size=chunk_size,
                                    **kw)
    naive = _naive(hidden, weight, bias, teacher, weights, divergence, **kw)
    assert fused.item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(_grads(fused, hidden, weight, bias), _grads(naive, hidden, weight, bias)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_masked_rows_get_zero_gradient_and_are_never_computed():
    hidden, weight, bias, teacher, weights, labels = _fused_case(seed=1)
    teacher = teacher.clone()
    teacher[1] = math.nan  # a row of weight 0: if it were computed the loss would be NaN
    hidden2 = hidden.detach().clone()
    hidden2[6] = math.inf
    hidden2.requires_grad_(True)
    loss = fused_linear_token_loss(hidden2, weight, teacher, weights, "jsd", bias=bias, chunk_size=3, beta=0.3)
    assert torch.isfinite(loss)
    (g,) = _grads(loss, hidden2)
    assert (g[[1, 6, 7]] == 0).all() and torch.isfinite(g).all()  # the rows of weight 0 (N = 13)


def test_fused_with_bfloat16_teacher_logits():
    hidden, weight, bias, teacher, weights, _ = _fused_case(seed=2)
    t16 = teacher.to(torch.bfloat16)
    fused = fused_linear_token_loss(hidden, weight, t16, weights, "skew_reverse_kl", bias=bias, chunk_size=4, **KW)
    naive = _naive(hidden, weight, bias, t16, weights, "skew_reverse_kl", **KW)
    assert fused.item() == pytest.approx(naive.item(), rel=1e-5)
    for a, b in zip(_grads(fused, hidden, weight, bias), _grads(naive, hidden, weight, bias)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_with_a_topk_teacher(divergence):
    hidden, weight, bias, teacher, weights, _ = _fused_case(seed=3)
    top = topk_logprobs(teacher, 4, temperature=T)
    fused = fused_linear_token_loss(hidden, weight, top, weights, divergence, bias=bias, chunk_size=5, **KW)
    logits = hidden @ weight.T + bias
    naive = (weights * topk_token_divergence(logits, top.values, top.indices, divergence, tail=top.tail, **KW)).sum()
    assert fused.item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-7)
    for a, b in zip(_grads(fused, hidden, weight, bias), _grads(naive, hidden, weight, bias)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    no_tail = fused_linear_token_loss(hidden, weight, TopK(top.values, top.indices), weights, divergence, bias=bias,
                                      chunk_size=5, **KW)
    assert no_tail.item() == pytest.approx(fused.item(), rel=1e-4, abs=1e-6)


def test_fused_with_a_teacher_given_by_hidden_states_and_head():
    hidden, weight, bias, _, weights, _ = _fused_case(seed=4)
    g = torch.Generator().manual_seed(9)
    t_hidden, t_weight, t_bias = torch.randn(13, 7, generator=g), torch.randn(11, 7, generator=g), torch.randn(11)
    fused = fused_linear_token_loss(hidden, weight, (t_hidden, t_weight, t_bias), weights, "reverse_kl", bias=bias,
                                    chunk_size=6, temperature=1.5)
    naive = _naive(hidden, weight, bias, t_hidden @ t_weight.T + t_bias, weights, "reverse_kl", temperature=1.5)
    assert fused.item() == pytest.approx(naive.item(), rel=1e-5)
    for a, b in zip(_grads(fused, hidden, weight, bias), _grads(naive, hidden, weight, bias)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_without_bias_and_grad_output_scaling():
    hidden, weight, _, teacher, weights, _ = _fused_case(seed=5)
    fused = fused_linear_token_loss(hidden, weight, teacher, weights, "forward_kl", chunk_size=4)
    naive = _naive(hidden, weight, None, teacher, weights, "forward_kl", temperature=1.0)
    for a, b in zip(_grads(3.5 * fused, hidden, weight), _grads(3.5 * naive, hidden, weight)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_gradcheck_float64():
    hidden, weight, bias, teacher, weights, labels = _fused_case(N=5, H=3, V=4, seed=6, dtype=torch.float64)

    def f(h, w, b):
        return fused_linear_token_loss(h, w, teacher, weights, "jsd", bias=b, chunk_size=2, beta=0.3, temperature=1.7,
                                       ce_labels=labels, ce_weight=0.4)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_fused_errors_name_the_bad_input():
    hidden, weight, bias, teacher, weights, labels = _fused_case(seed=7)
    with pytest.raises(ValueError, match=r"teacher logits have shape \(13, 10\)"):
        fused_linear_token_loss(hidden, weight, teacher[:, :10], weights)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_token_loss(hidden, weight, teacher, weights, chunk_size=0)
    with pytest.raises(ValueError, match=r"weights must be \(N,\) = \(13,\)"):
        fused_linear_token_loss(hidden, weight, teacher, weights[:4])
    bad = labels.clone()
    bad[0] = 11
    with pytest.raises(ValueError, match="labels contain 11"):
        fused_linear_token_loss(hidden, weight, teacher, weights, ce_labels=bad, ce_weight=1.0)
    with pytest.raises(ValueError, match="needs ce_labels"):
        fused_linear_token_loss(hidden, weight, teacher, weights, ce_weight=1.0)
    with pytest.raises(TypeError, match="teacher must be"):
        fused_linear_token_loss(hidden, weight, "teacher", weights)


def test_fused_all_weights_zero_is_zero_with_zero_gradients():
    hidden, weight, bias, teacher, _, _ = _fused_case(seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = fused_linear_token_loss(hidden, weight, teacher, torch.zeros(13), bias=bias)
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in _grads(loss, hidden, weight, bias))


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
def test_written_out_forward_kl_chunk_equals_autograd(T, ce_weight):
    """The fused loss's written-out forward-KL gradient (no autograd) equals autograd's, with CE at
    temperature 1 beside a tempered KL, unlabelled rows and a teacher that rules tokens out (-inf)."""
    from distill.functional.tokens import _chunk_loss, _forward_kl_chunk

    g = torch.Generator().manual_seed(5)
    C, V = 6, 11
    z = torch.randn(C, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(C, V, generator=g, dtype=torch.float64) * 2
    t[1, 3] = -math.inf
    labels = torch.tensor([4, -100, 0, 10, -100, 7])
    weights = torch.tensor([0.5, 0.25, 1.0, 2.0, 0.0, 0.125], dtype=torch.float64)
    spec = {"divergence": "forward_kl", "beta": 0.5, "alpha": 0.1, "temperature": T, "ce_weight": ce_weight,
            "ce_labels": labels}
    teacher = ("logits", t, None, None)
    rows = slice(0, C)
    leaf = z.clone().requires_grad_()
    ref_loss = _chunk_loss(leaf, rows, weights, teacher, spec)
    ref_grad, = torch.autograd.grad(ref_loss, leaf)
    loss, grad = _forward_kl_chunk(z.clone(), rows, weights, teacher, spec)
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
@pytest.mark.parametrize("T, ce_weight", [(1.0, 0.0), (1.0, 0.6), (2.0, 0.0)])
def test_written_out_topk_chunk_equals_autograd(divergence, T, ce_weight):
    """The fused loss's shared-pass top-k gradient equals autograd's over the k + 1 bins and CE."""
    from distill.functional.tokens import _chunk_loss, _topk_chunk

    g = torch.Generator().manual_seed(7)
    C, V, k = 5, 13, 4
    z = torch.randn(C, V, generator=g, dtype=torch.float64) * 2
    teacher_logits = torch.randn(C, V, generator=g, dtype=torch.float64) * 3
    top = topk_logprobs(teacher_logits, k, temperature=T)
    labels = torch.tensor([3, -100, 12, 0, 5])
    weights = torch.tensor([0.5, 0.25, 1.0, 2.0, 0.75], dtype=torch.float64)
    spec = {"divergence": divergence, "beta": 0.3, "alpha": 0.2, "temperature": T, "ce_weight": ce_weight,
            "ce_labels": labels}
    teacher = ("topk", top.values, top.indices, top.tail)
    leaf = z.clone().requires_grad_()
    ref_loss = _chunk_loss(leaf, slice(0, C), weights, teacher, spec)
    ref_grad, = torch.autograd.grad(ref_loss, leaf)
    loss, grad = _topk_chunk(z.clone(), slice(0, C), weights, teacher, spec)
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-10)
