"""Each loss in distill.functional against numbers computed independently (numpy, explicit loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distill import functional as DF

SETTINGS = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------------------- helpers (numpy)


def np_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def np_kd(s: np.ndarray, t: np.ndarray, T: float) -> float:
    return float(np.mean([np_kl(np_softmax(t[b] / T), np_softmax(s[b] / T)) for b in range(len(s))])) * T * T


def logits_pair(seed: int, b: int, k: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
    return s, t


shapes = st.tuples(st.integers(0, 10_000), st.integers(2, 6), st.integers(2, 7))


# ---------------------------------------------------------------------------- CE / label smoothing


def test_cross_entropy_hand_example():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    want = 0.5 * (-math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3))) + math.log(3))
    assert DF.cross_entropy(z, y).item() == pytest.approx(want, rel=1e-12)


def test_label_smoothing_against_loop_and_torch():
    z = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, 0.1, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    eps, k = 0.1, 4
    total = 0.0
    for b in range(2):
        p = np_softmax(z[b].numpy())
        for c in range(k):
            q = (1 - eps) * (c == int(y[b])) + eps / k
            total -= q * math.log(p[c])
    want = total / 2
    assert DF.label_smoothing_loss(z, y, eps).item() == pytest.approx(want, rel=1e-12)
    assert DF.label_smoothing_loss(z, y, eps).item() == pytest.approx(
        F.cross_entropy(z, y, label_smoothing=eps).item(), rel=1e-12
    )
    assert DF.label_smoothing_loss(z, y, 0.0).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-12)


def test_smooth_targets_rows_sum_to_one():
    q = DF.smooth_targets(torch.tensor([1, 0]), 5, 0.2)
    assert torch.allclose(q.sum(1), torch.ones(2, dtype=q.dtype))
    assert q[0, 1].item() == pytest.approx(0.8 + 0.04)
    assert q[0, 0].item() == pytest.approx(0.04)
    with pytest.raises(ValueError):
        DF.smooth_targets(torch.tensor([0]), 3, 1.5)


# ---------------------------------------------------------------------------- KD


def test_kd_hand_example():
    s = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    # T = 1: p = softmax(t) = (a, b, c), q = reverse(p); KL = (a - c) * (log a - log c) = (a - c) * 2
    e = [math.exp(3), math.exp(2), math.exp(1)]
    a, c = e[0] / sum(e), e[2] / sum(e)
    assert DF.kd_loss(s, t, 1.0).item() == pytest.approx((a - c) * 2.0, rel=1e-12)


def test_kd_against_numpy_loop():
    s, t = logits_pair(0, 5, 7)
    for T in (1.0, 2.5, 4.0):
        assert DF.kd_loss(s, t, T).item() == pytest.approx(np_kd(s.numpy(), t.numpy(), T), rel=1e-10)


def test_kd_accepts_tensor_temperature():
    s, t = logits_pair(1, 3, 4)
    T = torch.tensor(3.0, dtype=torch.float64)
    assert DF.kd_loss(s, t, T).item() == pytest.approx(DF.kd_loss(s, t, 3.0).item(), rel=1e-12)


@SETTINGS
@given(shapes, st.floats(0.5, 10.0))
def test_kd_zero_when_equal_and_nonnegative(shape, T):
    seed, b, k = shape
    s, t = logits_pair(seed, b, k)
    assert abs(DF.kd_loss(s, s.clone(), T).item()) < 1e-10
    assert DF.kd_loss(s, t, T).item() >= -1e-12
    assert (DF.kd_per_sample(s, t, T) >= -1e-12).all()


@SETTINGS
@given(shapes)
def test_kd_t_squared_keeps_the_high_temperature_limit(shape):
    # With the T^2 factor, KD tends to 1/(2K) * sum_k (d_k - mean d)^2, d = s - t, as T grows
    # (Hinton et al., section 2.1); without it, the loss would vanish like 1/T^2.
    seed, b, k = shape
    s, t = logits_pair(seed, b, k, scale=1.0)
    d = (s - t).numpy()
    limit = np.mean([((d[i] - d[i].mean()) ** 2).sum() / (2 * k) for i in range(b)])
    got = DF.kd_loss(s, t, 1000.0).item()
    assert got == pytest.approx(limit, rel=2e-2, abs=1e-9)


# ---------------------------------------------------------------------------- logit regression / noisy teacher


def test_logit_regression_against_loop():
    s, t = logits_pair(2, 4, 3)
    want = sum(sum((float(s[b, k]) - float(t[b, k])) ** 2 for k in range(3)) for b in range(4)) / (2 * 4)
    assert DF.logit_regression_loss(s, t).item() == pytest.approx(want, rel=1e-12)
    # hand example: one sample, difference (1, 2) -> 0.5 * 5
    assert DF.logit_regression_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)


@SETTINGS
@given(shapes)
def test_logit_regression_properties(shape):
    seed, b, k = shape
    s, t = logits_pair(seed, b, k)
    assert DF.logit_regression_loss(s, s.clone()).item() == 0.0
    assert DF.logit_regression_loss(s, t).item() > 0.0


def test_noisy_teacher_exact_given_noise():
    s = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 4.0], [1.0, -1.0], [3.0, 3.0]], dtype=torch.float64)
    xi = torch.tensor([[0.5, -0.5], [0.1, 0.2], [1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    # perturbed teacher by hand: row0 (3, 2); row1 unchanged (1, -1); row2 (6, 6)
    zp = [[3.0, 2.0], [1.0, -1.0], [6.0, 6.0]]
    assert torch.equal(DF.perturb_logits(t, xi, mask), torch.tensor(zp, dtype=torch.float64))
    want = sum((float(s[b, k]) - zp[b][k]) ** 2 for b in range(3) for k in range(2)) / (2 * 3)
    assert DF.noisy_teacher_loss(s, t, xi, mask).item() == pytest.approx(want, rel=1e-12)
    # no mask: every row perturbed
    assert torch.equal(DF.perturb_logits(t, xi), t * (1 + xi))


def test_noisy_teacher_sampling_is_reproducible_and_has_the_right_law():
    t = torch.zeros(4000, 10)
    n1, m1 = DF.sample_logit_noise(t, 0.1, 0.3, torch.Generator().manual_seed(7))
    n2, m2 = DF.sample_logit_noise(t, 0.1, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(n1, n2) and torch.equal(m1, m2)
    assert n1.shape == t.shape and m1.shape == (4000,) and m1.dtype == torch.bool
    assert abs(n1.mean().item()) < 0.01
    assert n1.var().item() == pytest.approx(0.1, rel=0.05)
    assert m1.float().mean().item() == pytest.approx(0.3, abs=0.03)
    _, m_none = DF.sample_logit_noise(t, 0.1, 0.0)
    _, m_all = DF.sample_logit_noise(t, 0.1, 1.0)
    assert not m_none.any() and m_all.all()


def test_noisy_teacher_with_no_selected_sample_is_logit_regression():
    s, t = logits_pair(3, 4, 5)
    noise, _ = DF.sample_logit_noise(t, 0.5, 0.5, torch.Generator().manual_seed(0))
    mask = torch.zeros(4, dtype=torch.bool)
    assert DF.noisy_teacher_loss(s, t, noise, mask).item() == pytest.approx(DF.logit_regression_loss(s, t).item())


# ---------------------------------------------------------------------------- DKD


def np_dkd(s: np.ndarray, t: np.ndarray, y: np.ndarray, T: float) -> tuple[list[float], list[float]]:
    tck, nck = [], []
    for b in range(len(s)):
        p, q = np_softmax(t[b] / T), np_softmax(s[b] / T)
        yt = int(y[b])
        pt, qt = p[yt], q[yt]
        tck.append((pt * math.log(pt / qt) + (1 - pt) * math.log((1 - pt) / (1 - qt))) * T * T)
        others = [c for c in range(len(p)) if c != yt]
        ph = np.array([p[c] for c in others]) / (1 - pt)
        qh = np.array([q[c] for c in others]) / (1 - qt)
        nck.append(np_kl(ph, qh) * T * T)
    return tck, nck


def test_dkd_parts_against_numpy():
    s, t = logits_pair(4, 6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for T in (1.0, 4.0):
        tck, nck = np_dkd(s.numpy(), t.numpy(), y.numpy(), T)
        got_t, got_n = DF.dkd_per_sample(s, t, y, T)
        np.testing.assert_allclose(got_t.numpy(), tck, rtol=1e-9)
        np.testing.assert_allclose(got_n.numpy(), nck, rtol=1e-9)
        mt, mn = DF.dkd_parts(s, t, y, T)
        assert mt.item() == pytest.approx(np.mean(tck), rel=1e-9)
        assert mn.item() == pytest.approx(np.mean(nck), rel=1e-9)
        assert DF.dkd_loss(s, t, y, 1.0, 8.0, T).item() == pytest.approx(np.mean(tck) + 8 * np.mean(nck), rel=1e-9)


@SETTINGS
@given(shapes, st.floats(0.5, 8.0))
def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd(shape, T):
    seed, b, k = shape
    s, t = logits_pair(seed, b, k)
    y = torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed))
    tckd, nckd = DF.dkd_per_sample(s, t, y, T)
    p_t = F.softmax(t / T, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    kd = DF.kd_per_sample(s, t, T)
    torch.testing.assert_close(kd, tckd + (1 - p_t) * nckd, rtol=1e-9, atol=1e-10)
    assert (tckd >= -1e-12).all() and (nckd >= -1e-12).all()
    zt, zn = DF.dkd_per_sample(s, s.clone(), y, T)
    assert zt.abs().max().item() < 1e-10 and zn.abs().max().item() < 1e-10


def test_dkd_identity_at_t_not_one_explicit():
    s = torch.tensor([[0.2, 1.5, -0.3, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 3.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([1])
    T = 3.0
    tckd, nckd = DF.dkd_per_sample(s, t, y, T)
    p_t = np_softmax(t[0].numpy() / T)[1]
    assert (tckd + (1 - p_t) * nckd).item() == pytest.approx(np_kd(s.numpy(), t.numpy(), T), rel=1e-10)


# ---------------------------------------------------------------------------- DIST


def test_dist_against_numpy_corrcoef():
    s, t = logits_pair(5, 6, 5)
    T, beta, gamma = 4.0, 2.0, 3.0
    ys = np.stack([np_softmax(r) for r in s.numpy() / T])
    yt = np.stack([np_softmax(r) for r in t.numpy() / T])
    inter = np.mean([1 - np.corrcoef(ys[b], yt[b])[0, 1] for b in range(6)]) * T * T
    intra = np.mean([1 - np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(5)]) * T * T
    gi, ga = DF.dist_parts(s, t, T)
    assert gi.item() == pytest.approx(inter, rel=1e-6)
    assert ga.item() == pytest.approx(intra, rel=1e-6)
    assert DF.dist_loss(s, t, beta, gamma, T).item() == pytest.approx(beta * inter + gamma * intra, rel=1e-6)


def test_pearson_hand_example():
    a = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert DF.pearson_correlation(a, 2 * a + 1).item() == pytest.approx(1.0, abs=1e-8)
    assert DF.pearson_correlation(a, -a).item() == pytest.approx(-1.0, abs=1e-8)
    assert DF.pearson_correlation(a, torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)).item() == pytest.approx(
        0.0, abs=1e-8
    )


@SETTINGS
@given(shapes, st.floats(1.0, 8.0))
def test_dist_zero_when_equal_and_bounded(shape, T):
    seed, b, k = shape
    # moderate logits: with near-one-hot softmax a class column can be constant to ~1e-14 across
    # the batch, where the correlation is numerically undefined (guarded to ~0 by eps)
    s, t = logits_pair(seed, b, k, scale=1.0)
    assert abs(DF.dist_loss(s, s.clone(), 1.0, 1.0, T).item()) < 1e-5 * T * T
    inter, intra = DF.dist_parts(s, t, T)
    # 1 - rho lies in [0, 2]
    for v in (inter.item(), intra.item()):
        assert -1e-9 <= v <= 2 * T * T + 1e-9


# ---------------------------------------------------------------------------- SKD


def np_layer_norm(row: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    mu = sum(row) / len(row)
    var = sum((x - mu) ** 2 for x in row) / len(row)
    return np.array([(x - mu) / math.sqrt(var + eps) for x in row])


def test_skd_against_numpy():
    s, t = logits_pair(6, 4, 6)
    T, m = 4.0, 2.0
    ss = np.stack([np_layer_norm(r) * m for r in s.numpy()])
    tt = np.stack([np_layer_norm(r) * m for r in t.numpy()])
    assert DF.skd_loss(s, t, T, m).item() == pytest.approx(np_kd(ss, tt, T), rel=1e-9)
    z = DF.spherical_logits(s, m)
    np.testing.assert_allclose(z.sum(1).numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.norm(dim=1).numpy(), m * math.sqrt(6), rtol=1e-6)


@SETTINGS
@given(shapes, st.floats(-5.0, 5.0), st.floats(0.2, 5.0))
def test_skd_invariant_to_logit_shift_and_scale(shape, shift, scale):
    seed, b, k = shape
    s, t = logits_pair(seed, b, k)
    # the projection itself is exactly invariant without the layer-norm eps ...
    torch.testing.assert_close(
        DF.spherical_logits(s * scale + shift, eps=0.0), DF.spherical_logits(s, eps=0.0), rtol=1e-9, atol=1e-9
    )
    # ... and the loss up to that eps (1e-7 added to the row variance), once no row is near-constant
    assume(float((s * min(scale, 1.0)).var(dim=1, unbiased=False).min()) > 1e-3)
    base = DF.skd_loss(s, t).item()
    assert DF.skd_loss(s * scale + shift, t).item() == pytest.approx(base, rel=1e-3, abs=1e-4)
    assert abs(DF.skd_loss(s, s * scale + shift).item()) < 1e-3
    assert base >= -1e-12


# ---------------------------------------------------------------------------- CTKD


def test_ctkd_lambda_schedule_values():
    # lambda_n = 0.5 * (1 + cos((1 + n/10) pi)) = (1 - cos(n pi / 10)) / 2, n = epoch + 1
    assert DF.ctkd_lambda(0) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)
    assert DF.ctkd_lambda(0) == pytest.approx(0.0244717, abs=1e-6)
    assert DF.ctkd_lambda(4) == pytest.approx(0.5)
    assert DF.ctkd_lambda(9) == pytest.approx(1.0)
    assert DF.ctkd_lambda(50) == pytest.approx(1.0)
    vals = [DF.ctkd_lambda(e) for e in range(12)]
    assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:]))
    assert DF.ctkd_lambda(4, lambda_max=3.0, lambda_min=1.0) == pytest.approx(2.0)
    assert DF.ctkd_lambda(1, curriculum_epochs=4) == pytest.approx(0.5)


def test_ctkd_temperature_range():
    assert DF.ctkd_temperature(torch.tensor(0.0)).item() == pytest.approx(11.0)
    assert DF.ctkd_temperature(torch.tensor(1.0)).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    assert DF.ctkd_temperature(torch.tensor(-50.0)).item() == pytest.approx(1.0, abs=1e-6)
    assert DF.ctkd_temperature(torch.tensor(50.0)).item() == pytest.approx(21.0, abs=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_gradient_reversal_flips_and_scales_the_temperature_gradient(lam):
    s, t = logits_pair(8, 5, 6)
    # plain descent direction: dL/dtheta without the GRL
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    DF.kd_loss(s, t, DF.ctkd_temperature(theta)).backward()
    plain = theta.grad.item()
    assert plain != 0.0
    theta2 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    s2 = s.clone().requires_grad_(True)
    loss = DF.kd_loss(s2, t, DF.ctkd_temperature(DF.grad_reverse(theta2, lam)))
    assert loss.item() == pytest.approx(DF.kd_loss(s, t, DF.ctkd_temperature(theta)).item())  # identity forward
    loss.backward()
    assert theta2.grad.item() == pytest.approx(-lam * plain, rel=1e-12, abs=1e-15)
    # the student's gradient is untouched by the GRL
    s3 = s.clone().requires_grad_(True)
    DF.kd_loss(s3, t, DF.ctkd_temperature(theta.detach())).backward()
    torch.testing.assert_close(s2.grad, s3.grad)


def test_gradient_reversal_is_an_autograd_function():
    assert issubclass(DF.GradientReversal, torch.autograd.Function)
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = DF.GradientReversal.apply(x, 2.0)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([3.0, 5.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-6.0, -10.0]))


# ---------------------------------------------------------------------------- FitNet


def test_fitnet_hint_against_loop():
    g = torch.Generator().manual_seed(9)
    r = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    u = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    total = 0.0
    for b in range(3):
        sq = 0.0
        for c in range(2):
            for h in range(2):
                for w in range(2):
                    sq += (float(u[b, c, h, w]) - float(r[b, c, h, w])) ** 2
        total += 0.5 * sq
    assert DF.fitnet_hint_loss(r, u).item() == pytest.approx(total / 3, rel=1e-12)
    # RepDistiller conversion: 100 * MSE(mean over B*N) == (200 / N) * L_HT
    n = 2 * 2 * 2
    assert (100 * F.mse_loss(r, u)).item() == pytest.approx(200 / n * DF.fitnet_hint_loss(r, u).item(), rel=1e-12)
    with pytest.raises(ValueError):
        DF.fitnet_hint_loss(r, u[:, :1])


# ---------------------------------------------------------------------------- AT


def np_attention(feat: np.ndarray, p: float) -> np.ndarray:
    b, c, h, w = feat.shape
    out = np.zeros((b, h * w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                out[i, y * w + x] = sum(abs(feat[i, ch, y, x]) ** p for ch in range(c))
    return out


def np_at_layer(fs: np.ndarray, ft: np.ndarray, p: float, beta: float) -> float:
    qs, qt = np_attention(fs, p), np_attention(ft, p)
    b, n = qs.shape
    tot = 0.0
    for i in range(b):
        d = qs[i] / math.sqrt((qs[i] ** 2).sum()) - qt[i] / math.sqrt((qt[i] ** 2).sum())
        tot += math.sqrt((d**2).sum())
    return beta / (2 * b * n) * tot


def test_attention_map_and_at_loss_against_loops():
    g = torch.Generator().manual_seed(10)
    fs1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ft1 = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    fs2 = torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)
    ft2 = torch.randn(2, 6, 2, 2, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(
        DF.attention_map(fs1, 2).reshape(2, -1).numpy(), np_attention(fs1.numpy(), 2), rtol=1e-12
    )
    maps_s = [DF.attention_map(fs1, 2), DF.attention_map(fs2, 2)]
    maps_t = [DF.attention_map(ft1, 2), DF.attention_map(ft2, 2)]
    want = np_at_layer(fs1.numpy(), ft1.numpy(), 2, 1000.0) + np_at_layer(fs2.numpy(), ft2.numpy(), 2, 1000.0)
    assert DF.at_loss(maps_s, maps_t, 1000.0).item() == pytest.approx(want, rel=1e-10)


def test_at_hand_example():
    # one sample, 1 channel, 1x2 map: student attention (1, 0), teacher (0, 1) -> ||(1,-1)|| = sqrt(2)
    fs = torch.tensor([[[[1.0, 0.0]]]])
    ft = torch.tensor([[[[0.0, 3.0]]]])
    got = DF.at_loss([DF.attention_map(fs)], [DF.attention_map(ft)], beta=1000.0).item()
    assert got == pytest.approx(1000.0 / (2 * 1 * 2) * math.sqrt(2), rel=1e-6)


@SETTINGS
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 4), st.floats(0.1, 10.0))
def test_at_zero_when_attention_agrees_and_nonnegative(seed, b, c, scale):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, c, 3, 3, generator=g, dtype=torch.float64)
    other = torch.randn(b, c + 1, 3, 3, generator=g, dtype=torch.float64)
    # attention is normalised, so rescaling a feature map leaves the loss at zero
    assert DF.at_loss([DF.attention_map(f)], [DF.attention_map(f * scale)]).item() < 1e-9
    assert DF.at_loss([DF.attention_map(f)], [DF.attention_map(other)]).item() >= 0.0


def test_at_gradient_finite_at_equality():
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = DF.at_loss([DF.attention_map(f)], [DF.attention_map(f.detach())])
    loss.backward()
    assert torch.isfinite(f.grad).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.5, 8.0))
def test_fused_kd_loss_equals_the_mean_of_per_sample_terms(seed: int, T: float) -> None:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3, torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    assert DF.kd_loss(s, t, T).item() == pytest.approx(DF.kd_per_sample(s, t, T).mean().item(), rel=1e-10, abs=1e-12)
