"""VID and factor transfer (FT, with its paraphraser pre-training).

The losses against independent computations (numpy, explicit loops), their properties, the
methods on synthetic views (gradients reach the student, the regressors, variances and the
translator, never the teacher nor the frozen paraphraser), the paraphraser's pre-training and
both methods end to end through the Distiller and ``fit``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import distill
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.methods import FT, VID, FTParaphraser, create_method, method_info
from distill.models import create
from _views import cnn_views

SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 10_000)


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------- numpy references


def np_softplus(a: np.ndarray) -> np.ndarray:
    return np.array([math.log1p(math.exp(x)) for x in a])


def np_vid(mu: np.ndarray, t: np.ndarray, var: np.ndarray) -> float:
    """Gaussian NLL without its constant: sum over c,h,w, mean over the batch, by loops."""
    b, c = mu.shape[:2]
    total = 0.0
    for n in range(b):
        for k in range(c):
            sigma = math.sqrt(var[k])
            for idx in np.ndindex(*mu.shape[2:]):
                d = t[(n, k, *idx)] - mu[(n, k, *idx)]
                total += math.log(sigma) + d * d / (2 * var[k])
    return total / b


def np_gauss_logpdf(x: float, m: float, var: float) -> float:
    return -0.5 * math.log(2 * math.pi * var) - (x - m) ** 2 / (2 * var)


def np_ft(fs: np.ndarray, ft: np.ndarray, p: float) -> float:
    total = 0.0
    for n in range(fs.shape[0]):
        a, b = ft[n].ravel(), fs[n].ravel()
        a = a / math.sqrt(float(np.dot(a, a)))
        b = b / math.sqrt(float(np.dot(b, b)))
        total += sum(abs(x - y) ** p for x, y in zip(a, b)) ** (1.0 / p)
    return total / fs.shape[0]


# ---------------------------------------------------------------------------- registry


def test_registered_with_paper_family_and_defaults():
    expected = {
        "vid": ("1904.05835", 2019, "CVPR", {"pairs": (("stage1", "stage1"), ("stage2", "stage2"),
                                                      ("stage3", "stage3")),
                                            "init_pred_var": 5.0, "eps": 1e-5, "reduction": "sum", "weight": 1.0}),
        "ft": ("1802.04977", 2018, "NeurIPS", {"student_tap": "stage3", "teacher_tap": "stage3", "factor_rate": 0.5,
                                              "p": 1.0, "reduction": "mean", "weight": 500.0}),
        "ft_paraphraser": ("1802.04977", 2018, "NeurIPS", {"teacher_tap": "stage3", "factor_rate": 0.5,
                                                          "reduction": "sum", "weight": 1.0}),
    }
    for name, (arxiv, year, venue, defaults) in expected.items():
        info = method_info(name)
        assert info.family == "features" and info.cls.name == name
        assert info.paper.arxiv == arxiv and info.paper.year == year and info.paper.venue == venue
        assert info.paper.title and info.paper.authors and info.summary
        assert info.defaults["warmup_epochs"] == 0
        for key, value in defaults.items():
            assert info.defaults[key] == value, (name, key)
        assert info.cls.needs_teacher and info.cls.requires_prepare


# ---------------------------------------------------------------------------- VID math


def test_vid_nll_matches_loops_and_the_gaussian_log_density():
    mu, t = rand(1, 3, 4, 2, 3), rand(2, 3, 4, 2, 3, scale=2.0)
    var = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    want = np_vid(mu.numpy(), t.numpy(), var.numpy())
    assert DF.vid_nll(mu, t, var).item() == pytest.approx(want, rel=1e-10)
    # = -(1/B) sum log N(t; mu, sigma^2) minus the constant (1/2) log(2 pi) per element
    logpdf = sum(np_gauss_logpdf(t[n, c, h, w].item(), mu[n, c, h, w].item(), var[c].item())
                 for n in range(3) for c in range(4) for h in range(2) for w in range(3))
    assert want == pytest.approx(-logpdf / 3 - 0.5 * math.log(2 * math.pi) * 4 * 2 * 3, rel=1e-10)
    # RepDistiller's reduction: the mean over all B*C*H*W elements
    assert DF.vid_nll(mu, t, var, "mean").item() == pytest.approx(want / (4 * 2 * 3), rel=1e-10)
    # vectors (B, C) and several pairs
    m2, t2, v2 = rand(3, 3, 5), rand(4, 3, 5), torch.linspace(0.1, 3.0, 5, dtype=torch.float64)
    want2 = np_vid(m2.numpy(), t2.numpy(), v2.numpy())
    assert DF.vid_nll(m2, t2, v2).item() == pytest.approx(want2, rel=1e-10)
    assert DF.vid_loss([mu, m2], [t, t2], [var, v2]).item() == pytest.approx(want + want2, rel=1e-10)


def test_vid_variance_is_positive_softplus_and_init_inverts_it():
    alpha = torch.tensor([-50.0, -3.0, 0.0, 2.0, 40.0], dtype=torch.float64)
    var = DF.vid_variance(alpha, 1e-5)
    assert (var > 0).all() and var.min().item() >= 1e-5
    np.testing.assert_allclose(var[1:4].numpy(), np_softplus(alpha[1:4].numpy()) + 1e-5, rtol=1e-12)
    for v in (5.0, 0.01, 100.0):
        a = DF.vid_alpha_for_variance(v, 1e-5)
        assert a == pytest.approx(math.log(math.exp(v - 1e-5) - 1.0), rel=1e-10)
        assert DF.vid_variance(torch.tensor([a], dtype=torch.float64), 1e-5).item() == pytest.approx(v, rel=1e-12)
    with pytest.raises(ValueError):
        DF.vid_alpha_for_variance(1e-6, 1e-5)


@SETTINGS
@given(seeds, st.integers(1, 4), st.integers(1, 4))
def test_vid_nll_minimised_over_variance_by_the_mean_squared_error(seed, b, c):
    # d/dσ² [ ½ log σ² + r/(2σ²) ] = 0 at σ² = r: per channel, the optimum is the channel's MSE
    mu, t = rand(seed, b, c, 2, 2), rand(seed + 1, b, c, 2, 2)
    mse = (t - mu).pow(2).mean(dim=(0, 2, 3))
    best = DF.vid_nll(mu, t, mse).item()
    for f in (0.5, 0.9, 1.1, 2.0):
        assert DF.vid_nll(mu, t, mse * f).item() >= best - 1e-9
    assert DF.vid_nll(t, t.clone(), torch.ones(c, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)


def test_vid_nll_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        DF.vid_nll(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 4, 4), torch.ones(3))
    with pytest.raises(ValueError, match="variance"):
        DF.vid_nll(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        DF.vid_nll(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3), "batchmean")


# ---------------------------------------------------------------------------- FT math


def test_ft_factor_loss_matches_loops():
    fs, ft = rand(5, 3, 2, 2, 3), rand(6, 3, 2, 2, 3)
    for p in (1.0, 2.0, 3.0):
        assert DF.ft_factor_loss(fs, ft, p).item() == pytest.approx(np_ft(fs.numpy(), ft.numpy(), p), rel=1e-10)
    assert DF.ft_factor_loss(fs, ft).item() == pytest.approx(np_ft(fs.numpy(), ft.numpy(), 1.0), rel=1e-10)


def test_ft_factor_loss_mean_reduction_is_the_authors_l1loss():
    fs, ft = rand(9, 3, 2, 2, 3), rand(10, 3, 2, 2, 3)
    # the authors' code: nn.L1Loss() on F.normalize(x.view(B, -1)), written out element by element
    a, b = fs.numpy().reshape(3, -1), ft.numpy().reshape(3, -1)
    total = 0.0
    for n in range(3):
        u = a[n] / math.sqrt(float(np.dot(a[n], a[n])))
        v = b[n] / math.sqrt(float(np.dot(b[n], b[n])))
        total += sum(abs(x - y) for x, y in zip(u, v))
    assert DF.ft_factor_loss(fs, ft, 1.0, "mean").item() == pytest.approx(total / a.size, rel=1e-10)
    d = a.shape[1]
    for p in (2.0, 3.0):  # the p-norm of the per-element mean: the "sum" value / D^(1/p)
        want = np_ft(fs.numpy(), ft.numpy(), p) / d ** (1.0 / p)
        assert DF.ft_factor_loss(fs, ft, p, "mean").item() == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="reduction"):
        DF.ft_factor_loss(fs, ft, 1.0, "none")


def test_ft_factor_loss_differs_from_repdistillers_attention_style_factor():
    fs, ft = rand(7, 4, 3, 2, 2), rand(8, 4, 3, 2, 2)

    def ref_factor(f):  # RepDistiller: channel-mean of squares, L2-normalised spatial map
        return torch.nn.functional.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    ref = (ref_factor(fs) - ref_factor(ft)).abs().mean().item()
    ours = DF.ft_factor_loss(fs, ft).item()
    assert ref != pytest.approx(ours, rel=1e-3)


@SETTINGS
@given(seeds, st.integers(1, 4), st.floats(0.1, 10.0))
def test_ft_factor_loss_zero_at_agreement_bounded_and_scale_invariant(seed, b, a):
    fs, ft = rand(seed, b, 3, 2, 2), rand(seed + 1, b, 3, 2, 2)
    assert DF.ft_factor_loss(ft, ft.clone()).item() == pytest.approx(0.0, abs=1e-12)
    loss = DF.ft_factor_loss(fs, ft).item()
    # unit vectors in R^n: the L1 distance is at most 2 sqrt(n)... and the L2 distance at most 2
    assert 0.0 <= loss <= 2.0 * math.sqrt(12) + 1e-9
    assert DF.ft_factor_loss(fs, ft, 2.0).item() <= 2.0 + 1e-9
    assert DF.ft_factor_loss(fs * a, ft).item() == pytest.approx(loss, rel=1e-9)


def test_ft_reconstruction_loss_matches_loops():
    x, r = rand(9, 2, 3, 2, 2), rand(10, 2, 3, 2, 2)
    want = sum((x[n, c, h, w].item() - r[n, c, h, w].item()) ** 2
               for n in range(2) for c in range(3) for h in range(2) for w in range(2)) / 2
    assert DF.ft_reconstruction_loss(r, x).item() == pytest.approx(want, rel=1e-10)
    assert DF.ft_reconstruction_loss(r, x, "mean").item() == pytest.approx(
        torch.nn.functional.mse_loss(r, x).item(), rel=1e-10)
    assert DF.ft_reconstruction_loss(r, x, "mean").item() == pytest.approx(want / 12, rel=1e-10)


# ---------------------------------------------------------------------------- methods on synthetic views

B = 4


def make_views(seed: int = 0):
    return cnn_views(B, seed)


def test_vid_forward_equals_functional_and_gradients_reach_regressors_and_variances():
    student, teacher, batch = make_views()
    m = create_method("vid")
    with pytest.raises(RuntimeError, match="prepare"):
        m(student, teacher, batch)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    assert sorted(m.regressors) == ["stage1__stage1", "stage2__stage2", "stage3__stage3"]
    conv = m.regressors["stage2__stage2"][0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.in_channels == 6
    assert conv.out_channels == 12 and conv.bias is None  # hidden width = teacher channels (RepDistiller)
    for v in m.variances().values():
        assert v.shape == (v.numel(),) and torch.allclose(v, torch.full_like(v, 5.0))
    loss = m(student, teacher, batch)
    want = DF.vid_loss(
        [m.regressors[f"{k}__{k}"](student[k]) for k in ("stage1", "stage2", "stage3")],
        [teacher[k].detach() for k in ("stage1", "stage2", "stage3")],
        [DF.vid_variance(m.alphas[f"{k}__{k}"], 1e-5) for k in ("stage1", "stage2", "stage3")],
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    for k in ("stage1", "stage2", "stage3"):
        assert student[k].grad is not None and student[k].grad.abs().sum() > 0
    for key, t in teacher.items():
        assert t.grad is None, key
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert set(m.log_values()) == {"var_stage1__stage1", "var_stage2__stage2", "var_stage3__stage3"}
    # prepare is idempotent: the same parameters
    ids = [id(p) for p in m.parameters()]
    m.prepare(student, teacher, batch)
    assert [id(p) for p in m.parameters()] == ids


def test_vid_learns_the_variance_of_a_residual_it_cannot_explain():
    torch.manual_seed(0)
    s = torch.randn(64, 3, 2, 2)
    t = torch.cat([s[:, :1] * 2.0, torch.randn(64, 1, 2, 2) * 3.0], dim=1)  # channel 1: pure noise, var 9
    m = VID(pairs=[("x", "x")], reduction="mean", mid_channels=16)
    m.prepare({"x": s}, {"x": t}, None)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        m({"x": s}, {"x": t}, None).backward()
        opt.step()
    var = m.variances()["x__x"].detach()
    assert var[0] < 0.5 and 5.0 < var[1] < 13.0  # predictable channel: small; noise channel: ~ its variance


def test_vid_pools_the_larger_map_handles_vectors_and_names_both_taps():
    student, teacher, batch = make_views()
    m = VID(pairs=[("stage1", "stage2"), ("pool", "pool")])
    m.prepare(student, teacher, batch)
    assert isinstance(m.regressors["pool__pool"][0], torch.nn.Linear)
    pooled = torch.nn.functional.avg_pool2d(student["stage1"], 2)
    want = DF.vid_loss([m.regressors["stage1__stage2"](pooled), m.regressors["pool__pool"](student["pool"])],
                       [teacher["stage2"], teacher["pool"]],
                       [DF.vid_variance(m.alphas["stage1__stage2"]), DF.vid_variance(m.alphas["pool__pool"])])
    assert m(student, teacher, batch).item() == pytest.approx(want.item(), rel=1e-6)
    teacher["odd"] = torch.randn(B, 3, 3, 3)
    with pytest.raises(ShapeMismatchError, match="student:stage1.*teacher:odd"):
        VID(pairs=[("stage1", "odd")]).prepare(student, teacher, batch)
    with pytest.raises(ShapeMismatchError, match="student:pool"):
        VID(pairs=[("pool", "stage3")]).prepare(student, teacher, batch)
    with pytest.raises(ValueError):
        VID(pairs=[])
    with pytest.raises(ValueError, match="reduction"):
        VID(reduction="none")


def test_ft_forward_equals_functional_and_never_trains_the_paraphraser():
    student, teacher, batch = make_views(1)
    ft = create_method("ft")
    assert ft.weight == 500.0 and ft.reduction == "mean"  # the authors' BETA and nn.L1Loss
    with pytest.raises(RuntimeError, match="prepare"):
        ft(student, teacher, batch)
    with torch.no_grad():
        ft.prepare(student, teacher, batch)
    assert ft.paraphraser.factor_channels == 8 and ft.paraphraser.channels == 16  # k = 0.5 of 16
    assert all(not p.requires_grad for p in ft.paraphraser.parameters())
    ft.freeze_paraphraser(False)  # even if a user unfroze it, the transfer loss sends it no gradient
    loss = ft(student, teacher, batch)
    fs = ft.translator(student["stage3"])
    with torch.no_grad():
        ftt = ft.paraphraser.encoder(teacher["stage3"])
    assert fs.shape == ftt.shape == (B, 8, 2, 2)
    assert loss.item() == pytest.approx(DF.ft_factor_loss(fs, ftt, 1.0, "mean").item(), rel=1e-6)
    ft.reduction = "sum"  # the paper's per-sample norm: D = 8*2*2 times the element mean
    assert ft(student, teacher, batch).item() == pytest.approx(32 * loss.item(), rel=1e-5)
    ft.reduction = "mean"
    with pytest.raises(ValueError, match="reduction"):
        FT(reduction="none")
    loss.backward()
    assert student["stage3"].grad is not None and student["stage3"].grad.abs().sum() > 0
    for key, t in teacher.items():
        assert t.grad is None, key
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ft.translator.parameters())
    ft.on_epoch_start(0, 1)
    assert all(not p.requires_grad for p in ft.paraphraser.parameters())


def test_ft_paraphraser_loss_shares_the_module_and_pretraining_reduces_reconstruction():
    torch.manual_seed(0)
    _, teacher, batch = make_views(2)
    feats = {"stage3": torch.relu(teacher["stage3"].detach())}  # fixed teacher features
    ft = FT()
    pre = ft.paraphraser_loss()
    assert isinstance(pre, FTParaphraser) and pre.ft is ft and pre.student_taps == []
    with torch.no_grad():
        pre.prepare({}, feats, batch)
    assert pre.paraphraser is ft.paraphraser
    assert all(p.requires_grad for p in ft.paraphraser.parameters())
    assert not any(n.startswith("_ft") or n.startswith("translator") for n, _ in pre.named_parameters())
    _, rec = ft.paraphraser(feats["stage3"])
    assert pre({}, feats, batch).item() == pytest.approx(
        DF.ft_reconstruction_loss(rec, feats["stage3"]).item(), rel=1e-6)
    opt = torch.optim.Adam(pre.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = pre({}, feats, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and min(losses[-5:]) < min(losses[:5])
    # the FT built afterwards reuses the pre-trained paraphraser (prepare is idempotent for it)
    student, _, _ = make_views(3)
    before = {k: v.clone() for k, v in ft.paraphraser.state_dict().items()}
    ft.prepare(student, feats, batch)
    assert all(torch.equal(before[k], v) for k, v in ft.paraphraser.state_dict().items())
    assert all(not p.requires_grad for p in ft.paraphraser.parameters())
    # a standalone ft_paraphraser owns a fresh FT
    alone = create_method("ft_paraphraser")
    assert isinstance(alone.ft, FT) and alone.ft.paraphraser is None
    with pytest.raises(ValueError, match="disagree"):
        FTParaphraser(teacher_tap="stage2", ft=ft)


def test_ft_shape_errors_name_the_taps():
    student, teacher, batch = make_views()
    with pytest.raises(ShapeMismatchError, match="student:pool"):
        FT(student_tap="pool").prepare(student, teacher, batch)
    teacher["odd"] = torch.randn(B, 4, 3, 3)
    with pytest.raises(ShapeMismatchError, match="student:stage3.*teacher:odd"):
        FT(teacher_tap="odd").prepare(student, teacher, batch)
    with pytest.raises(KeyError, match="no tap 'nope'"):
        FT(student_tap="nope").prepare(student, teacher, batch)


# ---------------------------------------------------------------------------- end to end

PAIRS = {
    "cnn": (lambda: create("cnn", widths=(4, 8, 8)), lambda: create("cnn", widths=(8, 16, 16))),
    "digits": (lambda: create("cnn_digits_student"), lambda: create("cnn_digits_teacher")),
}


def loader(n: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_vid_end_to_end_through_distiller_and_fit(pair):
    torch.manual_seed(0)
    make_s, make_t = PAIRS[pair]
    student, teacher = make_s(), make_t()
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "vid": create_method("vid", reduction="mean")})
    x, y = next(iter(loader()))
    d.prepare((x, y))
    params = list(d.trainable_parameters())
    method_params = list(d.methods["vid"].parameters())
    assert len(method_params) == 3 * 3 + 3  # three regressors of three convs, three variance vectors
    assert all(any(p is q for q in params) for p in method_params)
    out = d((x, y))
    assert torch.isfinite(out.parts["vid"])
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method_params)
    alpha_before = d.methods["vid"].alphas["stage1__stage1"].detach().clone()
    res = distill.fit(d, loader(), epochs=1, lr=0.01, schedule="constant", progress=False, eval_teacher=False)
    row = res.history[0]
    assert math.isfinite(row["train_vid"]) and "vid_var_stage1__stage1" in row
    assert not torch.equal(alpha_before, d.methods["vid"].alphas["stage1__stage1"])


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_ft_protocol_pretrain_paraphraser_then_transfer(pair):
    torch.manual_seed(0)
    make_s, make_t = PAIRS[pair]
    student, teacher = make_s(), make_t()
    ft = FT()
    pre = distill.Distiller(student, teacher, {"ft_paraphraser": ft.paraphraser_loss(reduction="mean")})
    student_before = {k: v.clone() for k, v in student.state_dict().items() if "running" not in k}
    res = distill.fit_hint_stage(pre, loader(32), method="ft_paraphraser", epochs=3, lr=0.05,
                                 schedule="constant", progress=False, eval_teacher=False)
    rec = [row["train_ft_paraphraser"] for row in res.history]
    assert rec[-1] < rec[0]
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in student_before.items() if "num_batches" not in k)
    pretrained = {k: v.clone() for k, v in ft.paraphraser.state_dict().items()}

    d = distill.Distiller(student, teacher, {"ce": 1.0, "ft": ft})
    x, y = next(iter(loader()))
    d.prepare((x, y))
    assert not any(any(p is q for q in ft.paraphraser.parameters()) for p in d.trainable_parameters())
    assert any(any(p is q for q in ft.translator.parameters()) for p in d.trainable_parameters())
    out = d((x, y))
    assert torch.isfinite(out.parts["ft"]) and out.parts["ft"].item() >= 0
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert all(p.grad is not None for p in ft.translator.parameters())
    translator_before = [p.detach().clone() for p in ft.translator.parameters()]
    res = distill.fit(d, loader(), epochs=1, lr=0.01, schedule="constant", progress=False, eval_teacher=False)
    assert math.isfinite(res.history[0]["train_ft"])
    assert all(torch.equal(pretrained[k], v) for k, v in ft.paraphraser.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(translator_before, ft.translator.parameters()))


def test_ft_on_a_small_cifar_pair():
    torch.manual_seed(0)
    student, teacher = create("resnet8x4"), create("wrn_16_2")
    ft = FT()
    d = distill.Distiller(student, teacher, {"ce": 1.0, "ft": ft, "vid": VID(reduction="mean")})
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    d.prepare((x, y))
    out = d((x, y))
    out.total.backward()
    assert torch.isfinite(out.total)
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_ft_protocol_in_the_other_order_keeps_the_pretrained_paraphraser_fixed():
    # the transfer Distiller is prepared *before* pre-training: its optimizer may then hold the
    # (unfrozen) paraphraser, but FT freezes it at each epoch start and never sends it gradient
    torch.manual_seed(0)
    student, teacher = PAIRS["cnn"][0](), PAIRS["cnn"][1]()
    ft = FT()
    d = distill.Distiller(student, teacher, {"ce": 1.0, "ft": ft})
    d.prepare(next(iter(loader())))
    pre = distill.Distiller(student, teacher, {"ft_paraphraser": ft.paraphraser_loss(reduction="mean")})
    distill.fit_hint_stage(pre, loader(), method="ft_paraphraser", epochs=1, lr=0.05, schedule="constant",
                           progress=False, eval_teacher=False)
    pretrained = {k: v.clone() for k, v in ft.paraphraser.state_dict().items()}
    distill.fit(d, loader(), epochs=1, lr=0.01, schedule="constant", progress=False, eval_teacher=False)
    assert all(torch.equal(pretrained[k], v) for k, v in ft.paraphraser.state_dict().items())
    assert all(not p.requires_grad for p in ft.paraphraser.parameters())
