"""Synthesis core (issue 13, part S1a): priors, BN-statistics matching, generators, DSA, and the
adversarial teacher-student-generator loop, each checked on numbers worked out independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.models import create, list_models
from distill.synthesis.bn_stats import BatchNormStatistics
from distill.synthesis.priors import jitter_flip, l2_prior, total_variation

torch.set_num_threads(1)

# ---------------------------------------------------------------- priors


def _two_images() -> torch.Tensor:
    x = torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, 3.0]])  # one 2x3 image
    return torch.stack([x, 2 * x]).unsqueeze(1)  # (2, 1, 2, 3): the image and its double


def test_total_variation_by_hand():
    x = _two_images()
    # image 1: vertical diffs -1, 1, -1; horizontal 1, 2 (row 0) and 3, 0 (row 1).
    # p=2: 3 + 14 = 17; p=1: 3 + 6 = 9; p=3: 3 + 36 = 39. The doubled image: x 2^p.
    assert total_variation(x, p=2).item() == pytest.approx((17 + 4 * 17) / 2)
    assert total_variation(x, p=1).item() == pytest.approx((9 + 2 * 9) / 2)
    assert total_variation(x, p=3).item() == pytest.approx((39 + 8 * 39) / 2)
    assert total_variation(x).item() == pytest.approx(42.5)  # default p = 2


def test_l2_prior_by_hand():
    x = _two_images()  # ||x_1|| = sqrt(1 + 4 + 16 + 0 + 9 + 9) = sqrt(39), ||x_2|| = 2 sqrt(39)
    assert l2_prior(x).item() == pytest.approx(1.5 * math.sqrt(39))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.sampled_from([1.0, 1.5, 2.0]), c=st.floats(-3, 3), k=st.floats(0.1, 4))
def test_total_variation_invariances(seed, p, c, k):
    x = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tv = total_variation(x, p)
    assert torch.allclose(total_variation(x + c, p), tv)  # a constant shift has no edges
    assert torch.allclose(total_variation(x.flip(3), p), tv) and torch.allclose(total_variation(x.flip(2), p), tv)
    assert torch.allclose(total_variation(k * x, p), k ** p * tv)  # homogeneous of degree p
    assert torch.allclose(l2_prior(k * x), k * l2_prior(x))


def test_priors_reject_non_images():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        total_variation(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="p must be > 0"):
        total_variation(torch.zeros(1, 1, 2, 2), p=0)
    with pytest.raises(ValueError, match="max_shift"):
        jitter_flip(torch.zeros(1, 1, 2, 2), max_shift=-1)


def test_jitter_flip_rolls_and_flips_exactly():
    x = torch.arange(2 * 2 * 5 * 6, dtype=torch.float32).view(2, 2, 5, 6)
    seen_shifts, seen_flips = set(), set()
    for seed in range(40):
        out = jitter_flip(x, max_shift=2, generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)  # the documented draw order, replayed
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        coin = int(torch.randint(0, 2, (1,), generator=g))
        seen_shifts.add((dx, dy))
        seen_flips.add(coin)
        expected = torch.empty_like(x)
        for i in range(5):
            for j in range(6):
                jj = 5 - j if coin else j  # the flip reads the mirrored column of the rolled image
                expected[:, :, i, j] = x[:, :, (i - dy) % 5, (jj - dx) % 6]
        assert torch.equal(out, expected), (seed, dx, dy, coin)
    assert seen_flips == {0, 1}
    assert {s for pair in seen_shifts for s in pair} == {-2, -1, 0, 1, 2}


def test_jitter_flip_without_flip_and_gradients():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    out = jitter_flip(x, max_shift=0, flip=False)
    assert torch.equal(out, x)
    (jitter_flip(x, max_shift=1, generator=torch.Generator().manual_seed(1)) * 2).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0))


# ---------------------------------------------------------------- BN statistics


class _TinyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 4)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.fc(torch.relu(self.bn1(x)).flatten(1)))


def _tiny_bn_model() -> _TinyBN:
    torch.manual_seed(0)
    m = _TinyBN()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _numpy_bn_terms(m: _TinyBN, x: np.ndarray) -> list[float]:
    """Per-layer ||mu - running_mean|| + ||var - running_var|| computed in numpy, BN inputs included."""
    p = {k: v.detach().numpy().astype(np.float64) for k, v in m.state_dict().items()}
    in1 = x  # (N, 2, 3, 3)
    mu1, var1 = in1.mean(axis=(0, 2, 3)), in1.var(axis=(0, 2, 3))  # numpy var: biased
    shape = (1, 2, 1, 1)
    h = (in1 - p["bn1.running_mean"].reshape(shape)) / np.sqrt(p["bn1.running_var"].reshape(shape) + 1e-5)
    h = np.maximum(h * p["bn1.weight"].reshape(shape) + p["bn1.bias"].reshape(shape), 0)
    in2 = h.reshape(len(x), -1) @ p["fc.weight"].T + p["fc.bias"]  # (N, 4)
    mu2, var2 = in2.mean(axis=0), in2.var(axis=0)
    terms = []
    for mu, var, name in ((mu1, var1, "bn1"), (mu2, var2, "bn2")):
        terms.append(np.linalg.norm(mu - p[f"{name}.running_mean"]) + np.linalg.norm(var - p[f"{name}.running_var"]))
    return terms


def test_bn_statistics_loss_matches_numpy():
    m = _tiny_bn_model()
    x = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(3)) * 1.7 + 0.4
    expected = _numpy_bn_terms(m, x.double().numpy())
    with BatchNormStatistics(m, first_weight=3.5) as bn:
        m(x)
        per_layer = [t.item() for t in bn.per_layer()]
        assert per_layer == pytest.approx(expected, rel=1e-5)
        assert bn.loss().item() == pytest.approx(3.5 * expected[0] + expected[1], rel=1e-5)
        assert bn.names == ["bn1", "bn2"]
    # removed on exit: another forward records nothing
    assert all(s is None for s in bn._stats)
    m(x)
    assert all(s is None for s in bn._stats)


def test_bn_statistics_gradient_reaches_the_input_and_teacher_is_untouched():
    m = _tiny_bn_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    bn = BatchNormStatistics(m)
    m(x)
    bn.loss().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    bn.remove()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_bn_statistics_loss_is_zero_when_running_statistics_are_the_batch_statistics():
    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    with torch.no_grad():
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3), correction=0))
    with BatchNormStatistics(nn.Sequential(bn), first_weight=5.0) as stats:
        bn(x)
        assert stats.loss().item() == pytest.approx(0.0, abs=1e-5)


def test_bn_statistics_errors():
    with pytest.raises(ValueError, match="Sequential has no BatchNorm"):
        BatchNormStatistics(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        BatchNormStatistics(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)))
    bn = BatchNormStatistics(_tiny_bn_model())
    with pytest.raises(RuntimeError, match="has not run"):
        bn.loss()
    bn.remove()


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("name", ["dafl_generator", "dfad_generator"])
@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3)])
def test_generator_shapes_and_output_standardisation(name, size, channels):
    torch.manual_seed(0)
    g = create(name, latent_dim=16, image_size=size, channels=channels, width=8)
    out = g(torch.randn(6, 16))
    assert out.shape == (6, channels, size, size)
    # the last BN (no affine) standardises each channel over the batch in training mode
    mean = out.mean(dim=(0, 2, 3))
    var = out.var(dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, torch.zeros(channels), atol=1e-5)
    assert torch.all(var > 0.9) and torch.all(var <= 1.0 + 1e-4)
    assert g(torch.randn(2, 16, 1, 1)).shape == (2, channels, size, size)  # DFAD's (B, nz, 1, 1)
    g.eval()
    assert g(torch.randn(1, 16)).shape == (1, channels, size, size)


def test_generator_layers_follow_the_authors_code():
    dafl, dfad = create("dafl_generator"), create("dfad_generator")
    assert {"dafl_generator", "dfad_generator"} <= set(list_models())
    assert dafl.block1[1].eps == 0.8 and dafl.block2[1].eps == 0.8
    assert dfad.block1[1].eps == 1e-5
    assert dafl.project.out_features == 128 * 8 * 8  # 32x32 default: 128 channels at 8x8
    assert dafl.block2[3].out_channels == 1 and dafl.block2[0].out_channels == 64
    assert not dafl.block2[5].affine
    assert isinstance(dafl.block2[4], nn.Tanh) and isinstance(dafl.block1[2], nn.LeakyReLU)
    assert dafl.block1[2].negative_slope == 0.2


def test_generator_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        create("dafl_generator", image_size=30)
    with pytest.raises(ValueError, match=r"z of shape \(B, 100\)"):
        create("dfad_generator")(torch.randn(2, 7))


# ---------------------------------------------------------------- DSA

from dataclasses import replace  # noqa: E402


from distill.synthesis.dsa import DSA, DSA_OPS  # noqa: E402


def _params(dsa: DSA, shape, ops, **values):
    """A siamese draw with some parameters set by hand (tensors of one value each)."""
    p = dsa.sample(shape, torch.Generator().manual_seed(0))
    fields = {k: torch.as_tensor(v).reshape(1, *torch.as_tensor(v).shape) for k, v in values.items()}
    return replace(p, ops=tuple(ops), **fields)


def test_dsa_flip():
    dsa = DSA()
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(dsa(x, _params(dsa, x.shape, ["flip"], flip=True)), x.flip(3))
    assert torch.equal(dsa(x, _params(dsa, x.shape, ["flip"], flip=False)), x)


def test_dsa_crop_is_an_integer_translation_with_zero_fill():
    dsa = DSA(ratio_crop_pad=0.5)
    x = torch.arange(1, 2 * 4 * 5 + 1, dtype=torch.float32).view(1, 2, 4, 5)
    out = dsa(x, _params(dsa, x.shape, ["crop"], crop=[1, -2]))  # (ty, tx)
    expected = torch.zeros_like(x)
    for i in range(4):
        for j in range(5):
            if 0 <= i + 1 < 4 and 0 <= j - 2 < 5:
                expected[:, :, i, j] = x[:, :, i + 1, j - 2]
    assert torch.equal(out, expected)


def test_dsa_cutout_masks_the_square():
    dsa = DSA(ratio_cutout=0.5)
    x = torch.ones(1, 1, 6, 6)
    out = dsa(x, _params(dsa, x.shape, ["cutout"], cutout=[1, 4]))  # 3x3 square centred at (1, 4)
    expected = torch.ones(6, 6)
    expected[0:3, 3:6] = 0
    assert torch.equal(out[0, 0], expected)
    x = torch.ones(1, 1, 4, 4)  # 2x2 square centred at (0, 0): rows -1..0, cols -1..0 -> only (0, 0)
    out = dsa(x, _params(dsa, x.shape, ["cutout"], cutout=[0, 0]))
    expected = torch.ones(4, 4)
    expected[0, 0] = 0
    assert torch.equal(out[0, 0], expected)


def test_dsa_colour_ops_by_hand():
    dsa = DSA(brightness=1.0, saturation=2.0, contrast=0.5)
    x = torch.randn(2, 3, 4, 4)
    # saturation factor u * 2 = 1 and contrast factor u + 0.5 = 1: a pure brightness shift of 0.8 - 0.5
    p = _params(dsa, x.shape, ["color"], brightness=0.8, saturation=0.5, contrast=0.5)
    assert torch.allclose(dsa(x, p), x + 0.3, atol=1e-6)
    # every factor active, against numpy
    dsa = DSA(brightness=0.6, saturation=1.5, contrast=0.25)
    p = _params(dsa, x.shape, ["color"], brightness=0.1, saturation=0.3, contrast=0.7)
    a = x.double().numpy() + (0.1 - 0.5) * 0.6
    m = a.mean(axis=1, keepdims=True)
    a = (a - m) * (0.3 * 1.5) + m
    m = a.mean(axis=(1, 2, 3), keepdims=True)
    a = (a - m) * (0.7 + 0.25) + m
    assert np.allclose(dsa(x, p).double().numpy(), a, atol=1e-5)


def test_dsa_scale_and_rotate_grids():
    dsa = DSA(ratio_scale=2.0, ratio_rotate=90.0)
    ramp = torch.arange(4, dtype=torch.float32).repeat(4, 1).view(1, 1, 4, 4)  # value = column index
    out = dsa(ramp, _params(dsa, ramp.shape, ["scale"], scale=[0.5, 1.0]))  # zoom x2 along the width
    # column c samples normalised x = 0.5 * ((2c + 1)/4 - 1), i.e. pixel ((x + 1) * 4 - 1) / 2
    assert torch.allclose(out[0, 0], torch.tensor([0.75, 1.25, 1.75, 2.25]).repeat(4, 1), atol=1e-6)
    x = torch.randn(1, 2, 5, 5)
    out = dsa(x, _params(dsa, x.shape, ["rotate"], rotate=math.pi / 2))
    expected = torch.empty_like(x)
    for r in range(5):
        for c in range(5):  # grid (x_in, y_in) = (-y_out, x_out): out[r, c] = in[c, 4 - r]
            expected[:, :, r, c] = x[:, :, c, 4 - r]
    assert torch.allclose(out, expected, atol=1e-5)


def test_dsa_is_differentiable_in_the_images():
    dsa = DSA(mode="all")
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, 3, 8, 8)
    for seed in range(3):
        x.grad = None
        (dsa(x, dsa.sample(x.shape, torch.Generator().manual_seed(seed))) * w).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["single", "all"]))
def test_dsa_siamese_draw_transforms_every_image_alike(seed, mode):
    dsa = DSA(mode=mode)
    gen = torch.Generator().manual_seed(seed)
    real, syn = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(5, 3, 8, 8, generator=gen)
    p = dsa.sample(real.shape, gen)
    both = dsa(torch.cat([real, syn]), p)
    assert torch.allclose(both, torch.cat([dsa(real, p), dsa(syn, p)]), atol=1e-6)
    for i in range(3):  # each image is transformed as it would be alone
        assert torch.allclose(dsa(real, p)[i], dsa(real[i:i + 1], p)[0], atol=1e-6)
    # the same image in two batches gets the same transformation
    assert torch.allclose(dsa(torch.cat([real[:1], syn]), p)[0], both[0], atol=1e-6)


def test_dsa_sample_ranges():
    dsa = DSA()
    seen = set()
    for seed in range(60):
        p = dsa.sample((4, 1, 28, 28), torch.Generator().manual_seed(seed), siamese=False)
        seen.update(p.ops)
        assert p.n == 4 and len(p.ops) == 1
        assert p.crop.abs().max() <= 4  # round(28 * 0.125) = 4 (3.5 rounds up)
        assert p.cutout.min() >= 0 and p.cutout.max() <= 28  # 14 is even: [0, 28]
        assert p.scale.min() >= 1 / 1.2 and p.scale.max() < 1.2
        assert p.rotate.abs().max() <= math.radians(15)
    assert seen == set(DSA_OPS)
    assert DSA(mode="all").sample((1, 1, 8, 8)).ops == DSA_OPS


def test_dsa_errors():
    with pytest.raises(ValueError, match="unknown groups \\['zoom'\\]"):
        DSA("color_zoom")
    dsa = DSA()
    p = dsa.sample((4, 1, 8, 8), siamese=False)
    with pytest.raises(ValueError, match="4 per-image draws but the batch has 2"):
        dsa(torch.zeros(2, 1, 8, 8), p)
    with pytest.raises(ValueError, match="drawn for images of size"):
        dsa(torch.zeros(4, 1, 9, 9), p)


# ---------------------------------------------------------------- adversarial loop

import copy  # noqa: E402

from distill.models.generators import ConvGenerator  # noqa: E402
from distill.synthesis.adversarial import (  # noqa: E402
    adversarial_distill,
    generator_step,
    l1_logits,
    student_step,
)


def _tiny_teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 5))


def _tiny_student(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))


def _tiny_generator(seed: int = 2) -> ConvGenerator:
    torch.manual_seed(seed)
    return ConvGenerator(latent_dim=6, image_size=8, channels=1, width=8)


def _trained_teacher() -> nn.Module:
    t = _tiny_teacher()
    with torch.no_grad():  # non-trivial running statistics
        t[1].running_mean.uniform_(-0.5, 0.5)
        t[1].running_var.uniform_(0.5, 2.0)
    return t.eval()


def test_l1_logits_by_hand():
    s = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    t = torch.tensor([[0.0, -1.0, 0.5], [2.0, 3.0, -1.0]])
    assert l1_logits(s, t).item() == pytest.approx((1 + 1 + 0 + 2 + 0 + 2) / 6)
    with pytest.raises(ValueError, match="one shape"):
        l1_logits(s, t[:, :2])


def _discrepancy(teacher, student, generator, z):
    with torch.no_grad():
        x = generator(z)
        return l1_logits(student(x), teacher(x)).item()


def test_generator_step_increases_and_student_step_decreases_the_discrepancy():
    teacher, student, generator = _trained_teacher(), _tiny_student(), _tiny_generator()
    z = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    before = _discrepancy(teacher, student, generator, z)
    s_before = copy.deepcopy(student.state_dict())
    loss_g, d = generator_step(teacher, student, generator, torch.optim.SGD(generator.parameters(), lr=0.05), z)
    assert d == pytest.approx(before, rel=1e-5) and loss_g == pytest.approx(-before, rel=1e-5)
    after_g = _discrepancy(teacher, student, generator, z)
    assert after_g > before
    assert all(torch.equal(s_before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())  # the generator step trains the generator only
    g_before = copy.deepcopy(generator.state_dict())
    d_s = student_step(teacher, student, generator, torch.optim.SGD(student.parameters(), lr=0.05), z)
    assert d_s == pytest.approx(after_g, rel=1e-5)
    assert _discrepancy(teacher, student, generator, z) < after_g
    assert all(torch.equal(g_before[k], v) for k, v in generator.state_dict().items() if "running" not in k
               and "num_batches" not in k)


def test_generator_step_objective_against_a_hand_written_step():
    teacher, student, generator = _trained_teacher(), _tiny_student(), _tiny_generator()
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(6))
    reference = copy.deepcopy(generator)

    def extra(*, images, z, teacher_logits, student_logits):  # an extra generator term, weight 0.7
        return 0.7 * images.pow(2).mean() + 0.1 * teacher_logits.mean()

    generator_step(teacher, student, generator, torch.optim.SGD(generator.parameters(), lr=0.1), z,
                   generator_loss=extra)
    x = reference(z)
    t, s = teacher(x), student(x)
    objective = -(s - t).abs().sum() / s.numel() + 0.7 * (x ** 2).sum() / x.numel() + 0.1 * t.sum() / t.numel()
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    for (name, p), p0, g in zip(generator.named_parameters(), reference.parameters(), grads):
        assert torch.allclose(p, p0 - 0.1 * g, atol=1e-6), name


def _val_batches():
    g = torch.Generator().manual_seed(9)
    return [(torch.randn(10, 1, 8, 8, generator=g), torch.randint(0, 5, (10,), generator=g)) for _ in range(2)]


def test_adversarial_loop_keeps_the_teacher_frozen_and_evaluates(tmp_path):
    teacher = _trained_teacher()
    teacher.train()  # the loop puts it in eval mode and restores the caller's mode after
    before = copy.deepcopy(teacher.state_dict())
    student, generator = _tiny_student(), _tiny_generator()
    s0 = copy.deepcopy(student.state_dict())
    out = adversarial_distill(teacher, student, generator, iterations=3, student_steps=2, generator_steps=1,
                              batch_size=8, latent_dim=6, lr_student=0.05, lr_generator=0.01,
                              val_loader=_val_batches(), eval_every=2, seed=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # weights and BN buffers
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(s0[k], v) for k, v in student.state_dict().items())
    assert [r["epoch"] for r in out.history] == [2, 3]
    assert {"student_acc", "teacher_acc", "agreement", "loss_student", "discrepancy"} <= set(out.history[0])
    assert out.last_acc == out.history[-1]["student_acc"] and out.best_acc == max(r["student_acc"] for r in out.history)


def test_adversarial_loop_resumes_exactly(tmp_path):
    kw = dict(student_steps=2, generator_steps=1, batch_size=8, latent_dim=6, lr_student=0.05, lr_generator=0.01,
              eval_every=2, seed=4, progress=False, lr_milestones=[3], lr_gamma=0.5)
    whole_student, whole_gen = _tiny_student(), _tiny_generator()
    whole = adversarial_distill(_trained_teacher(), whole_student, whole_gen, iterations=4, run_dir=tmp_path / "a",
                                **kw)
    adversarial_distill(_trained_teacher(), _tiny_student(), _tiny_generator(), iterations=2, run_dir=tmp_path / "b",
                        **kw)
    student, gen = _tiny_student(seed=11), _tiny_generator(seed=12)  # other weights: the checkpoint replaces them
    resumed = adversarial_distill(_trained_teacher(), student, gen, iterations=4, run_dir=tmp_path / "b", **kw)
    for k, v in whole_student.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    for k, v in whole_gen.state_dict().items():
        assert torch.equal(gen.state_dict()[k], v), k
    assert [r["epoch"] for r in resumed.history] == [2, 4]
    assert resumed.history[-1]["loss_student"] == whole.history[-1]["loss_student"]
    assert (tmp_path / "b" / "last.pt").exists() and (tmp_path / "b" / "student.safetensors").exists()
    with pytest.raises(ValueError, match="settings"):
        adversarial_distill(_trained_teacher(), student, gen, iterations=5, run_dir=tmp_path / "b",
                            **{**kw, "lr_student": 0.1})


def test_adversarial_loop_errors_before_training():
    with pytest.raises(ValueError, match="latent_dim=7"):
        adversarial_distill(_trained_teacher(), _tiny_student(), _tiny_generator(), iterations=1, batch_size=4,
                            latent_dim=7, progress=False)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"teacher logits \(2, 5\) and student logits \(2, 3\)"):
        adversarial_distill(_trained_teacher(), wrong, _tiny_generator(), iterations=1, batch_size=4, latent_dim=6,
                            progress=False)
    with pytest.raises(ValueError, match="iterations must be an int >= 1; got 0"):
        adversarial_distill(_trained_teacher(), _tiny_student(), _tiny_generator(), iterations=0, progress=False)


class _NeverRead:
    def __iter__(self):
        raise AssertionError("the training loader was read")

    def __len__(self):
        raise AssertionError("the training loader was read")


def test_dfad_strategy_never_reads_the_training_loader():
    from distill.strategies.data_free_dfad import dfad

    teacher = _trained_teacher()
    before = copy.deepcopy(teacher.state_dict())
    out = dfad(_tiny_student(), _NeverRead(), _val_batches(), teacher=teacher, generator=_tiny_generator(),
               image_shape=(1, 8, 8), iterations=2, student_steps=1, batch_size=4, latent_dim=6, eval_every=1,
               progress=False)
    assert len(out.history) == 2
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_adversarial_loop_lr_milestones_scale_both_learning_rates():
    kw = dict(student_steps=1, generator_steps=1, batch_size=8, latent_dim=6, lr_student=0.05, lr_generator=0.01,
              seed=5, progress=False, lr_milestones=[1], lr_gamma=0.0)  # learning rates 0 after the first iteration
    models = []
    for iterations in (1, 3):
        student, gen = _tiny_student(), _tiny_generator()
        adversarial_distill(_trained_teacher(), student, gen, iterations=iterations, eval_every=1, **kw)
        models.append((student, gen))
    (s1, g1), (s3, g3) = models
    assert all(torch.equal(a, b) for a, b in zip(s1.parameters(), s3.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g1.parameters(), g3.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(s1.parameters(), _tiny_student().parameters()))
