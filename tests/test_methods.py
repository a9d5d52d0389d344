"""Methods: registry entries, forward on synthetic views, gradient flow, adapters and shape errors."""

from __future__ import annotations

import math

import pytest
import torch

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import (
    AT,
    CTKD,
    DKD,
    KD,
    FitNet,
    Method,
    NoisyTeacher,
    Paper,
    create_method,
    list_methods,
    method_info,
)

B, K = 4, 10

EXPECTED = {
    "ce": ("baseline", {"weight": 1.0}),
    "label_smoothing": ("baseline", {"eps": 0.1, "weight": 1.0}),
    "kd": ("logits", {"T": 4.0, "weight": 1.0}),
    "logit_regression": ("logits", {"weight": 1.0}),
    "noisy_teacher": ("logits", {"variance": 0.1, "fraction": 0.5, "weight": 1.0}),
    "dkd": ("logits", {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup_epochs": 20, "weight": 1.0}),
    "dist": ("logits", {"beta": 2.0, "gamma": 2.0, "T": 4.0, "weight": 1.0}),
    "skd": ("logits", {"T": 4.0, "multiplier": 2.0, "weight": 1.0}),
    "ctkd": (
        "logits",
        {"t_min": 1.0, "t_max": 21.0, "lambda_max": 1.0, "lambda_min": 0.0, "curriculum_epochs": 10, "weight": 1.0},
    ),
    "fitnet": ("features", {"student_tap": "stage2", "teacher_tap": "stage2", "adapter": "conv1x1_bn", "weight": 1.0}),
    "at": ("features", {"p": 2.0, "beta": 1000.0, "weight": 1.0}),
}
ARXIV = {
    "label_smoothing": "1512.00567",
    "kd": "1503.02531",
    "logit_regression": "1312.6184",
    "noisy_teacher": "1610.09650",
    "dkd": "2203.08679",
    "dist": "2205.10536",
    "skd": "2010.07485",
    "ctkd": "2211.16231",
    "fitnet": "1412.6550",
    "at": "1612.03928",
}


def make_views(seed: int = 0, s_sizes=(16, 8, 4), t_sizes=(16, 8, 4)):
    """Student leaves (requires_grad) and teacher leaves (requires_grad too, to catch leaks)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    student = {"logits": leaf(B, K)}
    teacher = {"logits": leaf(B, K)}
    for i, (hs, ht) in enumerate(zip(s_sizes, t_sizes), start=1):
        student[f"stage{i}"] = leaf(B, 4 * 2**i, hs, hs)
        teacher[f"stage{i}"] = leaf(B, 8 * 2**i, ht, ht)
    batch = Batch(torch.zeros(B, 3, 32, 32), torch.tensor([0, 3, 7, 9]), torch.arange(B))
    return student, teacher, batch


def build(name: str, **kwargs) -> tuple[Method, dict, dict, Batch]:
    student, teacher, batch = make_views()
    m = create_method(name, **kwargs)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    return m, student, teacher, batch


# ---------------------------------------------------------------------------- registry


def test_every_method_is_registered_with_paper_and_defaults():
    infos = {i.name: i for i in list_methods()}
    assert set(EXPECTED) <= set(infos)
    for name, (family, defaults) in EXPECTED.items():
        info = method_info(name)
        assert info.family == family, name
        assert isinstance(info.paper, Paper)
        assert info.paper.title and info.paper.authors and info.paper.year >= 1990, name
        if name in ARXIV:
            assert info.paper.arxiv == ARXIV[name], name
        assert "weight" in info.defaults and "warmup_epochs" in info.defaults, name
        for key, value in defaults.items():
            assert info.defaults[key] == value, (name, key)
        assert info.summary, name
        assert info.cls.name == name and info.cls.family == family


def test_registry_family_filter_and_unknown_name():
    assert {"fitnet", "at"} <= {i.name for i in list_methods("features")}
    assert all(i.family == "features" for i in list_methods("features"))
    with pytest.raises(KeyError, match="Did you mean"):
        method_info("dkdd")
    with pytest.raises(TypeError, match="unknown argument"):
        create_method("kd", temperature=3.0)


def test_teacher_free_and_target_flags():
    for name in ("ce", "label_smoothing"):
        assert method_info(name).cls.needs_teacher is False
        assert method_info(name).cls.needs_targets is True
    assert method_info("dkd").cls.needs_targets is True
    for name in ("kd", "logit_regression", "noisy_teacher", "dist", "skd", "ctkd", "fitnet", "at"):
        assert method_info(name).cls.needs_teacher is True


def test_create_method_overrides_defaults():
    m = create_method("dkd", beta=2.0, weight=0.5)
    assert isinstance(m, DKD) and m.beta == 2.0 and m.weight == 0.5 and m.warmup_epochs == 20
    at = create_method("at", pairs=[("stage3", "stage3")])
    assert at.student_taps == ["stage3"] and at.teacher_taps == ["stage3"]


# ---------------------------------------------------------------------------- forward + gradients


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_finite_scalar_and_gradients_reach_only_student_and_method(name):
    m, student, teacher, batch = build(name)
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    used_student = ["logits"] if name not in ("fitnet", "at") else m.student_taps
    for key in used_student:
        g = student[key].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (name, key)
    for key, t in teacher.items():
        assert t.grad is None, (name, key)
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)


def test_teacher_free_methods_ignore_teacher_view():
    student, _, batch = make_views()
    for name in ("ce", "label_smoothing"):
        loss = create_method(name)(student, {}, batch)
        assert torch.isfinite(loss)


def test_target_methods_need_targets():
    m, student, teacher, _ = build("dkd")
    with pytest.raises(ValueError, match="needs class labels"):
        m(student, teacher, Batch(torch.zeros(B, 3)))


def test_kd_method_matches_functional():
    m, student, teacher, batch = build("kd", T=2.0)
    assert isinstance(m, KD)
    expect = DF.kd_loss(student["logits"].detach(), teacher["logits"].detach(), 2.0)
    assert m(student, teacher, batch).item() == pytest.approx(expect.item())


def test_dkd_warmup_factor():
    m = create_method("dkd")
    assert m.weight_factor() == 1.0  # epoch unknown
    m.on_epoch_start(0, 240)
    assert m.weight_factor() == pytest.approx(1 / 20)
    m.on_epoch_start(19, 240)
    assert m.weight_factor() == 1.0


def test_dist_with_a_single_sample_is_finite():
    m = create_method("dist")
    s = torch.randn(1, K, requires_grad=True)
    loss = m({"logits": s}, {"logits": torch.randn(1, K)}, Batch(torch.zeros(1, 3)))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------- noisy teacher


def test_noisy_teacher_draws_noise_only_in_training():
    m, student, teacher, batch = build("noisy_teacher", fraction=1.0, variance=0.5)
    assert isinstance(m, NoisyTeacher)
    clean = DF.logit_regression_loss(student["logits"].detach(), teacher["logits"].detach()).item()
    m.eval()
    assert m(student, teacher, batch).item() == pytest.approx(clean)
    m.train()
    m.generator = torch.Generator().manual_seed(3)
    noisy = m(student, teacher, batch).item()
    assert noisy != pytest.approx(clean)
    noise, mask = DF.sample_logit_noise(teacher["logits"].detach(), 0.5, 1.0, torch.Generator().manual_seed(3))
    expect = DF.noisy_teacher_loss(student["logits"].detach(), teacher["logits"].detach(), noise, mask).item()
    assert noisy == pytest.approx(expect)


# ---------------------------------------------------------------------------- CTKD


def test_ctkd_lambda_follows_the_curriculum_and_temperature_is_logged():
    m = create_method("ctkd")
    assert isinstance(m, CTKD)
    assert m.lambda_ == pytest.approx(DF.ctkd_lambda(0))
    for epoch, want in [(0, (1 - math.cos(math.pi / 10)) / 2), (4, 0.5), (9, 1.0), (100, 1.0)]:
        m.on_epoch_start(epoch, 240)
        assert m.lambda_ == pytest.approx(want)
    assert m.epoch == 100
    assert isinstance(m.temperature, float)
    assert m.temperature == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    assert 1.0 < m.temperature < 21.0
    assert [n for n, _ in m.named_parameters()] == ["theta"]


def test_ctkd_temperature_gradient_is_reversed_in_the_method():
    student, teacher, batch = make_views(1)
    m = create_method("ctkd")
    m.on_epoch_start(4)  # lambda = 0.5
    m(student, teacher, batch).backward()
    theta = m.theta.detach().clone().requires_grad_(True)
    DF.kd_loss(student["logits"].detach(), teacher["logits"].detach(), DF.ctkd_temperature(theta)).backward()
    assert m.theta.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=1e-5)


# ---------------------------------------------------------------------------- FitNet


def test_fitnet_prepare_builds_a_regressor_with_trainable_params():
    m = create_method("fitnet")
    assert isinstance(m, FitNet)
    assert m.student_taps == ["stage2"] and m.teacher_taps == ["stage2"]
    assert m.hint_parameters() == []
    student, teacher, batch = make_views()
    with pytest.raises(RuntimeError, match="prepare"):
        m(student, teacher, batch)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    assert m.regressor is not None
    params = m.hint_parameters()
    assert params and all(p.requires_grad for p in params)
    assert {id(p) for p in params} <= {id(p) for p in m.parameters()}
    out = m.regressor(student["stage2"])
    assert out.shape == teacher["stage2"].shape


def test_fitnet_loss_is_half_squared_distance_of_regressed_student():
    m, student, teacher, batch = build("fitnet", adapter="conv1x1")
    r = m.regressor(student["stage2"]).detach()
    t = teacher["stage2"].detach()
    expect = 0.5 * ((r - t) ** 2).sum(dim=(1, 2, 3)).mean()
    assert m(student, teacher, batch).item() == pytest.approx(expect.item(), rel=1e-5)


def test_fitnet_impossible_shapes_name_both_taps():
    student, teacher, batch = make_views(s_sizes=(16, 8, 4), t_sizes=(16, 12, 2))  # 8 -> 12: no adapter
    m = create_method("fitnet", student_tap="stage2", teacher_tap="stage2")
    with pytest.raises(ShapeMismatchError) as err:
        m.prepare(student, teacher, batch)
    assert "student:stage2" in str(err.value) and "teacher:stage2" in str(err.value)


def test_fitnet_missing_tap_is_a_clear_error():
    student, teacher, batch = make_views()
    m = create_method("fitnet", student_tap="stage9")
    with pytest.raises(KeyError, match="stage9"):
        m.prepare(student, teacher, batch)


# ---------------------------------------------------------------------------- AT


def test_at_with_spatial_multiples():
    student, teacher, batch = make_views(s_sizes=(32, 16, 8), t_sizes=(16, 8, 4))
    m = create_method("at")
    assert isinstance(m, AT)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    loss = m(student, teacher, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for tap in ("stage1", "stage2", "stage3"):
        assert student[tap].grad is not None and teacher[tap].grad is None


def test_at_matches_functional_for_equal_sizes():
    m, student, teacher, batch = build("at", pairs=[("stage1", "stage1"), ("stage3", "stage3")])
    qs = [DF.attention_map(student[k].detach()) for k in ("stage1", "stage3")]
    qt = [DF.attention_map(teacher[k].detach()) for k in ("stage1", "stage3")]
    assert m(student, teacher, batch).item() == pytest.approx(DF.at_loss(qs, qt, 1000.0).item(), rel=1e-6)


def test_at_non_multiple_sizes_raise_naming_both_taps():
    student, teacher, batch = make_views(s_sizes=(16, 6, 4), t_sizes=(16, 4, 4))
    m = create_method("at")
    with pytest.raises(ShapeMismatchError) as err:
        m.prepare(student, teacher, batch)
    assert "student:stage2" in str(err.value) and "teacher:stage2" in str(err.value)


def test_at_rejects_vector_taps_naming_both():
    student, teacher, batch = make_views()
    student["pool"], teacher["pool"] = torch.randn(B, 8), torch.randn(B, 16)
    m = create_method("at", pairs=[("pool", "pool")])
    with pytest.raises(ShapeMismatchError) as err:
        m.prepare(student, teacher, batch)
    assert "student:pool" in str(err.value) and "teacher:pool" in str(err.value)
