"""Diffusion distillation (issue 16, G1): Meng et al. 2023 (arXiv 2210.03142) stage one and Salimans & Ho
2022 (arXiv 2202.00512) progressive distillation. The math is checked on numbers worked out here by hand
(``math``/numpy on scalars), against diffusers' own DDIMScheduler, and by the closed-form property that one
student step on the target reproduces the teacher's two-step endpoint."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.functional.diffusion import (cosine_alpha_sigma, ddim_sample, ddim_step, diffusion_snr_weight,
                                          diffusion_weighted_mse, guided_x, progressive_target, x_from_v)

torch.set_num_threads(1)


def _cs(t: float) -> tuple[float, float]:
    return math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)


# ----------------------------------------------------------------------------- pure math


def test_cosine_schedule_by_hand() -> None:
    a, s = cosine_alpha_sigma(torch.tensor([0.0, 1 / 3, 0.5, 1.0]))
    assert torch.allclose(a, torch.tensor([1.0, math.sqrt(3) / 2, math.sqrt(0.5), 0.0]), atol=1e-6)
    assert torch.allclose(s, torch.tensor([0.0, 0.5, math.sqrt(0.5), 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="t must lie in"):
        cosine_alpha_sigma(torch.tensor([1.5]))


def test_ddim_step_by_hand() -> None:
    # z_t = 1, x_hat = 0.5, t = 0.5 -> s = 0.25: z_s = a_s x + (s_s / s_t)(z - a_t x)
    a_t, s_t = math.sqrt(0.5), math.sqrt(0.5)
    a_s, s_s = 0.9238795325112867, 0.3826834323650898  # cos(pi/8), sin(pi/8)
    expect = a_s * 0.5 + (s_s / s_t) * (1.0 - a_t * 0.5)  # = 0.46194 + 0.541196 * 0.646447 = 0.811794
    assert abs(expect - 0.811794) < 1e-5
    got = ddim_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([a_t]), torch.tensor([s_t]),
                    torch.tensor([a_s]), torch.tensor([s_s]))
    assert abs(float(got) - expect) < 1e-6


def test_guided_x_by_hand() -> None:
    xc, xu = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[0.5, -1.0], [2.0, 1.0]])
    # row 0 with w = 2: 3 * [1, 2] - 2 * [0.5, -1] = [2, 8]; row 1 with w = 0: x_c itself
    assert torch.allclose(guided_x(xc, xu, torch.tensor([2.0, 0.0])), torch.tensor([[2.0, 8.0], [0.0, 1.0]]))


def test_snr_weights_by_hand() -> None:
    a, s = cosine_alpha_sigma(torch.tensor([1 / 3, 0.75]))
    snr_low = math.tan(math.pi / 8) ** 2  # t = 0.75: cot^2(3 pi / 8) = tan^2(pi / 8) = 0.171573
    assert torch.allclose(diffusion_snr_weight(a, s, "truncated_snr"), torch.tensor([3.0, 1.0]), atol=1e-5)
    assert torch.allclose(diffusion_snr_weight(a, s, "snr+1"), torch.tensor([4.0, 1 + snr_low]), atol=1e-5)
    assert torch.allclose(diffusion_snr_weight(a, s, "snr"), torch.tensor([3.0, snr_low]), atol=1e-5)
    with pytest.raises(ValueError, match="kind must be one of"):
        diffusion_snr_weight(a, s, "min_snr")


def test_weighted_mse_by_hand() -> None:
    xs = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    xt = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # per-sample means of squares: (1 + 4) / 2 = 2.5 and 1; weights 2 and 3: (5 + 3) / 2 = 4
    assert float(diffusion_weighted_mse(xs, xt, torch.tensor([2.0, 3.0]))) == pytest.approx(4.0)


@settings(max_examples=25, deadline=None)
@given(t=st.floats(0.02, 0.98), seed=st.integers(0, 1000))
def test_snr_plus_one_x_loss_is_the_v_loss(t: float, seed: int) -> None:
    # (SNR + 1) ||x - x_hat||^2 = ||v - v_hat||^2 for a VP process (Salimans & Ho, Sec. 4)
    g = torch.Generator().manual_seed(seed)
    x, eps, v_hat = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    a, s = cosine_alpha_sigma(torch.full((3,), t, dtype=torch.float64))
    z = a[:, None] * x + s[:, None] * eps
    v = a[:, None] * eps - s[:, None] * x
    lhs = diffusion_weighted_mse(x_from_v(z, v_hat, a, s), x, diffusion_snr_weight(a, s, "snr+1"))
    assert float(lhs) == pytest.approx(float(((v - v_hat) ** 2).mean()), rel=1e-9)


def _np_ddim(z: np.ndarray, x: np.ndarray, t: float, s: float) -> np.ndarray:
    (at, st_), (as_, ss) = _cs(t), _cs(s)
    return as_ * x + ss / st_ * (z - at * x)


@pytest.mark.parametrize("t,n", [(1.0, 4), (0.75, 4), (0.5, 2), (0.25, 4)])
def test_progressive_target_one_student_step_lands_on_two_teacher_steps(t: float, n: int) -> None:
    """The closed form: x_tilde is the x for which ONE DDIM step t -> t'' reproduces the teacher's TWO steps."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1, 6))

    def teacher_x(zz: np.ndarray, tt: float) -> np.ndarray:  # any deterministic denoiser
        return np.tanh(zz) * 0.7 + 0.3 * tt

    t1, t2 = t - 0.5 / n, max(t - 1.0 / n, 0.0)
    z1 = _np_ddim(z, teacher_x(z, t), t, t1)
    z2 = _np_ddim(z1, teacher_x(z1, t1), t1, t2) if t2 > 0 else teacher_x(z1, t1)
    (a, s), (a2, s2) = _cs(t), _cs(t2)
    x_tilde = progressive_target(torch.tensor(z), torch.tensor(z2), a, s, a2, s2).numpy()
    one_step = a2 * x_tilde + s2 / s * (z - a * x_tilde)  # the student's DDIM step, written out
    np.testing.assert_allclose(one_step, z2, atol=1e-9)
    if t2 == 0:
        np.testing.assert_allclose(x_tilde, z2, atol=1e-12)  # last step: the target is the teacher's endpoint


def test_progressive_target_scalar_by_hand() -> None:
    # t = 1/2, t'' = 1/4 (N = 2 student steps... t'' = t - 1/4 with N_s = 4): z_t = 1, z_t'' = 0.6
    a, s = math.sqrt(0.5), math.sqrt(0.5)
    a2, s2 = 0.9238795325112867, 0.3826834323650898
    r = s2 / s  # 0.5411961
    expect = (0.6 - r * 1.0) / (a2 - r * a)  # = 0.0588039 / 0.5411961 = 0.1086557
    assert abs(expect - 0.108656) < 1e-5
    got = progressive_target(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.6]], dtype=torch.float64),
                             a, s, a2, s2)
    assert float(got) == pytest.approx(expect, rel=1e-12)


def test_ddim_sample_matches_a_loop_written_out() -> None:
    z0 = torch.tensor([[0.3, -1.2]], dtype=torch.float64)

    def den(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + 0.1 * t[:, None]

    got = ddim_sample(den, z0.clone(), 3)
    z = z0.numpy()
    for i in (3, 2, 1):
        x = 0.5 * z + 0.1 * (i / 3)
        z = x if i == 1 else _np_ddim(z, x, i / 3, (i - 1) / 3)
    np.testing.assert_allclose(got.numpy(), z, atol=1e-12)


def test_ddim_step_matches_diffusers_ddim_scheduler() -> None:
    pytest.importorskip("diffusers")
    from distill.integrations.diffusers import ddim_scheduler

    T = 20
    grid = torch.arange(1, T + 1, dtype=torch.float64) / T  # timestep k <-> t = (k + 1) / T
    sched = ddim_scheduler(torch.cos(0.5 * math.pi * grid) ** 2)
    sched.set_timesteps(5)  # "leading": timesteps 16, 12, 8, 4, 0; prev = k - 4
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 1, 3, 3, generator=g)
    ref = sched.step(v, 11, z, eta=0.0).prev_sample  # t = 0.6 -> prev timestep 7, t = 0.4
    (a, s), (a2, s2) = _cs(0.6), _cs(0.4)
    ours = ddim_step(z, x_from_v(z, v, a, s), a, s, a2, s2)
    assert torch.allclose(ours, ref.to(ours.dtype), atol=1e-5)


# ----------------------------------------------------------------------------- models and strategies

# the tests below need diffusers; those above are pure math and run without it
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                 reason="diffusers is not installed: pip install 'distill[generative]'")

from distill.integrations.diffusers import build_unet  # noqa: E402
from distill.strategies.diffusion_distill import (guided_diffusion_distill, guided_distill_loss,  # noqa: E402
                                                  load_diffusion_model, progressive_distill, progressive_distill_loss,
                                                  sample_diffusion, save_diffusion_model, train_diffusion_teacher)


def _tiny(seed: int = 0, **kw: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_unet(img_size=8, channels=1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4,
                   attention=False, **kw)
    return m.eval()


def _x_of(model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None
          ) -> torch.Tensor:
    """x_hat = alpha z - sigma v_hat, written with math.cos / math.sin per sample."""
    v = model(z, t, c) if w is None else model(z, t, c, w)
    out = torch.empty_like(z)
    for b in range(z.shape[0]):
        a, s = _cs(float(t[b]))
        out[b] = a * z[b] - s * v[b]
    return out


@needs_diffusers
def test_guided_distill_loss_matches_a_plain_reference() -> None:
    teacher = _tiny(0)
    student = teacher.with_guidance_input()
    with torch.no_grad():  # make the student differ from the teacher, and depend on w
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(3, 1, 8, 8, generator=g)
    c = torch.tensor([0, 2, 1])
    t = torch.tensor([0.2, 0.55, 0.9])
    w = torch.tensor([0.5, 3.0, 1.5])
    got = guided_distill_loss(student, teacher, x, c, t, w, eps, "truncated_snr")
    ref = 0.0
    with torch.no_grad():
        for b in range(3):
            a, s = _cs(float(t[b]))
            z = a * x[b:b + 1] + s * eps[b:b + 1]
            tb, cb = t[b:b + 1], c[b:b + 1]
            x_c = _x_of(teacher, z, tb, cb)
            x_u = _x_of(teacher, z, tb, torch.tensor([3]))  # the null label
            target = (1 + float(w[b])) * x_c - float(w[b]) * x_u
            x_s = _x_of(student, z, tb, cb, w[b:b + 1])
            ref += max((a / s) ** 2, 1.0) * float(((x_s - target) ** 2).mean())
    assert float(got.detach()) == pytest.approx(ref / 3, rel=1e-4)


@needs_diffusers
def test_progressive_loss_matches_a_plain_reference() -> None:
    teacher = _tiny(0).with_guidance_input()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = _tiny(0).with_guidance_input()  # a different student than the teacher
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(2, 1, 8, 8, generator=g)
    c, w, i, n = torch.tensor([1, 0]), torch.tensor([2.0, 0.5]), torch.tensor([4, 2]), 4
    got = progressive_distill_loss(student, teacher, x, c, i, n, w, eps, "snr+1")
    ref = 0.0
    with torch.no_grad():
        for b in range(2):
            t = int(i[b]) / n
            t1, t2 = t - 0.5 / n, t - 1 / n
            (a, s), (a1, s1), (a2, s2) = _cs(t), _cs(t1), _cs(t2)
            z = a * x[b:b + 1] + s * eps[b:b + 1]
            cb, wb = c[b:b + 1], w[b:b + 1]
            xt = _x_of(teacher, z, torch.tensor([t]), cb, wb)
            z1 = a1 * xt + s1 / s * (z - a * xt)
            xt1 = _x_of(teacher, z1, torch.tensor([t1]), cb, wb)
            z2 = a2 * xt1 + s2 / s1 * (z1 - a1 * xt1)
            x_tilde = (z2 - s2 / s * z) / (a2 - s2 / s * a)
            x_s = _x_of(student, z, torch.tensor([t]), cb, wb)
            ref += ((a / s) ** 2 + 1) * float(((x_s - x_tilde) ** 2).mean())
    assert float(got.detach()) == pytest.approx(ref / 2, rel=1e-4)


@needs_diffusers
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 100), t=st.floats(0.05, 1.0))
def test_stage_one_loss_is_zero_for_the_teacher_copy_at_w0_and_grads_reach_only_the_student(seed: int, t: float) -> None:
    teacher = _tiny(0)
    student = teacher.with_guidance_input()  # zero-initialised w input: the conditional teacher exactly
    g = torch.Generator().manual_seed(seed)
    x, eps = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.randn(2, 1, 8, 8, generator=g)
    c, tt = torch.tensor([0, 1]), torch.full((2,), t)
    zero = guided_distill_loss(student, teacher, x, c, tt, torch.zeros(2), eps)
    assert float(zero.detach()) == pytest.approx(0, abs=1e-10)
    loss = guided_distill_loss(student, teacher, x, c, tt, torch.full((2,), 2.0), eps)
    assert float(loss.detach()) > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@needs_diffusers
def test_unet_conditioning_and_errors() -> None:
    m = _tiny(0)
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    assert m(z, t, torch.tensor([0, 1])).shape == (2, 1, 8, 8)
    assert not torch.allclose(m(z, t, torch.tensor([0, 1])), m(z, t, torch.tensor([2, 2])))  # labels matter
    assert torch.allclose(m(z, t), m(z, t, torch.tensor([3, 3])))  # None = the null label
    s = m.with_guidance_input()
    with pytest.raises(ValueError, match="pass w"):
        s(z, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="without a guidance-strength input"):
        m(z, t, torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="divisible by 2"):
        build_unet(img_size=10, block_out_channels=(8, 16, 16), norm_num_groups=4)


@needs_diffusers
def test_teacher_training_checkpoint_and_strategies_run(tmp_path: object) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 3, (32,), generator=g)
    teacher = _tiny(1)
    res = train_diffusion_teacher(teacher, images, labels, steps=4, batch_size=8, progress=False,
                                  checkpoint=tmp_path / "teacher.safetensors")  # type: ignore[operator]
    assert res.history and res.history[-1]["step"] == 4
    again = load_diffusion_model(tmp_path / "teacher.safetensors", _tiny(5))  # type: ignore[operator]
    z, t, c = torch.randn(2, 1, 8, 8), torch.tensor([0.4, 0.9]), torch.tensor([0, 2])
    assert torch.allclose(again(z, t, c), teacher(z, t, c))

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    one = guided_diffusion_distill(teacher=teacher, images=images, labels=labels, steps=3, batch_size=8, w_min=1.0,
                                   w_max=2.0, progress=False)
    assert one.model.w_conditioned and len(one.history) == 1
    two = progressive_distill(teacher=one.model, images=images, labels=labels, start_steps=4, rounds=2,
                              steps_per_round=2, batch_size=8, w_min=1.0, w_max=2.0, progress=False,
                              run_dir=tmp_path)
    assert [r["steps"] for r in two.rounds] == [2, 1] and two.sampling_steps == 1
    assert (tmp_path / "student_1steps.safetensors").is_file()  # type: ignore[operator]
    for k, v in teacher.state_dict().items():  # the teachers stay untouched
        assert torch.equal(v, before[k]), k
    out = sample_diffusion(two.model, torch.tensor([0, 1, 2]), steps=1, w=1.5)
    assert out.shape == (3, 1, 8, 8) and float(out.abs().max()) <= 1
    # a plain classifier-free teacher with a fixed guidance strength (two evaluations per teacher step)
    plain = progressive_distill(teacher=teacher, images=images, labels=labels, start_steps=2, rounds=1,
                                steps_per_round=1, batch_size=4, guidance_w=1.0, progress=False)
    assert not plain.model.w_conditioned


@needs_diffusers
def test_strategy_argument_errors() -> None:
    teacher = _tiny(0)
    with pytest.raises(ValueError, match="power of two"):
        progressive_distill(teacher=teacher, images=torch.zeros(2, 1, 8, 8), labels=torch.zeros(2), start_steps=6)
    with pytest.raises(ValueError, match="w_min <= w_max"):
        guided_diffusion_distill(teacher=teacher, images=torch.zeros(2, 1, 8, 8), labels=torch.zeros(2), w_min=3,
                                 w_max=1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_diffusion_teacher(teacher, torch.full((2, 1, 8, 8), 3.0), torch.zeros(2, dtype=torch.long), steps=1,
                                progress=False)
    with pytest.raises(ValueError, match="plain classifier-free"):
        guided_diffusion_distill(teacher=teacher.with_guidance_input(), images=torch.zeros(2, 1, 8, 8),
                                 labels=torch.zeros(2))


@needs_diffusers
def test_registered_with_papers() -> None:
    from distill.strategies.registry import strategy_info

    assert strategy_info("guided_diffusion_distill").paper.arxiv == "2210.03142"
    assert strategy_info("progressive_distill").paper.arxiv == "2202.00512"


@needs_diffusers
def test_save_load_roundtrip_w_conditioned(tmp_path: object) -> None:
    s = _tiny(0).with_guidance_input()
    with torch.no_grad():
        for p in s.w_embed.parameters():
            p.add_(0.1)
    save_diffusion_model(tmp_path / "s.safetensors", s, {"steps": 4})  # type: ignore[operator]
    r = load_diffusion_model(tmp_path / "s.safetensors", _tiny(3).with_guidance_input())  # type: ignore[operator]
    z, t, c, w = torch.randn(1, 1, 8, 8), torch.tensor([0.5]), torch.tensor([1]), torch.tensor([2.0])
    assert torch.allclose(r(z, t, c, w), s(z, t, c, w))


# ----------------------------------------------------------------------------- Meng et al.'s stochastic sampler

from distill.strategies.diffusion_distill import renoise, stochastic_ddim_sample  # noqa: E402


def test_renoise_by_hand() -> None:
    # s = 1/4 -> t = 1/2: alpha_t / alpha_s = cos(pi/4) / cos(pi/8) = 0.7653669,
    # sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 = 0.5 - 0.5857864 * 0.1464466 = 0.4142136 (= sqrt(2) - 1)
    a_s, s_s = 0.9238795325112867, 0.3826834323650898
    a_t, s_t = math.sqrt(0.5), math.sqrt(0.5)
    ratio, var = a_t / a_s, s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
    assert abs(ratio - 0.7653669) < 1e-6 and abs(var - (math.sqrt(2) - 1)) < 1e-9
    z_s, eps = torch.tensor([[2.0, -1.0]], dtype=torch.float64), torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    f = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = renoise(z_s, f(a_s), f(s_s), f(a_t), f(s_t), eps)
    expect = [ratio * 2.0 + math.sqrt(var) * 0.5, ratio * -1.0 + math.sqrt(var) * 1.5]  # [1.8525, 0.2001]
    np.testing.assert_allclose(got.numpy()[0], expect, rtol=1e-12)
    # from data (s = 0): alpha_t x + sigma_t eps
    got0 = renoise(z_s, f(1.0), f(0.0), f(a_t), f(s_t), eps)
    np.testing.assert_allclose(got0.numpy()[0], [a_t * 2.0 + s_t * 0.5, -a_t + s_t * 1.5], rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(s=st.floats(0.0, 0.9), gap=st.floats(0.01, 0.09), seed=st.integers(0, 1000))
def test_renoise_has_the_forward_marginal(s: float, gap: float, seed: int) -> None:
    # x -> z_s ~ q(z_s|x) -> z_t ~ q(z_t|z_s) must be q(z_t|x): mean alpha_t x, variance sigma_t^2 per coordinate
    t = s + gap
    g = torch.Generator().manual_seed(seed)
    n = 20000
    x = torch.full((n, 1), 0.8, dtype=torch.float64)
    (a_s, s_s), (a_t, s_t) = _cs(s), _cs(t)
    z_s = a_s * x + s_s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    z_t = renoise(z_s, torch.full((n,), a_s, dtype=torch.float64), torch.full((n,), s_s, dtype=torch.float64),
                  torch.full((n,), a_t, dtype=torch.float64), torch.full((n,), s_t, dtype=torch.float64),
                  torch.randn(n, 1, generator=g, dtype=torch.float64))
    assert float(z_t.mean()) == pytest.approx(a_t * 0.8, abs=0.03)
    assert float(z_t.var()) == pytest.approx(s_t ** 2, rel=0.06, abs=1e-3)


def _np_stochastic(z: np.ndarray, den, n: int, eps: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Meng et al.'s N-step stochastic sampler written out: DDIM t -> t - 2/N, then z_{t-1/N} =
    (alpha_{t-1/N} / alpha_{t-2/N}) z_{t-2/N} + sqrt(sigma_{t-1/N}^2 - (alpha ratio)^2 sigma_{t-2/N}^2) eps;
    last step x_hat(z_{1/N}). Returns the sample and the times the denoiser saw."""
    seen = []
    for i in range(n, 0, -1):
        t = i / n
        x = den(z, t)
        seen.append(t)
        if i == 1:
            return x, seen
        t2, t1 = (i - 2) / n, (i - 1) / n
        z2 = _np_ddim(z, x, t, t2) if i > 2 else x  # at i = 2 the long step lands on t = 0: x_hat itself
        (a2, s2), (a1, s1) = _cs(t2), _cs(t1)
        r = a1 / a2
        z = r * z2 + math.sqrt(s1 ** 2 - r ** 2 * s2 ** 2) * eps[n - i]
    raise AssertionError


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_stochastic_sampler_matches_a_loop_written_out(n: int) -> None:
    rng = np.random.default_rng(n)
    z0 = rng.normal(size=(2, 3))
    eps = rng.normal(size=(max(n - 1, 0), 2, 3))

    def den_np(z: np.ndarray, t: float) -> np.ndarray:
        return np.tanh(0.8 * z) + 0.2 * t

    seen: list[float] = []

    def den(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(float(t[0]))
        assert torch.all(t == t[0])
        return torch.tanh(0.8 * z) + 0.2 * t[:, None]

    got = stochastic_ddim_sample(den, torch.tensor(z0), n, noise=torch.tensor(eps))
    expect, times = _np_stochastic(z0, den_np, n, eps)
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-12)
    assert seen == pytest.approx(times) and len(seen) == n  # N evaluations at t = 1, (N-1)/N, ..., 1/N


def test_stochastic_sampler_with_zero_noise_is_the_deterministic_alpha_rescaled_path() -> None:
    # eps = 0: each step is DDIM(t -> t - 2/N) then a rescale by alpha_{t-1/N} / alpha_{t-2/N}; by hand for N = 3
    # with the denoiser x_hat = 0.5 z (cos(pi/6) = 0.8660254, sin(pi/6) = 0.5, cos(pi/3) = 0.5):
    # z_1 = 1, x = 0.5; DDIM 1 -> 1/3: 0.8660254 * 0.5 + (0.5 / 1) * (1 - 0 * 0.5) = 0.9330127;
    # rescale to 2/3: * 0.5 / 0.8660254 -> 0.5386751; x = 0.2693376; DDIM 2/3 -> 0 lands on x: 0.2693376;
    # rescale to 1/3: * 0.8660254 / 1 -> 0.2332532; the last step returns x_hat = 0.1166266
    def den(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * z

    got = stochastic_ddim_sample(den, torch.ones(1, 1, dtype=torch.float64), 3,
                                 noise=torch.zeros(2, 1, 1, dtype=torch.float64))
    assert float(got) == pytest.approx(0.1166266, abs=1e-7)
    c6 = math.cos(math.pi / 6)
    exact = 0.5 * (c6 * (0.5 * ((0.5 * c6 + 0.5) * 0.5 / c6)))  # the chain above, unrounded
    assert float(got) == pytest.approx(exact, rel=1e-12)
    # the deterministic N-step DDIM differs (no rescale, steps of 1/N): the stochastic path is not DDIM's
    assert float(ddim_sample(den, torch.ones(1, 1, dtype=torch.float64), 3)) != pytest.approx(float(got), rel=1e-3)


def test_stochastic_sampler_one_step_is_deterministic_and_errors() -> None:
    z = torch.randn(2, 1, 4, 4)
    den = lambda z, t: 0.3 * z  # noqa: E731
    assert torch.equal(stochastic_ddim_sample(den, z, 1), ddim_sample(den, z, 1))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        stochastic_ddim_sample(den, z, 0)
    with pytest.raises(ValueError, match=r"noise must be \(steps - 1, \*z.shape\)"):
        stochastic_ddim_sample(den, z, 3, noise=torch.zeros(3, 2, 1, 4, 4))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = stochastic_ddim_sample(den, z, 4, generator=g1), stochastic_ddim_sample(den, z, 4, generator=g2)
    assert torch.equal(a, b) and not torch.allclose(a, ddim_sample(den, z, 4))


@needs_diffusers
def test_sample_diffusion_stochastic_matches_a_written_out_loop_and_counts_evaluations() -> None:
    model = _tiny(0).with_guidance_input()
    with torch.no_grad():
        for p in model.w_embed.parameters():
            p.add_(0.1)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    labels, n, w, seed = torch.tensor([0, 2, 1]), 3, 1.5, 7
    got = sample_diffusion(model, labels, n, w=w, seed=seed, batch_size=2, stochastic=True)
    assert sum(calls) == n * 3 and len(calls) == n * 2  # N evaluations per sample (batches of 2 and 1)
    # the noises as documented: z_1 (N, C, H, W) from Generator(seed), then the re-noising eps (N, steps - 1, ...)
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn((3, 1, 8, 8), generator=gen)
    eps = torch.randn((3, n - 1, 1, 8, 8), generator=gen)
    assert not torch.allclose(eps[:, 0], z1)  # the re-noising noise is not z_1 again
    with torch.no_grad():
        for b in range(3):
            z = z1[b:b + 1]
            cb, wb = labels[b:b + 1], torch.tensor([w])
            for i in range(n, 0, -1):
                t = i / n
                x = _x_of(model, z, torch.tensor([t]), cb, wb)
                if i == 1:
                    break
                (a, s), (a2, s2), (a1, s1) = _cs(t), _cs((i - 2) / n), _cs((i - 1) / n)
                z2 = a2 * x + s2 / s * (z - a * x)
                z = a1 / a2 * z2 + math.sqrt(s1 ** 2 - (a1 / a2) ** 2 * s2 ** 2) * eps[b, n - i]
            assert torch.allclose(got[b:b + 1], x.clamp(-1, 1), atol=1e-5), b
    # batch size does not change the samples; one step is the deterministic sampler (same z_1)
    assert torch.allclose(sample_diffusion(model, labels, n, w=w, seed=seed, batch_size=3, stochastic=True), got,
                          atol=1e-6)
    assert torch.allclose(sample_diffusion(model, labels, 1, w=w, seed=seed, stochastic=True),
                          sample_diffusion(model, labels, 1, w=w, seed=seed), atol=1e-6)
    # a plain classifier-free model with w: two evaluations per step, batched in one call
    calls.clear()
    plain = _tiny(1)
    plain.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = sample_diffusion(plain, labels, 2, w=1.0, seed=seed, stochastic=True)
    assert out.shape == (3, 1, 8, 8) and calls == [6, 6]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample_diffusion(model, labels, 0, w=w, stochastic=True)
