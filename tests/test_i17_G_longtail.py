"""Issue 17 (G): SSD (Li, Wang, Wu, ICCV 2021, arXiv 2109.04075) and the long-tailed data helpers, against hand
numbers and plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from distill import functional as DF
from distill.data.longtail import long_tailed_counts, long_tailed_indices, shot_accuracy, shot_groups
from distill.models import create
from distill.strategies.longtail_ssd import TwoHeadClassifier, fit_ssd_longtail


def test_exponential_profile_by_hand():
    # n_c = n_max * exp(-c ln(100) / 9): 1000, 599.48, 359.38, 215.44, 129.15, 77.43, 46.42, 27.83, 16.68, 10
    assert long_tailed_counts(10, 1000, 100.0) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert long_tailed_counts(3, 50, 4.0) == [50, 25, 12]
    labels = torch.arange(3).repeat(60)
    idx = long_tailed_indices(labels, 50, 4.0)
    assert labels[idx].bincount().tolist() == [50, 25, 12] and len(idx.unique()) == len(idx)


def test_shot_groups_and_accuracy_by_hand():
    counts = [150, 101, 100, 20, 19]
    g = shot_groups(counts)
    assert g["many"].tolist() == [True, True, False, False, False]
    assert g["medium"].tolist() == [False, False, True, True, False] and g["few"].tolist() == [False] * 4 + [True]
    targets = torch.tensor([0, 0, 1, 2, 3, 4, 4, 4])
    pred = torch.tensor([0, 1, 1, 2, 0, 4, 0, 0])
    acc = shot_accuracy(pred, targets, counts)
    assert acc["overall"] == pytest.approx(100 * 4 / 8) and acc["many"] == pytest.approx(100 * 2 / 3)
    assert acc["medium"] == pytest.approx(50.0) and acc["few"] == pytest.approx(100 / 3)


def test_ssd_student_loss_is_hard_ce_plus_weighted_soft_kd():
    g = torch.Generator().manual_seed(0)
    h, s, t = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.tensor([1, 3, 0])
    T, w = 2.5, 0.6
    ce = sum(-(h[i, y[i]] - math.log(sum(math.exp(v) for v in h[i].tolist()))).item() for i in range(3)) / 3
    kd = 0.0
    for i in range(3):
        pt = torch.softmax(t[i] / T, 0).tolist()
        ps = torch.softmax(s[i] / T, 0).tolist()
        kd += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    ref = ce + w * T * T * kd / 3
    assert DF.ssd_student_loss(h, s, t, y, T=T, kd_weight=w).item() == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="one \\(B, K\\) shape"):
        DF.ssd_student_loss(h, s[:, :3], t, y)


def test_class_balanced_weights_make_each_class_equally_likely():
    y = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    w = DF.class_balanced_weights(y, 3)
    assert w.tolist() == pytest.approx([0.25] * 4 + [1.0, 0.5, 0.5])
    assert [float(w[y == c].sum()) for c in range(3)] == pytest.approx([1.0, 1.0, 1.0])


def test_ssd_runs_its_three_stages_and_returns_a_two_head_student():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 1, 8, 8, generator=g), torch.tensor([0] * 40 + [1] * 15 + [2] * 5)
    torch.manual_seed(0)
    student = create("cnn", num_classes=3, in_channels=1, widths=(4, 8))
    r = fit_ssd_longtail(student, (x, y), (x, y), epochs=1, batch_size=20, progress=False, finetune_epochs=1)
    assert [h["stage"] for h in r.history] == ["I", "II", "III", "finetune"]
    assert isinstance(r.model, TwoHeadClassifier) and r.model.model is student
    hard, soft = r.model.both(x[:4])
    assert hard.shape == soft.shape == (4, 3) and torch.equal(r.model(x[:4]), soft)
    assert not any(p.requires_grad for p in r.teacher.parameters())
    # a given (trained) teacher skips stage I and is not modified (its copy is re-headed)
    teacher = create("cnn", num_classes=3, in_channels=1, widths=(4, 8))
    fc = teacher.fc.weight.clone()
    r2 = fit_ssd_longtail(lambda: create("cnn", num_classes=3, in_channels=1, widths=(4, 8)), (x, y),
                          teacher=teacher, epochs=1, batch_size=20, progress=False)
    assert [h["stage"] for h in r2.history] == ["II", "III"] and torch.equal(teacher.fc.weight, fc)


def test_one_batch_objectives_of_the_three_stages(monkeypatch):
    """A spy on the strategy's SGD loop: on one batch, each stage's loss equals the objective written out here
    (NT-Xent, CE and KL by hand), in value and in gradient; stage II samples class-balanced."""
    import inspect

    import distill.strategies.longtail_ssd as mod

    real = mod.sgd_epochs
    seen = []

    def lsm(z, T=1.0):
        z = z / T
        return z - z.exp().sum(1, keepdim=True).log()

    def spy(params, loss_fn, x, y, **kw):
        env = inspect.getclosurevars(loss_fn).nonlocals
        xb, yb = x[:6], y[:6]
        what = kw["what"]
        if what == "SSD stage I":
            g0 = env["g"].get_state()
            got = loss_fn(xb, yb)
            env["g"].set_state(g0)  # the same two views again
            v = torch.cat([env["views"](xb, env["g"]), env["views"](xb, env["g"])])
            teacher, proj, tap = env["teacher"], env["proj"], env["feature_tap"]
            with env["taps"].recording() as store:
                z = teacher(v)
            f = torch.nn.functional.normalize(proj(store[tap].flatten(1)), dim=1)
            sim = f @ f.t() / env["ssl_tau"]
            sim = sim.masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
            partner = torch.cat([torch.arange(6, 12), torch.arange(6)])
            nt = -(sim[torch.arange(12), partner] - sim.logsumexp(1)).mean()
            ref = -lsm(z)[torch.arange(12), yb.repeat(2)].mean() + env["ssl_weight"] * nt
        elif what == "SSD stage II":
            assert torch.allclose(kw["sample_weights"], 1.0 / y.bincount()[y].float())
            fc = env["fc"]
            got, ref = loss_fn(xb, yb), -lsm(fc(xb))[torch.arange(6), yb].mean()
        else:
            two, teacher, T, w = env["two"], env["teacher"], env["T"], env["kd_weight"]
            got = loss_fn(xb, yb)
            hard, soft = two.both(xb)
            with torch.no_grad():
                lt = lsm(teacher(xb), T)
            ref = -lsm(hard)[torch.arange(6), yb].mean() + w * T * T * (lt.exp() * (lt - lsm(soft, T))).sum(1).mean()
        g_ref = torch.autograd.grad(ref, params, allow_unused=True)
        g_got = torch.autograd.grad(got, params, allow_unused=True)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5), what
        for a, b in zip(g_got, g_ref):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6)), what
        seen.append(what)
        return real(params, loss_fn, x, y, **kw)

    monkeypatch.setattr(mod, "sgd_epochs", spy)
    torch.manual_seed(0)
    x, y = torch.rand(18, 1, 8, 8), torch.tensor([0] * 10 + [1] * 6 + [2] * 2)
    fit_ssd_longtail(lambda: create("cnn", num_classes=3, in_channels=1, widths=(4, 8)), (x, y), epochs=1,
                     batch_size=18, progress=False, ssl_weight=0.6, ssl_tau=0.3, T=2.5, kd_weight=0.4)
    assert seen == ["SSD stage I", "SSD stage II", "SSD stage III"]
