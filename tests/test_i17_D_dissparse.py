"""DDSL (Liu et al., "Learning to Explore Distillability and Sparsability", TPAMI 2023): the ADMM projection and
penalty on hand numbers, the dean's meta-gradient against autograd through a virtual step, and the strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.data import InMemoryLoader
from distill.functional import (
    dissparse_admm_penalty,
    dissparse_admm_update,
    dissparse_balance_gradient,
    dissparse_dean_gradient,
    dissparse_keep_topk,
)
from distill.models import create
from distill.strategies.dissparse import channel_gates, fit_dissparse, keep_counts

torch.set_num_threads(1)


def test_keep_topk_by_hand():
    v = torch.tensor([0.5, -3.0, 2.0, 0.1])
    assert torch.equal(dissparse_keep_topk(v, 2), torch.tensor([0.0, -3.0, 2.0, 0.0]))
    # rows' norms 5, sqrt(2), 5, 6: k = 2 keeps row 3 and row 0 (the tie with row 2 goes to the lower index)
    rows = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 5.0], [6.0, 0.0]])
    assert torch.equal(dissparse_keep_topk(rows, 2), torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [6.0, 0.0]]))
    assert torch.equal(dissparse_keep_topk(rows, 0), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="k must be"):
        dissparse_keep_topk(v, 5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=7), st.integers(0, 7))
def test_keep_topk_is_the_best_k_sparse_approximation(values, k):
    v = torch.tensor(values)
    k = min(k, len(values))
    z = dissparse_keep_topk(v, k)
    assert int((z != 0).sum()) <= k
    assert torch.equal(dissparse_keep_topk(z, k), z)  # a projection: idempotent
    # no other choice of k entries is closer to v: the distance is the energy of the dropped entries
    dropped = sorted((x * x for x in values))[:len(values) - k]
    assert float((v - z).pow(2).sum()) == pytest.approx(sum(dropped), rel=1e-5, abs=1e-6)


def test_admm_penalty_by_hand():
    g = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[0.0, 3.0]], requires_grad=True)]
    z = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.0]])]
    u = [torch.tensor([0.5, -0.5]), torch.tensor([[1.0, -1.0]])]
    # residuals: (0.5, 1.5) and (1, 2): 0.25 + 2.25 + 1 + 4 = 7.5; rho / 2 = 1.5 -> 11.25
    out = dissparse_admm_penalty(g, z, u, rho=3.0)
    assert out.item() == pytest.approx(11.25)
    out.backward()
    # gradient rho * residual, only to gamma
    assert torch.allclose(g[0].grad, torch.tensor([1.5, 4.5]))
    assert torch.allclose(g[1].grad, torch.tensor([[3.0, 6.0]]))


def test_admm_update_by_hand():
    gammas = [torch.tensor([0.5, 0.2, 0.6]), torch.tensor([[0.1, 0.0], [2.0, 1.0]])]
    u = [torch.tensor([0.0, 0.5, -0.5]), torch.tensor([[0.3, 0.4], [0.0, 0.0]])]
    z, u2 = dissparse_admm_update(gammas, u, [1, 1])
    # layer 1: gamma + U = (0.5, 0.7, 0.1) -> Z keeps the 0.7 (gamma alone would keep its 0.6): (0, 0.7, 0);
    # U' = U + gamma - Z = (0.5, 0, 0.1)
    assert torch.allclose(z[0], torch.tensor([0.0, 0.7, 0.0]))
    assert torch.allclose(u2[0], torch.tensor([0.5, 0.0, 0.1]))
    # layer 2: rows (0.4, 0.4), (2, 1): keep row 1; U' = ((0.4, 0.4), (0, 0))
    assert torch.allclose(z[1], torch.tensor([[0.0, 0.0], [2.0, 1.0]]))
    assert torch.allclose(u2[1], torch.tensor([[0.4, 0.4], [0.0, 0.0]]))


def test_dean_gradient_equals_autograd_through_the_virtual_step():
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    b = torch.randn(3)
    x, y = torch.randn(5, 4), torch.randint(3, (5,))
    xm, ym = torch.randn(6, 4), torch.randint(3, (6,))
    t = torch.randn(5, 3)
    params = [w.clone().requires_grad_(), b.clone().requires_grad_()]

    def terms(p):
        s = x @ p[0].T + p[1]
        return {"ce": F.cross_entropy(s, y), "kd": F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1),
                                                             reduction="batchmean") * 4,
                "sp": 0.5 * p[1].pow(2).sum()}

    grads = {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for k, v in terms(params).items()}
    assert grads["sp"][0] is None  # the sparsity term does not reach w

    def g(name, i):
        return torch.zeros_like(params[i]) if grads[name][i] is None else grads[name][i]

    lr, ce = 0.3, 1.0
    lam = {"kd": torch.tensor(0.7, requires_grad=True), "sp": torch.tensor(2.0, requires_grad=True)}
    virtual = [p.detach() - lr * (ce * g("ce", i) + lam["kd"] * g("kd", i) + lam["sp"] * g("sp", i))
               for i, p in enumerate(params)]
    meta = F.cross_entropy(xm @ virtual[0].T + virtual[1], ym)
    want = torch.autograd.grad(meta, [lam["kd"], lam["sp"]])
    leaf = [v.detach().requires_grad_() for v in virtual]
    meta_grads = torch.autograd.grad(F.cross_entropy(xm @ leaf[0].T + leaf[1], ym), leaf)
    got = dissparse_dean_gradient(meta_grads, {"kd": grads["kd"], "sp": grads["sp"]}, lr)
    assert got["kd"].item() == pytest.approx(want[0].item(), rel=1e-5)
    assert got["sp"].item() == pytest.approx(want[1].item(), rel=1e-5)


def test_balance_gradient_equals_autograd_through_the_softmax():
    a = torch.tensor([0.3, -1.2, 0.5], requires_grad=True)
    d = torch.tensor([0.7, -0.4, 2.0])
    w = 2.5 * torch.softmax(a, 0)
    (w * d).sum().backward()  # L linear in w with slope d: dL/da by autograd
    torch.testing.assert_close(dissparse_balance_gradient(a.detach(), d, 2.5), a.grad)
    # by hand for two terms: s = softmax(0, 0) = (0.5, 0.5); total 2: 2 * 0.5 * (d - 0.5 (d1 + d2))
    got = dissparse_balance_gradient(torch.zeros(2), torch.tensor([1.0, 3.0]), 2.0)
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0]))


def _data(n: int = 48):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long() + 2 * (x[:, 0, :4].mean((1, 2)) > 0.5).long()
    return InMemoryLoader(x, y, 16, shuffle=True, seed=0)


def test_strategy_prunes_to_the_kept_channels_and_the_dean_moves_the_weights():
    torch.manual_seed(0)
    teacher = create("cnn", num_classes=4, widths=(8, 8, 8), stem_width=8)
    student = create("cnn", num_classes=4, widths=(8, 8, 6), stem_width=4)
    gates = channel_gates(student)
    assert keep_counts(gates, 0.3) == [1, 2, 2, 2]  # max(1, round(0.3 * C)): C = 4, 8, 8, 6
    res = fit_dissparse(student, _data(), _data(), teacher=teacher, epochs=2, keep=0.3, sp=0.7, kd=0.4,
                        dean_lr=50.0, progress=False, lr=0.05, finetune_epochs=1)
    assert res.remaining_channels == 7 and res.total_channels == 26
    for name, mask in res.masks.items():
        bn = res.student.get_submodule(name)
        assert torch.equal(bn.weight.detach() == 0, ~mask) and torch.equal(bn.bias.detach()[~mask], torch.zeros(int((~mask).sum())))
    assert len(res.lambdas) == 2 and res.lambdas[-1] != {"ce": 1.0, "kd": 0.4, "sp": 0.7}
    assert res.lambdas[-1]["ce"] + res.lambdas[-1]["kd"] == pytest.approx(1.4)  # the balance keeps the sum
    assert 0.07 <= res.lambdas[-1]["sp"] <= 7.0
    assert res.history[-1]["phase"] == "finetune" and res.last_acc is not None
    fixed = fit_dissparse(create("cnn", num_classes=4, widths=(8, 8, 6), stem_width=4), _data(), None, teacher=teacher,
                          epochs=1, keep=0.5, kd=0.0, dean=False, progress=False, lr=0.05)
    assert fixed.lambdas == [{"ce": 1.0, "kd": 0.0, "sp": 0.5}] and fixed.last_acc is None


def test_strategy_errors():
    teacher = create("cnn", num_classes=4, widths=(4, 4, 4), stem_width=4)
    with pytest.raises(ValueError, match="BatchNorm"):
        fit_dissparse(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), _data(), None, teacher=teacher, epochs=1,
                      progress=False)
    with pytest.raises(ValueError, match="keep"):
        fit_dissparse(create("cnn", num_classes=4, widths=(4, 4, 4)), _data(), None, teacher=teacher, epochs=1,
                      keep=0.0, progress=False)


def test_one_step_without_the_dean_is_sgd_on_the_written_out_objective(monkeypatch):
    """One batch, dean off: the student's step is plain SGD on ce·CE + kd·T²KL + sp·½Σ‖γ − Z + U‖², with
    Z = the top-k channel groups of the initial (scale, shift) and U = 0."""
    from distill.functional import kd_loss

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(4, (16,), generator=g)
    teacher = create("cnn", num_classes=4, widths=(4, 4, 4), stem_width=4)
    student = create("cnn", num_classes=4, widths=(6, 4, 4), stem_width=4)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ref = __import__("copy").deepcopy(student)
    import distill.strategies.dissparse as mod

    before_cut: dict[str, torch.Tensor] = {}  # the gates as the step left them, before the final cut
    real_mask = mod.prune.custom_from_mask

    class _Prune:
        remove = staticmethod(mod.prune.remove)

        @staticmethod
        def custom_from_mask(module, name, mask):
            before_cut[f"{id(module)}.{name}"] = getattr(module, name).detach().clone()
            return real_mask(module, name, mask)

    monkeypatch.setattr(mod, "prune", _Prune)
    res = fit_dissparse(student, InMemoryLoader(x, y, 16), None, teacher=teacher, epochs=1, keep=0.5, ce=0.7, kd=0.3,
                        sp=2.0, T=3.0, dean=False, progress=False, lr=0.1, momentum=0.0, weight_decay=0.0,
                        schedule="constant")
    # the reference step, written out
    teacher.eval()
    s = ref(x)
    with torch.no_grad():
        t = teacher(x)
    pen = 0.0
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            grp = torch.stack([m.weight, m.bias], 1)
            k = max(1, round(0.5 * m.num_features))
            keep = grp.detach().pow(2).sum(1).argsort(descending=True, stable=True)[:k]
            z = torch.zeros_like(grp)
            z[keep] = grp.detach()[keep]
            pen = pen + 0.5 * (grp - z).pow(2).sum()
    loss = 0.7 * F.cross_entropy(s, y) + 0.3 * kd_loss(s, t, 3.0) + 2.0 * pen
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    # every parameter after the step; the gates as they were before the final cut, which then zeroes the
    # channels outside the masks
    for (name, p_new), p_old, gr in zip(res.student.named_parameters(), ref.parameters(), grads):
        want = p_old.detach() - 0.1 * gr
        module, attr = name.rsplit(".", 1)
        if module in res.masks:
            bn = res.student.get_submodule(module)
            torch.testing.assert_close(before_cut[f"{id(bn)}.{attr}"], want, atol=1e-6, rtol=1e-5)
            want = torch.where(res.masks[module], want, torch.zeros_like(want))
        torch.testing.assert_close(p_new.detach(), want, atol=1e-6, rtol=1e-5)
