"""Core API: taps, teacher sources, adapters, the Distiller and gradient isolation."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distill
from distill import Distiller, EnsembleTeacher, FrozenTeacher
from distill.adapters import ShapeMismatchError, build_adapter, match_spatial
from distill.batch import Batch
from distill.methods import AT, DKD, KD, FitNet, LogitRegression
from distill.models import create
from distill.taps import TapError, Taps, logits_of

K = 10


def _cnn(widths=(4, 8, 8), seed=0, **kw):
    torch.manual_seed(seed)
    return create("cnn", widths=widths, num_classes=K, **kw)


def _images(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, K, (b,), generator=g)


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class Custom(nn.Module):
    """A custom module with nesting and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleDict({"inner": Inner()})
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.block["inner"](x)
        return {"logits": self.head(h), "hidden": h}


# ------------------------------------------------------------------------------------------ taps


def test_taps_sequential_output_and_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    taps = Taps(model, ["0", "1", "2:input", "2:output"])
    with taps.recording() as store:
        out = model(x)
    h = model[0](x)
    torch.testing.assert_close(store["0"], h)
    torch.testing.assert_close(store["1"], F.relu(h))
    torch.testing.assert_close(store["2:input"], F.relu(h))
    torch.testing.assert_close(store["2:output"], out)
    # outside recording() nothing is stored; remove() takes every hook off
    model(x)
    assert taps._store is None
    taps.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_taps_custom_module_nested_path_and_dict_output():
    torch.manual_seed(0)
    model = Custom()
    x = torch.randn(3, 4)
    taps = Taps(model, ["block.inner.proj", "block.inner", "head:input", ""])
    with taps.recording() as store:
        out = model(x)
    pre = model.block["inner"].proj(x)
    torch.testing.assert_close(store["block.inner.proj"], pre)
    torch.testing.assert_close(store["block.inner"], torch.tanh(pre))
    torch.testing.assert_close(store["head:input"], torch.tanh(pre))
    # "" is the model itself; its dict output yields its first tensor
    torch.testing.assert_close(store[""], out["logits"])


def test_tap_wrong_path_lists_nearest():
    model = Custom()
    with pytest.raises(TapError) as ei:
        Taps(model, ["block.inner.prj"], model_name="student")
    msg = str(ei.value)
    assert isinstance(ei.value, KeyError)
    assert "block.inner.prj" in msg
    assert "'block.inner.proj'" in msg
    assert "student" in msg
    # not the quoted repr a plain KeyError would give
    assert not msg.startswith('"')

    cnn = _cnn()
    with pytest.raises(TapError, match="'stage2'"):
        Taps(cnn, ["stage22"])


def test_tap_bad_suffix():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TapError, match="suffix"):
        Taps(model, ["0:outputs"])


def test_tap_not_reached_raises():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    m = Skip()
    taps = Taps(m, ["unused"])
    with pytest.raises(TapError, match="not reached"):
        with taps.recording():
            m(torch.randn(1, 2))


def test_logits_of_output_kinds():
    z = torch.randn(2, 3)
    assert logits_of(z) is z
    assert logits_of((z, torch.zeros(1))) is z
    assert logits_of([z]) is z
    assert logits_of(SimpleNamespace(logits=z, other=1)) is z
    assert logits_of({"features": torch.zeros(2), "logits": z}) is z
    with pytest.raises(TypeError):
        logits_of("nope")


@pytest.mark.parametrize("kind", ["tuple", "object", "dict"])
def test_distiller_accepts_structured_model_outputs(kind):
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, K)

        def forward(self, x):
            z = self.net(x)
            if kind == "tuple":
                return z, x
            if kind == "object":
                return SimpleNamespace(logits=z)
            return {"logits": z}

    torch.manual_seed(0)
    student, teacher = Wrapped(), Wrapped()
    d = Distiller(student, teacher, losses={"ce": 1.0, "kd": 1.0})
    x, y = torch.randn(5, 4), torch.randint(0, K, (5,))
    out = d((x, y))
    torch.testing.assert_close(out.student["logits"], student.net(x))
    torch.testing.assert_close(out.teacher["logits"], teacher.net(x))
    assert torch.isfinite(out.total)


# -------------------------------------------------------------------------------- FrozenTeacher


def test_frozen_teacher_eval_and_no_grad():
    model = _cnn(dropout=0.5)
    model.train()
    ft = FrozenTeacher(model)
    assert all(not m.training for m in ft.model.modules())
    assert all(not p.requires_grad for p in ft.parameters())

    d = Distiller(_cnn(seed=1), ft, losses={"kd": 1.0})
    d.train()
    assert d.student.training
    assert all(not m.training for m in ft.model.modules())
    d.teacher.train()
    assert all(not m.training for m in ft.model.modules())
    # eval-mode teacher is deterministic despite dropout
    x, _ = _images()
    torch.testing.assert_close(ft(Batch(x))["logits"], ft(Batch(x))["logits"])


def test_frozen_teacher_bf16_returns_float32_close_to_fp32():
    model = _cnn(widths=(8, 8, 16))
    ref = copy.deepcopy(model).eval()
    x, _ = _images(8)
    with torch.no_grad():
        want = ref(x)
    ft = FrozenTeacher(model, dtype=torch.bfloat16)
    ft.require_taps(["stage2", "pool"])
    view = ft(Batch(x))
    assert view["logits"].dtype == torch.float32
    assert view["stage2"].dtype == torch.float32 and view["pool"].dtype == torch.float32
    assert next(ft.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(view["logits"], want, atol=0.1, rtol=0.05)
    # an enclosing .to() / .float() does not undo the explicit dtype
    d = Distiller(_cnn(seed=1), ft, losses={"kd": 1.0})
    d.float()
    assert next(ft.model.parameters()).dtype == torch.bfloat16


def test_frozen_teacher_require_taps_in_view():
    model = _cnn()
    ft = FrozenTeacher(model)
    x, _ = _images()
    assert set(ft(Batch(x))) == {"logits"}
    ft.require_taps(["stage1", "stage3.pre", "fc:input"])
    view = ft(Batch(x))
    assert set(view) == {"logits", "stage1", "stage3.pre", "fc:input"}
    assert view["stage1"].shape == (6, 4, 8, 8)
    assert view["fc:input"].shape == (6, 8)
    with torch.no_grad():
        torch.testing.assert_close(view["logits"], model(x))
        torch.testing.assert_close(view["logits"], model.fc(view["fc:input"]))
    ft.require_taps([])
    assert set(ft(Batch(x))) == {"logits"}


# ------------------------------------------------------------------------------- EnsembleTeacher


def _members(n=3, seed=0):
    torch.manual_seed(seed)
    ms = []
    for i in range(n):
        lin = nn.Linear(5, 4)
        with torch.no_grad():
            lin.weight.mul_(3.0 + i)
        ms.append(lin)
    return ms


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5]])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_ensemble_probs_is_weighted_mean_of_softened_probs(weights, T):
    members = _members()
    x = torch.randn(7, 5)
    with torch.no_grad():
        zs = [m(x) for m in members]
    w = torch.ones(3) if weights is None else torch.tensor(weights)
    w = w / w.sum()
    want = sum(wi * F.softmax(z / T, dim=1) for wi, z in zip(w, zs))
    ens = EnsembleTeacher(members, combine="probs", temperature=T, weights=weights)
    got = F.softmax(ens(Batch(x))["logits"] / T, dim=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_ensemble_logits_is_weighted_mean_of_logits():
    members = _members()
    x = torch.randn(7, 5)
    with torch.no_grad():
        zs = [m(x) for m in members]
    weights = [2.0, 1.0, 1.0]
    want = 0.5 * zs[0] + 0.25 * zs[1] + 0.25 * zs[2]
    ens = EnsembleTeacher(members, combine="logits", weights=weights)
    torch.testing.assert_close(ens(Batch(x))["logits"], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": [1.0, -1.0, 1.0]},
        {"weights": [1.0, 1.0]},
        {"weights": [0.0, 0.0, 0.0]},
        {"temperature": 0.0},
        {"temperature": -2.0},
        {"combine": "max"},
    ],
)
def test_ensemble_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        EnsembleTeacher(_members(), **kwargs)


def test_ensemble_empty_raises():
    with pytest.raises(ValueError):
        EnsembleTeacher([])


@pytest.mark.parametrize("kwargs", [{"weights": [float("nan"), 1.0, 1.0]}, {"temperature": float("nan")}])
def test_ensemble_rejects_nan_weights_and_temperature(kwargs):
    with pytest.raises(ValueError):
        EnsembleTeacher(_members(), **kwargs)


def test_ensemble_refuses_feature_taps():
    ens = EnsembleTeacher(_members())
    ens.require_taps([])  # no taps is fine
    with pytest.raises(ValueError, match="feature taps"):
        ens.require_taps(["stage2"])
    teachers = [_cnn(seed=1), _cnn(seed=2)]
    with pytest.raises(ValueError):
        Distiller(_cnn(), teachers, losses={"fitnet": 1.0})
    # a logits-only method works with a list of models (an ensemble)
    d = Distiller(_cnn(), teachers, losses={"kd": 1.0})
    assert isinstance(d.teacher, EnsembleTeacher)


# ------------------------------------------------------------------------------------- adapters


def test_build_adapter_linear_for_vectors():
    s, t = torch.randn(3, 5), torch.randn(3, 9)
    a = build_adapter(s, t)
    assert isinstance(a, nn.Linear)
    assert a(s).shape == t.shape


def test_build_adapter_conv1x1_bn_for_maps():
    s, t = torch.randn(3, 4, 6, 6), torch.randn(3, 16, 6, 6)
    a = build_adapter(s, t)
    convs = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (1, 1)
    assert convs[0].in_channels == 4 and convs[0].out_channels == 16
    assert len(bns) == 1
    assert a(s).shape == t.shape


def test_build_adapter_spatial_mismatch_names_both():
    # a smaller student map by a non-integer factor (4 -> 6) cannot be bridged
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 16, 6, 6)
    with pytest.raises(ShapeMismatchError) as ei:
        build_adapter(s, t, student_name="student:stage1", teacher_name="teacher:stage3")
    msg = str(ei.value)
    for piece in ("student:stage1", "teacher:stage3", "(2, 4, 4, 4)", "(2, 16, 6, 6)"):
        assert piece in msg
    with pytest.raises(ShapeMismatchError, match="same direction"):  # one axis up, the other down
        build_adapter(torch.randn(2, 4, 8, 4), torch.randn(2, 16, 4, 8))


@pytest.mark.parametrize(
    "hw_s, hw_t, op, kernel, stride, padding",
    [
        ((8, 8), (4, 4), nn.Conv2d, (3, 3), (2, 2), (1, 1)),            # RepDistiller ConvReg, 2x down
        ((4, 4), (8, 8), nn.ConvTranspose2d, (4, 4), (2, 2), (1, 1)),   # ConvReg, 2x up
        ((12, 12), (4, 4), nn.Conv2d, (5, 5), (3, 3), (2, 2)),          # 3x down: kernel 2f-1, pad f-1
        ((4, 4), (12, 12), nn.ConvTranspose2d, (3, 3), (3, 3), (0, 0)),  # 3x up (odd): kernel = stride
        ((7, 7), (5, 5), nn.Conv2d, (3, 3), (1, 1), (0, 0)),            # FitNets valid conv: 7-5+1
        ((8, 6), (4, 6), nn.Conv2d, (3, 1), (2, 1), (1, 0)),            # one axis only
    ],
)
def test_build_adapter_bridges_resolution(hw_s, hw_t, op, kernel, stride, padding):
    s, t = torch.randn(2, 4, *hw_s), torch.randn(2, 6, *hw_t)
    a = build_adapter(s, t, kind="conv1x1_bn")
    convs = [m for m in a.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 1 and type(convs[0]) is op
    assert (convs[0].kernel_size, convs[0].stride, convs[0].padding) == (kernel, stride, padding)
    assert isinstance(a[1], nn.BatchNorm2d)
    assert a(s).shape == t.shape


def test_resampling_adapter_downsamples_like_a_strided_convolution():
    # independent check of the 2x-down regressor: output pixel (i, j) sees input rows 2i-1..2i+1
    torch.manual_seed(0)
    s = torch.randn(1, 1, 4, 4)
    conv = build_adapter(s, torch.randn(1, 1, 2, 2), kind="conv1x1")
    w, b = conv.weight[0, 0].detach(), conv.bias[0].detach()
    padded = torch.zeros(6, 6)
    padded[1:5, 1:5] = s[0, 0]
    expected = torch.tensor([[float((padded[2 * i:2 * i + 3, 2 * j:2 * j + 3] * w).sum() + b) for j in range(2)]
                             for i in range(2)])
    torch.testing.assert_close(conv(s)[0, 0], expected)


def test_build_adapter_rank_mismatch_names_both():
    s, t = torch.randn(2, 8), torch.randn(2, 16, 4, 4)
    with pytest.raises(ShapeMismatchError) as ei:
        build_adapter(s, t, student_name="student:pool", teacher_name="teacher:stage2")
    msg = str(ei.value)
    for piece in ("student:pool", "teacher:stage2", "(2, 8)", "(2, 16, 4, 4)"):
        assert piece in msg
    assert isinstance(ei.value, ValueError)


def test_match_spatial():
    big, small = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4)
    s, t = match_spatial(big, small)
    assert s.shape == t.shape == (2, 1, 4, 4)
    torch.testing.assert_close(s, F.avg_pool2d(big, 2))
    assert t is small
    s, t = match_spatial(small, big)
    assert s is small
    torch.testing.assert_close(t, F.avg_pool2d(big, 2))
    s, t = match_spatial(small, small)
    assert s is small and t is small
    with pytest.raises(ShapeMismatchError) as ei:
        match_spatial(torch.randn(2, 1, 6, 6), small, student_name="student:a", teacher_name="teacher:b")
    assert "student:a" in str(ei.value) and "teacher:b" in str(ei.value)


def test_fitnet_prepare_shape_error_names_taps():
    d = Distiller(_cnn(), _cnn(widths=(8, 16, 16), seed=1),
                  losses={"fitnet": FitNet(student_tap="pool", teacher_tap="stage3")})  # vector -> map
    x, y = _images()
    with pytest.raises(ShapeMismatchError) as ei:
        d.prepare((x, y))
    assert "student:pool" in str(ei.value) and "teacher:stage3" in str(ei.value)


# ------------------------------------------------------------------------------------ Distiller


def test_total_is_sum_of_weighted_parts_by_hand():
    student, teacher = _cnn(), _cnn(widths=(8, 16, 16), seed=1)
    d = Distiller(student, teacher, losses={
        "ce": 1.0,
        "kd": (0.5, KD(T=2.0)),
        "lr": LogitRegression(weight=0.25),
    })
    x, y = _images()
    d.train()
    out = d(Batch(x, y))
    s = student(x)  # BN in train mode mixes the batch identically; no dropout
    with torch.no_grad():
        t = teacher(x)
    ce = F.cross_entropy(s, y)
    kd = F.kl_div(F.log_softmax(s / 2.0, 1), F.log_softmax(t / 2.0, 1), reduction="batchmean", log_target=True) * 4.0
    lr = 0.25 * 0.5 * ((s - t) ** 2).sum(1).mean()
    torch.testing.assert_close(out.parts["ce"], ce.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.parts["kd"], 0.5 * kd.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.parts["lr"], lr.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.total.detach(), (ce + 0.5 * kd + lr).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.total.detach(), sum(out.parts.values()), atol=1e-6, rtol=1e-6)
    assert out.total.requires_grad
    assert all(not v.requires_grad for v in out.parts.values())


def test_float_weight_builds_registered_method():
    d = Distiller(_cnn(), _cnn(seed=1), losses={"kd": 0.3, "ce": 2})
    assert isinstance(d.methods["kd"], KD) and d.methods["kd"].weight == 0.3 and d.methods["kd"].T == 4.0
    assert d.methods["ce"].weight == 2.0


def test_bad_loss_spec_type():
    with pytest.raises(TypeError):
        Distiller(_cnn(), _cnn(seed=1), losses={"kd": "heavy"})


def test_teacher_needed_but_none():
    with pytest.raises(ValueError, match="kd"):
        Distiller(_cnn(), None, losses={"ce": 1.0, "kd": 1.0})
    # teacher-free losses are fine without a teacher; default losses then are CE only
    d = Distiller(_cnn())
    assert list(d.methods) == ["ce"]
    x, y = _images()
    out = d((x, y))
    assert out.teacher is None


def test_unknown_loss_name_lists_known():
    with pytest.raises(KeyError) as ei:
        Distiller(_cnn(), _cnn(seed=1), losses={"kdd": 1.0})
    msg = str(ei.value)
    for name in ("kdd", "kd", "ce", "dkd", "fitnet", "at"):
        assert name in msg


def test_fitnet_without_prepare():
    d = Distiller(_cnn(), _cnn(widths=(8, 16, 16), seed=1), losses={"ce": 1.0, "fitnet": 1.0})
    x, y = _images()
    with pytest.raises(RuntimeError, match="prepare"):
        d((x, y))


@pytest.mark.parametrize("train_mode", [True, False])
def test_prepare_builds_adapters_and_leaves_student_untouched(train_mode):
    student, teacher = _cnn(), _cnn(widths=(8, 16, 16), seed=1)
    d = Distiller(student, teacher, losses={"ce": 1.0, "fitnet": FitNet("stage2", "stage2")})
    student.train(train_mode)
    bn_before = _bn_state(student)
    weights_before = {k: v.clone() for k, v in student.state_dict().items()}
    assert d.methods["fitnet"].regressor is None
    x, y = _images()
    assert d.prepare((x, y)) is d
    reg = d.methods["fitnet"].regressor
    assert reg is not None
    assert student.training is train_mode
    assert all(m.training is train_mode for m in student.modules())
    for k, v in bn_before.items():
        assert torch.equal(student.state_dict()[k], v), k
    for k, v in weights_before.items():
        assert torch.equal(student.state_dict()[k], v), k
    assert d.prepare((x, y)) is d and d.methods["fitnet"].regressor is reg  # idempotent
    out = d((x, y))
    assert out.parts["fitnet"] > 0


def test_prepare_restores_mixed_submodule_modes():
    student, teacher = _cnn(), _cnn(widths=(8, 16, 16), seed=1)
    d = Distiller(student, teacher, losses={"fitnet": 1.0})
    student.train()
    student.stem[1].eval()  # a frozen BatchNorm
    x, y = _images()
    d.prepare((x, y))
    assert not student.stem[1].training


def test_trainable_parameters_student_and_adapters_only():
    student, teacher = _cnn(), _cnn(widths=(8, 16, 16), seed=1)
    d = Distiller(student, teacher, losses={"kd": 1.0, "fitnet": 1.0, "ctkd": 0.1})
    x, y = _images()
    d.prepare((x, y))
    ids = {id(p) for p in d.trainable_parameters()}
    assert len(ids) == len(list(d.trainable_parameters()))  # no duplicates
    assert {id(p) for p in student.parameters()} <= ids
    assert {id(p) for p in d.methods["fitnet"].regressor.parameters()} <= ids
    assert id(d.methods["ctkd"].theta) in ids
    assert not ({id(p) for p in teacher.parameters()} & ids)
    expected = set(map(id, student.parameters())) | set(map(id, d.methods.parameters()))
    assert ids == expected


def test_ce_without_targets_raises():
    d = Distiller(_cnn(), _cnn(seed=1), losses={"ce": 1.0, "kd": 1.0})
    x, _ = _images()
    with pytest.raises(ValueError, match="targets"):
        d(Batch(x))
    with pytest.raises(ValueError, match="targets"):
        d(x)  # a bare tensor is an unlabeled batch
    # a teacher-only loss works on unlabeled batches
    d2 = Distiller(_cnn(), _cnn(seed=1), losses={"kd": 1.0})
    assert torch.isfinite(d2(x).total)


def test_dkd_warmup_factor():
    from distill import functional as DF

    student, teacher = _cnn(), _cnn(widths=(8, 16, 16), seed=1)
    d = Distiller(student, teacher, losses={"dkd": DKD(warmup_epochs=4)})
    d.eval()
    x, y = _images()
    with torch.no_grad():
        unwarmed = DF.dkd_loss(student(x), teacher(x), y, alpha=1.0, beta=8.0, T=4.0)
    for e in (0, 1, 2, 3, 5):
        d.set_epoch(e, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = d((x, y))
        torch.testing.assert_close(out.parts["dkd"], unwarmed * min(1.0, (e + 1) / 4), atol=1e-6, rtol=1e-5)


def test_dkd_warmup_without_set_epoch_warns_once():
    student, teacher = _cnn(), _cnn(widths=(8, 16, 16), seed=1)
    d = Distiller(student, teacher, losses={"ce": 1.0, "dkd": 1.0})  # registry default: 20-epoch warm-up
    assert d.methods["dkd"].warmup_epochs == 20
    d.eval()
    x, y = _images()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = d((x, y))
        out2 = d((x, y))
    msgs = [str(w.message) for w in rec if "set_epoch" in str(w.message)]
    assert len(msgs) == 1
    assert "dkd" in msgs[0]
    torch.testing.assert_close(out1.parts["dkd"], out2.parts["dkd"])
    # without set_epoch the warm-up is skipped (factor 1)
    d.set_epoch(0)
    torch.testing.assert_close(d((x, y)).parts["dkd"], out1.parts["dkd"] / 20, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------- gradient isolation


def test_gradients_reach_student_and_adapters_never_teacher():
    student, teacher = _cnn(), _cnn(widths=(8, 16, 16), seed=1)
    d = Distiller(student, teacher, losses={
        "ce": 1.0,
        "kd": 1.0,
        "fitnet": FitNet("stage2", "stage2"),
        "at": AT(pairs=(("stage1", "stage1"), ("stage3", "stage3"))),
    })
    x, y = _images(8)
    d.prepare((x, y))
    d.train()
    out = d((x, y))
    assert set(out.teacher) == {"logits", "stage1", "stage2", "stage3"}
    assert not any(v.requires_grad for v in out.teacher.values())
    out.total.backward()
    for name, p in student.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for name, p in d.methods["fitnet"].regressor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in teacher.named_parameters():
        assert p.grad is None, name
        assert not p.requires_grad, name


def test_step_end_reaches_a_stateful_teacher_source_and_methods() -> None:
    """The hook later EMA teachers and memory-bank methods plug into: called once per optimizer step."""
    from distill.methods.base import Method
    from distill.teachers import TeacherSource

    class CountingSource(TeacherSource):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.steps = 0
            self.seen: nn.Module | None = None

        def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return {"logits": self.model(batch.inputs)}

        def on_step_end(self, student: nn.Module) -> None:
            self.steps += 1
            self.seen = student

    class CountingKD(Method):
        def __init__(self) -> None:
            super().__init__()
            self.steps = 0

        def forward(self, s, t, batch):  # type: ignore[no-untyped-def]
            return (s["logits"] - t["logits"]).pow(2).mean()

        def on_step_end(self) -> None:
            self.steps += 1

    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    source, method = CountingSource(teacher), CountingKD()
    d = Distiller(student, source, losses={"ce": 1.0, "mse": method})
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loader = [(x, y), (x, y), (x, y)]
    distill.fit(d, loader, epochs=2, progress=False, schedule="constant")
    assert source.steps == 6 and method.steps == 6 and source.seen is student
    plain = Distiller(nn.Linear(4, 3), nn.Linear(4, 3))
    assert not plain._has_step_hooks  # no per-step calls when nothing listens


def test_ensemble_combines_on_its_members_device():
    """Members moved to another device than the ensemble's own buffers (the meta device stands for a
    GPU here) still combine: the weights follow the logits (found by benchmarks/cuda_check.py)."""
    members = [nn.Linear(4, 3), nn.Linear(4, 3)]
    ens = EnsembleTeacher(members, combine="probs")
    for m in members:
        m.to("meta")
    out = ens(Batch(torch.zeros(2, 4, device="meta")))
    assert out["logits"].device.type == "meta" and out["logits"].shape == (2, 3)
