"""Dataset distillation through unrolled training (DD) and kernel ridge regression (KIP).

Every kernel is checked against numbers worked out without the code: the depth-1 NTK by hand
(arc-cosine formula), the FC NTK and the CNTK against Monte-Carlo empirical NTKs of very wide
finite networks written out here, the KRR loss against numpy's solve, DD's unrolled steps
against hand-computed softmax-regression gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.data.synthetic import SyntheticSet
from distill.functional import conv_ntk, fc_ntk, krr_loss, krr_predict, relu_kernels
from distill.synthesis.dd import dataset_distillation, init_params, train_distilled, unrolled_sgd
from distill.synthesis.kip import centered_one_hot, kip_conv, kip_fc, krr_accuracy
from distill.synthesis.registry import synthesizer_info

torch.set_num_threads(1)
D64 = torch.float64


# ---------------------------------------------------------------------------------------------
# empirical NTKs of finite networks in the NTK parameterisation, written out plainly
# ---------------------------------------------------------------------------------------------


def _empirical_ntk(f, params, xs):
    rows = []
    for x in xs:
        grads = torch.autograd.grad(f(x[None]).sum(), params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    j = torch.stack(rows)
    return j @ j.T


def _fc_empirical(xs, width, depth, wv, bv, seed):
    g = torch.Generator().manual_seed(seed)
    dims = [xs.shape[1]] + [width] * depth + [1]
    params = []
    for i in range(len(dims) - 1):
        params.append(torch.randn(dims[i + 1], dims[i], generator=g, dtype=D64, requires_grad=True))
        params.append(torch.randn(dims[i + 1], generator=g, dtype=D64, requires_grad=True))

    def f(x):
        h = x
        for i in range(len(dims) - 1):
            w, b = params[2 * i], params[2 * i + 1]
            h = h @ w.T * math.sqrt(wv / w.shape[1]) + math.sqrt(bv) * b
            if i < len(dims) - 2:
                h = torch.relu(h)
        return h

    return _empirical_ntk(f, params, xs)


def _cnn_empirical(xs, width, depth, wv, bv, pool, seed):
    g = torch.Generator().manual_seed(seed)
    params, cin, (hh, ww) = [], xs.shape[1], xs.shape[2:]
    for _ in range(depth):
        params += [torch.randn(width, cin, 3, 3, generator=g, dtype=D64, requires_grad=True),
                   torch.randn(width, generator=g, dtype=D64, requires_grad=True)]
        cin = width
        hh, ww = (hh // 2, ww // 2) if pool else (hh, ww)
    params += [torch.randn(1, cin * hh * ww, generator=g, dtype=D64, requires_grad=True),
               torch.randn(1, generator=g, dtype=D64, requires_grad=True)]

    def f(x):
        h = x
        for i in range(depth):
            w, b = params[2 * i], params[2 * i + 1]
            h = F.conv2d(h, w, padding=1) * math.sqrt(wv / (h.shape[1] * 9)) + math.sqrt(bv) * b[None, :, None, None]
            h = torch.relu(h)
            if pool:
                h = F.avg_pool2d(h, 2)
        h = h.flatten(1)
        return h @ params[-2].T * math.sqrt(wv / h.shape[1]) + math.sqrt(bv) * params[-1]

    return _empirical_ntk(f, params, xs)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


def test_fc_ntk_depth1_by_hand_two_2d_inputs():
    # x = (1, 0), x' = (1, 1); sigma_w^2 = 2, sigma_b^2 = 0.1, d = 2:
    # K1(x,x) = 2*1/2 + .1 = 1.1, K1(x',x') = 2*2/2 + .1 = 2.1, K1(x,x') = 2*1/2 + .1 = 1.1
    k11, k22, k12 = 1.1, 2.1, 1.1
    c = k12 / math.sqrt(k11 * k22)
    th = math.acos(c)
    relu = math.sqrt(k11 * k22) / (2 * math.pi) * (math.sin(th) + (math.pi - th) * math.cos(th))
    relu_dot = (math.pi - th) / (2 * math.pi)
    cross = 2 * relu + 0.1 + 2 * relu_dot * k12
    # on the diagonal theta = 0: E[relu(u)^2] = k/2 and E[relu'(u)^2] = 1/2
    diag_x = 2 * (k11 / 2) + 0.1 + 2 * 0.5 * k11  # = 2.3
    diag_y = 2 * (k22 / 2) + 0.1 + 2 * 0.5 * k22  # = 4.3
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D64)
    got = fc_ntk(x, depth=1, weight_var=2.0, bias_var=0.1)
    want = torch.tensor([[diag_x, cross], [cross, diag_y]], dtype=D64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert abs(diag_x - 2.3) < 1e-12
    # orthogonal unit inputs without bias: K1 = I, theta = pi/2 -> Theta = 2 * 1/(2 pi) = 1/pi
    e = torch.eye(2, dtype=D64)
    assert fc_ntk(e, depth=1, bias_var=0.0)[0, 1].item() == pytest.approx(1 / math.pi, rel=1e-12)
    # the NNGP at depth 1 is 2 * relu + 0.1 and the depth-0 NTK the linear kernel
    assert fc_ntk(x, depth=1, weight_var=2.0, bias_var=0.1, get="nngp")[0, 1].item() == pytest.approx(2 * relu + 0.1)
    assert fc_ntk(x, depth=0, weight_var=2.0, bias_var=0.1)[0, 1].item() == pytest.approx(1.1)
    # the cross form (x2 given) equals the symmetric one
    torch.testing.assert_close(fc_ntk(x, x, depth=1, weight_var=2.0, bias_var=0.1), want, rtol=1e-9, atol=1e-9)


def test_fc_ntk_matches_monte_carlo_wide_network():
    xs = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=D64)
    want = fc_ntk(xs, depth=2, weight_var=1.7, bias_var=0.3)
    emp = sum(_fc_empirical(xs, 2048, 2, 1.7, 0.3, s) for s in range(4)) / 4
    err = (emp - want).abs().max() / want.abs().max()
    assert err < 0.04, (err, want, emp)
    # a wrong variance is far off: the check has teeth
    assert (emp - fc_ntk(xs, depth=2, weight_var=2.0, bias_var=0.3)).abs().max() / want.abs().max() > 0.1


@pytest.mark.parametrize("shape,depth,pool", [((3, 1, 3, 3), 1, False), ((3, 2, 4, 4), 2, True),
                                              ((3, 1, 4, 6), 1, True)])
def test_cntk_matches_monte_carlo_wide_cnn(shape, depth, pool):
    xs = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=D64)
    want = conv_ntk(xs, depth=depth, weight_var=2.0, bias_var=0.1, pool=pool)
    emp = sum(_cnn_empirical(xs, 384, depth, 2.0, 0.1, pool, s) for s in range(4)) / 4
    err = (emp - want).abs().max() / want.abs().max()
    assert err < 0.05, (err, want, emp)
    # the FC kernel of the flattened images is a different kernel: the comparison can fail
    fc = fc_ntk(xs, depth=depth, weight_var=2.0, bias_var=0.1)
    assert (emp - fc).abs().max() / want.abs().max() > 0.1


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(0, 3), pool=st.booleans(), readout=st.sampled_from(["flatten", "gap"]))
def test_cntk_symmetric_psd_and_cross_consistent(seed, depth, pool, readout):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 2, 5, 5, generator=g, dtype=D64)
    k = conv_ntk(x, depth=depth, pool=pool, readout=readout, chunk=2)
    assert torch.equal(k, k.T)
    assert torch.linalg.eigvalsh(k).min() > -1e-9 * k.diagonal().max()
    torch.testing.assert_close(conv_ntk(x, x, depth=depth, pool=pool, readout=readout), k, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(conv_ntk(x[:2], x[2:], depth=depth, pool=pool, readout=readout), k[:2, 2:],
                               rtol=1e-9, atol=1e-12)


def test_cntk_depth0_is_the_linear_readout():
    x = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(3), dtype=D64)
    # flatten -> dense: sigma_w^2 * (1/(C H W)) sum over channels and pixels of x x' + sigma_b^2
    want = 1.5 * (x.flatten(1) @ x.flatten(1).T) / 18 + 0.2
    torch.testing.assert_close(conv_ntk(x, depth=0, weight_var=1.5, bias_var=0.2), want)


def test_relu_kernels_gradient_finite_on_identical_inputs():
    # a target identical to a support point sits on the cusp of the derivative kernel
    xs = torch.randn(4, 6, dtype=D64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    xt = torch.cat([xs.detach()[:2], torch.randn(3, 6, dtype=D64)])
    ys = centered_one_hot(torch.tensor([0, 1, 0, 1]), 2)
    yt = centered_one_hot(torch.tensor([0, 1, 1, 0, 1]), 2)
    loss = krr_loss(fc_ntk(xt, xs, depth=2), fc_ntk(xs, depth=2), ys, yt, reg=1e-3)
    (grad,) = torch.autograd.grad(loss, xs)
    assert torch.isfinite(grad).all() and grad.abs().max() < 10
    s, s_dot = relu_kernels(torch.tensor(2.0, dtype=D64), torch.tensor(2.0, dtype=D64), torch.tensor(2.0, dtype=D64))
    assert s.item() == pytest.approx(1.0, rel=1e-6) and s_dot.item() == pytest.approx(0.5, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# kernel ridge regression
# ---------------------------------------------------------------------------------------------


def test_krr_loss_matches_numpy_solve():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(6, 6))
    k_ss = a @ a.T + 0.1 * np.eye(6)
    k_ts = rng.normal(size=(9, 6))
    y_s = rng.normal(size=(6, 3))
    y_t = rng.normal(size=(9, 3))
    reg = 0.05
    lam = reg * np.trace(k_ss) / 6
    pred = k_ts @ np.linalg.solve(k_ss + lam * np.eye(6), y_s)
    t = lambda v: torch.tensor(v, dtype=D64)  # noqa: E731
    torch.testing.assert_close(krr_predict(t(k_ts), t(k_ss), t(y_s), reg), t(pred))
    assert krr_loss(t(k_ts), t(k_ss), t(y_s), t(y_t), reg).item() == pytest.approx(0.5 * np.mean((pred - y_t) ** 2))
    assert krr_loss(t(k_ts), t(k_ss), t(y_s), t(y_t), reg, reduction="sum").item() == \
        pytest.approx(0.5 * np.sum((pred - y_t) ** 2))
    with pytest.raises(ValueError, match="shapes"):
        krr_predict(t(k_ts), t(k_ss), t(y_s[:5]))


# ---------------------------------------------------------------------------------------------
# DD: unrolled steps
# ---------------------------------------------------------------------------------------------


def _softmax_regression_step(w, b, x, y, lr, k):
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = (p - np.eye(k)[y]) / x.shape[0]  # d mean-CE / d logits
    return w - lr * err.T @ x, b - lr * err.sum(0)


def test_unrolled_sgd_reproduces_hand_computed_sgd_on_a_linear_model():
    rng = np.random.default_rng(6)
    model = nn.Linear(3, 4).double()
    w0, b0 = rng.normal(size=(4, 3)), rng.normal(size=4)
    x1, y1 = rng.normal(size=(5, 3)), np.array([0, 1, 2, 3, 1])
    x2, y2 = rng.normal(size=(2, 3)), np.array([2, 0])
    t = lambda v: torch.tensor(v, dtype=D64)  # noqa: E731
    steps = [(t(x1), torch.tensor(y1), t(0.3)), (t(x2), torch.tensor(y2), t(0.7))]
    theta = unrolled_sgd(model, {"weight": t(w0), "bias": t(b0)}, steps)
    w1, b1 = _softmax_regression_step(w0, b0, x1, y1, 0.3, 4)
    w2, b2 = _softmax_regression_step(w1, b1, x2, y2, 0.7, 4)
    torch.testing.assert_close(theta["weight"], t(w2))
    torch.testing.assert_close(theta["bias"], t(b2))

    # the result is differentiable in the step size: d/d lr matches a central finite difference
    lr = t(0.3).requires_grad_(True)
    xr, yr = t(rng.normal(size=(6, 3))), torch.tensor([0, 1, 2, 3, 0, 1])

    def outer(lr_value):
        th = unrolled_sgd(model, {"weight": t(w0), "bias": t(b0)}, [(t(x1), torch.tensor(y1), lr_value)])
        return F.cross_entropy(xr @ th["weight"].T + th["bias"], yr)

    (g,) = torch.autograd.grad(outer(lr), lr)
    fd = (outer(t(0.3 + 1e-6)) - outer(t(0.3 - 1e-6))) / 2e-6
    assert g.item() == pytest.approx(fd.item(), rel=1e-5)


def _blobs(n_per_class=40, k=3, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(k, *shape, generator=g)
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = centres[y] + 0.7 * torch.randn(len(y), *shape, generator=g)
    return x, y


def test_dataset_distillation_lowers_its_objective_and_returns_a_set(tmp_path):
    x, y = _blobs()

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))

    s = dataset_distillation(x, y, ipc=2, num_classes=3, model=mlp, init="fixed", steps=2, distill_epochs=2,
                             distill_lr=0.05, epochs=40, batch_size=60, lr=0.05, decay_epochs=20, seed=3,
                             progress=False)
    assert isinstance(s, SyntheticSet) and s.images.shape == (6, 1, 4, 4)
    assert s.labels.tolist() == [0, 1, 2, 0, 1, 2]
    m = s.manifest
    assert m["method"] == "dataset_distillation" and len(m["step_lrs"]) == 4 and m["init_seed"] == 3
    assert m["loss_last"] < 0.5 * m["loss_first"], (m["loss_first"], m["loss_last"])
    # the paper's evaluation: replaying the learned steps from the fixed init fits the data
    net = train_distilled(mlp(), s)
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() > 0.9
    s.save(tmp_path / "dd")
    with pytest.raises(ValueError, match="steps must be a positive int dividing ipc"):
        dataset_distillation(x, y, ipc=3, num_classes=3, model=mlp, steps=2, progress=False)
    with pytest.raises(ValueError, match="init must be"):
        dataset_distillation(x, y, ipc=2, num_classes=3, model=mlp, init="known", progress=False)


def test_init_params_is_xavier_normal_with_zero_bias():
    net = nn.Linear(300, 200)
    p = init_params(net, torch.Generator().manual_seed(0))
    assert torch.equal(p["bias"], torch.zeros(200))
    assert p["weight"].std().item() == pytest.approx(math.sqrt(2 / 500), rel=0.02)


# ---------------------------------------------------------------------------------------------
# KIP
# ---------------------------------------------------------------------------------------------


def test_kip_fc_lowers_its_objective_with_label_learning():
    x, y = _blobs(n_per_class=30, k=3, shape=(1, 3, 3), seed=1)
    s = kip_fc(x, y, ipc=2, num_classes=3, iterations=30, lr=0.05, target_batch=45, reg=1e-3, learn_labels=True,
               depth=2, weight_var=1.5, bias_var=0.05, seed=4, progress=False)
    m = s.manifest
    assert isinstance(s, SyntheticSet) and s.images.shape == (6, 1, 3, 3) and s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert m["method"] == "kip_fc" and len(m["learned_targets"]) == 6
    moved = torch.tensor(m["learned_targets"], dtype=D64) - centered_one_hot(s.labels, 3)
    assert moved.abs().max() > 1e-3  # the labels were learned too
    first, last = np.mean(m["loss_history"][:3]), np.mean(m["loss_history"][-3:])
    assert last < 0.7 * first, (first, last)
    # the support was initialised from real images and has moved
    assert not torch.equal(s.images, x[torch.tensor(m["init_indices"])])
    kernel = lambda a, b: fc_ntk(a, b, depth=2, weight_var=1.5, bias_var=0.05)  # noqa: E731
    acc = krr_accuracy(kernel, s.images.double(), torch.tensor(m["learned_targets"], dtype=D64), x.double(), y, 1e-3)
    assert acc > 90


def test_kip_conv_lowers_its_objective():
    x, y = _blobs(n_per_class=12, k=2, shape=(1, 4, 4), seed=2)
    s = kip_conv(x, y, ipc=1, num_classes=2, iterations=12, lr=0.05, target_batch=12, depth=2, reg=1e-3,
                 bias_var=0.05, seed=5, progress=False)
    m = s.manifest
    assert m["method"] == "kip_conv" and s.images.shape == (2, 1, 4, 4)
    assert np.mean(m["loss_history"][-3:]) < 0.8 * np.mean(m["loss_history"][:3])


def test_kip_rejects_bad_arguments_before_work():
    x, y = _blobs(n_per_class=3, k=2)
    with pytest.raises(ValueError, match="fewer than ipc=4"):
        kip_fc(x, y, ipc=4, num_classes=2, progress=False)
    with pytest.raises(ValueError, match="depth must be"):
        kip_fc(x, y, ipc=1, num_classes=2, depth=-1, progress=False)
    with pytest.raises(ValueError, match="readout"):
        kip_conv(x, y, ipc=1, num_classes=2, readout="max", progress=False)


def test_registered_with_papers():
    assert synthesizer_info("dataset_distillation").paper.arxiv == "1811.10959"
    assert synthesizer_info("kip_fc").paper.arxiv == "2011.00050"
    info = synthesizer_info("kip_conv")
    assert info.paper.arxiv == "2107.13034" and info.family == "dataset"
    assert info.defaults["depth"] == 3 and synthesizer_info("kip_fc").defaults["lr"] == 0.01


def test_kip_targets_are_mean_centred_one_hot():
    want = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]], dtype=D64)
    torch.testing.assert_close(centered_one_hot(torch.tensor([0, 2]), 3), want)


def test_max_time_stops_early():
    x, y = _blobs(n_per_class=5, k=2, shape=(1, 2, 2))
    s = kip_fc(x, y, ipc=1, num_classes=2, iterations=10_000, target_batch=10, max_time_s=0.05, progress=False)
    assert 1 <= s.manifest["iterations_run"] < 10_000 and len(s.manifest["loss_history"]) <= 200
    mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # noqa: E731
    d = dataset_distillation(x, y, ipc=1, num_classes=2, model=mlp, epochs=10_000, batch_size=10, max_time_s=0.05,
                             progress=False)
    assert 1 <= d.manifest["iterations_run"] < 10_000
    with pytest.raises(ValueError, match="max_time_s"):
        kip_fc(x, y, ipc=1, num_classes=2, max_time_s=0, progress=False)
