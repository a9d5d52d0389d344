"""KD-MVS (Ding et al., ECCV 2022, arXiv 2207.10425) on the procedural multi-view stereo set: geometry,
losses, methods and the strategy, checked on numbers worked out independently (closed forms, numpy,
plain loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from distill import functional as DF
from distill.batch import DenseBatch
from distill.data.mvs import MVSScenes, look_at, pack_views, unpack_views
from distill.distiller import Distiller
from distill.methods import create_method, method_info
from distill.methods.mvs import KDMVS, MVSSelfSupervised
from distill.models import create
from distill.models.mvs import plane_sweep_warp, reproject, warp_by_depth
from distill.strategies.registry import strategy_info

torch.set_num_threads(1)


def _k(f: float, w: int, h: int) -> torch.Tensor:
    return torch.tensor([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])


def _proj(k: torch.Tensor, ext: torch.Tensor) -> torch.Tensor:
    k4 = torch.eye(4)
    k4[:3, :3] = k
    return k4 @ ext


def _translated(b: float) -> torch.Tensor:
    """Extrinsic of a camera at (b, 0, 0) looking down +z (R = I, t = -C)."""
    e = torch.eye(4)
    e[0, 3] = -b
    return e


@pytest.fixture(scope="module")
def scenes() -> MVSScenes:
    return MVSScenes(3, size=16, num_depths=16, seed=3, texture="noise")


# ----------------------------------------------------------------------------------------- geometry


def test_plane_sweep_matches_the_plane_homography_closed_form() -> None:
    h, w = 10, 12
    k_ref, k_src = _k(11.0, w, h), torch.tensor([[13.0, 0, 5.2], [0, 12.0, 4.7], [0, 0, 1.0]])
    ang = 0.08
    rot = torch.tensor([[math.cos(ang), 0, math.sin(ang)], [0, 1, 0], [-math.sin(ang), 0, math.cos(ang)]])
    ext = torch.eye(4)
    ext[:3, :3], ext[:3, 3] = rot, torch.tensor([-0.3, 0.05, 0.1])
    # a source "image" whose two channels are its own pixel coordinates: bilinear sampling is exact on it
    vv, uu = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    src = torch.stack([uu, vv])[None]
    depths = torch.tensor([2.0, 3.5])
    out = plane_sweep_warp(src, _proj(k_src, ext)[None], _proj(k_ref, torch.eye(4))[None], depths)
    assert out.shape == (1, 2, 2, h, w)
    for i, d in enumerate(depths.tolist()):
        # H = K_s (R + t nᵀ / d) K_r⁻¹ for the plane z = d (n = e_z) of the reference camera
        hom = k_src.numpy() @ (rot.numpy() + np.outer(ext[:3, 3].numpy(), [0, 0, 1.0]) / d) @ np.linalg.inv(k_ref.numpy())
        pix = np.stack([uu.numpy().ravel(), vv.numpy().ravel(), np.ones(h * w)])
        q = hom @ pix
        u2, v2 = (q[0] / q[2]).reshape(h, w), (q[1] / q[2]).reshape(h, w)
        inside = (u2 >= 0) & (u2 <= w - 1) & (v2 >= 0) & (v2 <= h - 1)
        assert inside.sum() > 0.5 * h * w
        np.testing.assert_allclose(out[0, 0, i].numpy()[inside], u2[inside], atol=1e-3)
        np.testing.assert_allclose(out[0, 1, i].numpy()[inside], v2[inside], atol=1e-3)


def test_warp_by_depth_of_a_fronto_parallel_plane_is_a_pixel_shift() -> None:
    h, w, f, b, d = 6, 9, 8.0, 0.5, 2.0                       # disparity f·b/d = 2 pixels
    k = _k(f, w, h)
    src = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    warped, valid = warp_by_depth(src, _proj(k, _translated(b))[None], _proj(k, torch.eye(4))[None],
                                  torch.full((1, h, w), d))
    # a reference pixel u sees the source pixel u - 2: valid for u >= 2
    assert valid[0, :, :2].sum() == 0 and bool(valid[0, :, 2:].all())
    torch.testing.assert_close(warped[0, :, :, 2:], src[0, :, :, :-2], atol=1e-5, rtol=0)
    uvz = reproject(_proj(k, _translated(b))[None], _proj(k, torch.eye(4))[None], torch.full((1, h, w), d))
    torch.testing.assert_close(uvz[0, 0, 2], torch.tensor([0.0, 0.0, d]), atol=1e-5, rtol=0)


def test_pack_and_unpack_views_round_trip() -> None:
    images, proj = torch.rand(2, 3, 3, 8, 8), torch.randn(2, 3, 4, 4)
    i2, p2 = unpack_views(pack_views(images, proj))
    assert torch.equal(i2, images) and torch.equal(p2, proj)
    with pytest.raises(ValueError, match="proj"):
        pack_views(images, proj[:, :2])


def test_look_at_points_the_optical_axis_at_the_target() -> None:
    e = look_at(torch.tensor([0.4, -0.1, 0.0]), torch.tensor([0.0, 0.0, 4.0]))
    cam = e @ torch.tensor([0.0, 0.0, 4.0, 1.0])
    torch.testing.assert_close(cam[:2], torch.zeros(2), atol=1e-6, rtol=0)
    assert cam[2] > 0
    torch.testing.assert_close(e[:3, :3] @ e[:3, :3].T, torch.eye(3), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- data


def test_scenes_are_deterministic_and_geometrically_consistent(scenes: MVSScenes) -> None:
    again = MVSScenes(3, size=16, num_depths=16, seed=3, texture="noise")
    assert torch.equal(again.images, scenes.images) and torch.equal(again.depth, scenes.depth)
    other = MVSScenes(3, size=16, num_depths=16, seed=4, texture="noise")
    assert not torch.equal(other.depth, scenes.depth)
    assert scenes.images.shape == (3, 3, 3, 16, 16) and scenes.proj.shape == (3, 3, 4, 4)
    # the rendered ground truth of the three views agrees with itself under reprojection
    _, _, mask = DF.cross_view_check(scenes.depth, scenes.proj, None, rel_depth=0.01, min_views=1)
    assert mask.float().mean() > 0.75
    wrong = scenes.depth.clone()
    wrong[:, 0] *= 1.1
    assert DF.cross_view_check(wrong, scenes.proj, None, rel_depth=0.01, min_views=1)[2].float().mean() < 0.1
    # and the images photometrically agree through the true depth far better than through a wrong one
    images, proj = scenes.images, scenes.proj

    def photo(depth: torch.Tensor) -> float:
        pairs = [warp_by_depth(images[:, i], proj[:, i], proj[:, 0], depth) for i in (1, 2)]
        return float(DF.mvs_consistency_loss(images[:, 0], torch.stack([p[0] for p in pairs], 1),
                                             torch.stack([p[1] for p in pairs], 1), grad_weight=0.3))

    assert photo(scenes.depth[:, 0]) < 0.5 * photo(scenes.depth[:, 0] * 1.25)


def test_real_digit_textures_when_mnist_is_there() -> None:
    from tests._mnist import mnist_dir

    root = mnist_dir()
    if root is None:
        pytest.skip("no MNIST files (set DISTILL_MNIST): the procedural-noise textures are tested instead")
    data = MVSScenes(1, size=8, num_depths=4, texture="mnist", root=root)
    assert data.texture == "mnist"


def test_the_training_loader_carries_no_ground_truth(scenes: MVSScenes) -> None:
    batch = next(iter(scenes.loader(2)))
    assert isinstance(batch, DenseBatch) and "depth" not in batch.extras and batch.inputs.shape == (2, 3, 4, 16, 16)
    assert torch.equal(next(iter(scenes.loader(2, with_depth=True))).extras["depth"], scenes.depth[:2, 0])


# ----------------------------------------------------------------------------------------- losses


def test_photometric_loss_on_a_known_shift_matches_a_hand_loop() -> None:
    h, w, f, b, alpha = 5, 10, 8.0, 0.5, 0.3
    k = _k(f, w, h)
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(1, 2, h, w, generator=g)
    src = torch.zeros_like(ref)
    src[..., : w - 2] = ref[..., 2:]                              # the plane at disparity 2: src(x) = ref(x + 2)
    src[..., w - 2:] = torch.rand(1, 2, h, 2, generator=g)
    srcp, refp = _proj(k, _translated(b))[None], _proj(k, torch.eye(4))[None]

    def loss(disparity: float) -> torch.Tensor:
        warped, valid = warp_by_depth(src, srcp, refp, torch.full((1, h, w), f * b / disparity))
        return DF.mvs_consistency_loss(ref, warped[:, None], valid[:, None], grad_weight=alpha)

    assert float(loss(2.0)) < 1e-6
    # at disparity 1 the reference pixel u (u >= 1) sees src(u - 1) = ref(u + 1) (for u + 1 <= w - 1)
    r = ref[0].numpy()
    warped = np.zeros_like(r)
    for u in range(1, w):
        warped[:, :, u] = src[0, :, :, u - 1].numpy()

    def dx(a: np.ndarray) -> np.ndarray:
        out = np.zeros_like(a)
        out[..., :-1] = a[..., 1:] - a[..., :-1]
        return out

    def dy(a: np.ndarray) -> np.ndarray:
        out = np.zeros_like(a)
        out[..., :-1, :] = a[..., 1:, :] - a[..., :-1, :]
        return out

    errs = []
    for y in range(h):
        for u in range(1, w):
            photo = np.abs(warped[:, y, u] - r[:, y, u]).mean()
            grad = np.abs(dx(warped)[:, y, u] - dx(r)[:, y, u]).mean() + np.abs(dy(warped)[:, y, u] - dy(r)[:, y, u]).mean()
            errs.append((1 - alpha) * photo + alpha * grad)
    assert float(loss(1.0)) == pytest.approx(np.mean(errs), rel=1e-5)


def test_consistency_loss_keeps_the_best_top_k_views() -> None:
    ref = torch.zeros(1, 1, 2, 2)
    warped = torch.tensor([0.1, 0.4, 0.2]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 2, 2).clone()
    valid = torch.ones(1, 3, 2, 2, dtype=torch.bool)
    valid[0, 0, 0, 0] = False                                     # pixel (0, 0): view 0 is invalid
    got = DF.mvs_consistency_loss(ref, warped, valid, grad_weight=0.0, top_k=2)
    # per pixel the two smallest valid errors, summed: (0.4 + 0.2) at (0, 0), (0.1 + 0.2) elsewhere
    assert float(got) == pytest.approx((0.6 + 3 * 0.3) / 4)


def test_kd_mvs_kl_loss_matches_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(2)
    b, d, h, w = 2, 5, 3, 4
    log_p = torch.log_softmax(torch.randn(b, d, h, w, generator=g), 1)
    q = torch.softmax(2 * torch.randn(b, d, h, w, generator=g), 1)
    q[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])           # 0·log 0 = 0
    mask = torch.rand(b, h, w, generator=g) > 0.4
    mask[1] = False                                                   # a scene without valid pixels adds 0
    mask[0, 0, 0] = True
    per_scene = []
    for i in range(b):
        total, n = 0.0, 0
        for y in range(h):
            for x in range(w):
                if mask[i, y, x]:
                    n += 1
                    for k in range(d):
                        qk = float(q[i, k, y, x])
                        if qk > 0:
                            total += qk * (math.log(qk) - float(log_p[i, k, y, x]))
        per_scene.append(total / n if n else 0.0)
    assert float(DF.kd_mvs_kl_loss(log_p, q, mask)) == pytest.approx(sum(per_scene) / b, rel=1e-5)


def test_probability_encoding_is_the_normalised_gaussian() -> None:
    values = torch.linspace(2.0, 4.0, 9)
    mu, sigma = torch.tensor([[[2.6, 3.1]]]), torch.tensor([[[0.3, 0.01]]])
    q = DF.depth_probability_encoding(mu, sigma, values, min_sigma=0.1)
    for j, (m, s) in enumerate([(2.6, 0.3), (3.1, 0.1)]):          # σ below min_sigma is raised to it
        dens = np.exp(-((values.numpy() - m) ** 2) / (2 * s * s))
        np.testing.assert_allclose(q[0, :, 0, j].numpy(), dens / dens.sum(), rtol=1e-5, atol=1e-7)


def test_cross_view_check_on_planes_matches_the_closed_form() -> None:
    h, w, f, d, eps = 8, 12, 10.0, 4.0, 0.02
    k = _k(f, w, h)
    proj = torch.stack([_proj(k, torch.eye(4)), _proj(k, _translated(0.4)), _proj(k, _translated(-0.4))])[None]
    depth = torch.stack([torch.full((h, w), d), torch.full((h, w), d * (1 + eps)), torch.full((h, w), d * 1.5)])[None]
    mu, sigma, mask = DF.cross_view_check(depth, proj, None, reproj_px=1.0, rel_depth=0.05, min_views=1)
    # source 1 (a plane at d(1+ε) in its camera, translated along x: same z) agrees wherever the reference
    # pixel projects inside it (u - f·b/d >= 0: u >= 1); source 2 (50 % off) never agrees
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[:, 1:] = True
    assert torch.equal(mask[0], inside)
    torch.testing.assert_close(mu[0][inside], torch.full((int(inside.sum()),), d * (1 + eps / 2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(sigma[0][inside], torch.full((int(inside.sum()),), d * eps / 2), atol=1e-4, rtol=0)
    assert float(mu[0, 0, 0]) == 0 and float(sigma[0, 0, 0]) == 0
    # a stricter depth tolerance rejects source 1 too; a confidence filter removes pixels
    assert not DF.cross_view_check(depth, proj, None, rel_depth=0.01, min_views=1)[2].any()
    conf = torch.ones(1, h, w)
    conf[0, 3, 5] = 0.01
    assert not bool(DF.cross_view_check(depth, proj, conf, min_views=1, min_confidence=0.05)[2][0, 3, 5])


def test_depth_errors_match_numpy() -> None:
    g = torch.Generator().manual_seed(5)
    pred, gt = torch.rand(2, 4, 4, generator=g) * 3, torch.rand(2, 4, 4, generator=g) * 3
    m = DF.depth_errors(pred, gt, thresholds=(0.2, 0.7))
    e = np.abs(pred.numpy() - gt.numpy())
    assert m["mae"] == pytest.approx(e.mean(), rel=1e-6)
    assert m["acc@0.2"] == pytest.approx((e < 0.2).mean()) and m["acc@0.7"] == pytest.approx((e < 0.7).mean())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 3.0))
def test_kl_is_non_negative_and_zero_at_the_target(seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(scale * torch.randn(2, 6, 3, 3, generator=g), 1)
    log_p = torch.log_softmax(scale * torch.randn(2, 6, 3, 3, generator=g), 1)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    assert float(DF.kd_mvs_kl_loss(log_p, q, mask)) >= -1e-6
    assert abs(float(DF.kd_mvs_kl_loss(q.log(), q, mask))) < 1e-5


# ----------------------------------------------------------------------------------------- model, methods


def test_mvsnet_outputs_and_taps(scenes: MVSScenes) -> None:
    model = create("mvsnet_student", num_depths=16)
    out = model.predict(scenes.packed()[:2])
    assert out["prob"].shape == (2, 16, 16, 16) and out["depth"].shape == (2, 16, 16)
    torch.testing.assert_close(out["prob"].sum(1), torch.ones(2, 16, 16))
    torch.testing.assert_close(out["depth"], (out["prob"] * model.depth_values.view(1, -1, 1, 1)).sum(1))
    # MVSNet's confidence: the mass of the 4 hypotheses around the expected index (floor - 1 ... floor + 2)
    idx = (out["prob"] * torch.arange(16.0).view(1, -1, 1, 1)).sum(1).floor().long()
    i, y, x = 1, 3, 7
    lo = int(idx[i, y, x])
    want = out["prob"][i, max(lo - 1, 0):lo + 3, y, x].sum()
    torch.testing.assert_close(out["confidence"][i, y, x], want)
    with pytest.raises(ValueError, match="packed views"):
        model(torch.rand(2, 3, 3, 16, 16))
    counts = {n: sum(p.numel() for p in create(n).parameters()) for n in ("mvsnet_teacher", "mvsnet_student")}
    assert counts == {"mvsnet_teacher": 22_713, "mvsnet_student": 5_885}


def test_methods_are_registered_with_the_paper() -> None:
    for name in ("kd_mvs", "mvs_self_sup"):
        info = method_info(name)
        assert info.paper.arxiv == "2207.10425" and info.paper.year == 2022 and info.family == "self-supervised"
    assert strategy_info("kd_mvs").paper.arxiv == "2207.10425"
    assert isinstance(create_method("kd_mvs", min_sigma=0.2), KDMVS)


def test_self_supervised_method_sums_its_weighted_terms(scenes: MVSScenes) -> None:
    torch.manual_seed(0)
    model = create("mvsnet_student", num_depths=16)
    batch = DenseBatch(scenes.packed())
    parts = {}
    for name, kw in {"photo": dict(photo=1, feature=0, smooth=0), "feature": dict(photo=0, feature=1, smooth=0),
                     "smooth": dict(photo=0, feature=0, smooth=1),
                     "all": dict(photo=0.7, feature=0.3, smooth=0.05)}.items():
        d = Distiller(model, None, losses={"s": MVSSelfSupervised(grad_weight=0.2, **kw)})
        model.eval()
        parts[name] = float(d(batch).total.detach())
        d.detach_taps()
    assert parts["all"] == pytest.approx(0.7 * parts["photo"] + 0.3 * parts["feature"] + 0.05 * parts["smooth"], rel=1e-5)
    # and the photometric term is the functional's on the model's own depth
    model.eval()
    with torch.no_grad():
        depth = model(batch.inputs)
    pairs = [warp_by_depth(scenes.images[:, i], scenes.proj[:, i], scenes.proj[:, 0], depth) for i in (1, 2)]
    want = DF.mvs_consistency_loss(scenes.images[:, 0], torch.stack([p[0] for p in pairs], 1),
                                   torch.stack([p[1] for p in pairs], 1), grad_weight=0.2)
    assert parts["photo"] == pytest.approx(float(want), rel=1e-5)
    assert parts["smooth"] == pytest.approx(float(DF.edge_aware_smoothness(depth, scenes.images[:, 0])), rel=1e-5)


def test_edge_aware_smoothness_matches_a_hand_loop() -> None:
    g = torch.Generator().manual_seed(7)
    depth, image = 1 + torch.rand(2, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)
    d = depth.numpy() / depth.numpy().mean(axis=(1, 2), keepdims=True)
    im = image.numpy()
    xs = [abs(d[b, y, x + 1] - d[b, y, x]) * math.exp(-np.abs(im[b, :, y, x + 1] - im[b, :, y, x]).mean())
          for b in range(2) for y in range(4) for x in range(4)]
    ys = [abs(d[b, y + 1, x] - d[b, y, x]) * math.exp(-np.abs(im[b, :, y + 1, x] - im[b, :, y, x]).mean())
          for b in range(2) for y in range(3) for x in range(5)]
    assert float(DF.edge_aware_smoothness(depth, image)) == pytest.approx(np.mean(xs) + np.mean(ys), rel=1e-5)


def test_kd_method_reads_pseudo_labels_and_trains_only_the_student(scenes: MVSScenes) -> None:
    torch.manual_seed(0)
    student = create("mvsnet_student", num_depths=16)
    g = torch.Generator().manual_seed(0)
    mu = scenes.depth[:, 0] + 0.1 * torch.randn(3, 16, 16, generator=g)
    sigma = 0.05 + 0.2 * torch.rand(3, 16, 16, generator=g)
    mask = torch.rand(3, 16, 16, generator=g) > 0.3
    batch = DenseBatch(scenes.packed(), extras={"pseudo_mu": mu, "pseudo_sigma": sigma, "pseudo_mask": mask})
    d = Distiller(student, None, losses={"kd": KDMVS(min_sigma=0.08)})
    student.eval()
    out = d(batch)
    with torch.no_grad():
        log_p = student.predict(batch.inputs)["log_prob"]
    want = DF.kd_mvs_kl_loss(log_p, DF.depth_probability_encoding(mu, sigma, student.depth_values, 0.08), mask)
    assert float(out.total.detach()) == pytest.approx(float(want), rel=1e-5)
    out.total.backward()
    assert student.score.weight.grad is not None and student.score.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="pseudo"):
        Distiller(student, None, losses={"kd": KDMVS()})(DenseBatch(scenes.packed()))


# ----------------------------------------------------------------------------------------- strategy


def test_kd_mvs_strategy_runs_its_three_stages(scenes: MVSScenes) -> None:
    from distill.strategies.kd_mvs import kd_mvs, make_pseudo_labels

    torch.manual_seed(0)
    teacher, student = create("mvsnet_teacher", num_depths=16), create("mvsnet_student", num_depths=16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    res = kd_mvs(student, scenes.loader(3), scenes.loader(3, with_depth=True), teacher=teacher, epochs=1,
                 teacher_epochs=1, progress=False, check={"min_views": 1, "min_confidence": 0.0})
    assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())   # stage 1 trained it
    assert len(res.teacher_history) == 1 and len(res.student_history) == 1 and 0 < res.coverage[0] <= 1
    assert set(res.student_metrics) == {"mae", "acc@0.1", "acc@0.25", "acc@0.5"}
    labels = make_pseudo_labels(res.teacher, scenes.loader(3), min_views=1, min_confidence=0.0)
    assert labels.mu.shape == (9, 16, 16) and labels.view.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the row of reference view 1 holds view 1 first, then views 0 and 2
    assert torch.equal(labels.inputs[3], scenes.packed()[0, [1, 0, 2]])
    with pytest.raises(ValueError, match="teacher"):
        kd_mvs(student, scenes.loader(3), None, epochs=1, progress=False)


# ------------------------------------------------------------------- the strategy's training keywords (fit's)


def _one_step_reference(model: torch.nn.Module, scenes: MVSScenes, seed: int, epoch: int = 0
                        ) -> dict[str, torch.Tensor]:
    """The gradient of stage 1's step in ``epoch`` (one batch per epoch), worked out outside the strategy: the
    reference view is the one drawn from ``Generator(seed * 10_007 + epoch)``, the loss MVSSelfSupervised's
    defaults."""
    import copy

    twin = copy.deepcopy(model).train()
    batch = next(iter(scenes.loader(3)))
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    r = int(torch.randint(batch.inputs.shape[1], (1,), generator=g))
    order = [r] + [i for i in range(batch.inputs.shape[1]) if i != r]
    d = Distiller(twin, None, losses={"self_sup": MVSSelfSupervised()})
    d(DenseBatch(batch.inputs[:, order], index=batch.index)).total.backward()
    return {n: p.grad.clone() for n, p in twin.named_parameters() if p.grad is not None}


def test_stage_one_takes_fits_optimizer_keywords_sgd_step_by_hand(scenes: MVSScenes) -> None:
    from distill.strategies.kd_mvs import train_self_supervised

    torch.manual_seed(0)
    model = create("mvsnet_teacher", num_depths=16)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _one_step_reference(model, scenes, seed=5)
    # plain SGD, no momentum, weight decay 0.01: w1 = w0 - lr (g + wd w0)
    train_self_supervised(model, scenes.loader(3), epochs=1, seed=5, progress=False, optimizer="sgd", lr=0.2,
                          momentum=0.0, weight_decay=0.01, schedule="constant")
    for n, p in model.named_parameters():
        want = w0[n] - 0.2 * (grads.get(n, torch.zeros_like(p)) + 0.01 * w0[n])
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-6, msg=n)


def test_stage_one_sgd_momentum_two_steps_by_hand(scenes: MVSScenes) -> None:
    from distill.strategies.kd_mvs import train_self_supervised

    torch.manual_seed(3)
    model = create("mvsnet_teacher", num_depths=16)
    twin = create("mvsnet_teacher", num_depths=16)
    twin.load_state_dict(model.state_dict())
    lr, mu = 0.1, 0.7
    # step 1 at w0 (epoch 0's view): b1 = g1, w1 = w0 - lr b1; step 2 at w1 (epoch 1's view): b2 = mu b1 + g2
    g1 = _one_step_reference(twin, scenes, seed=4, epoch=0)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p -= lr * g1.get(n, torch.zeros_like(p))
    g2 = _one_step_reference(twin, scenes, seed=4, epoch=1)
    train_self_supervised(model, scenes.loader(3), epochs=2, seed=4, progress=False, optimizer="sgd", lr=lr,
                          momentum=mu, weight_decay=0.0)
    w1 = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        zero = torch.zeros_like(p)
        want = w1[n].detach() - lr * (mu * g1.get(n, zero) + g2.get(n, zero))
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-6, msg=n)


def test_stage_one_defaults_are_adamw_lr_1e_3_wd_1e_4_first_step_by_hand(scenes: MVSScenes) -> None:
    from distill.strategies.kd_mvs import train_self_supervised

    torch.manual_seed(1)
    model = create("mvsnet_teacher", num_depths=16)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _one_step_reference(model, scenes, seed=0)
    train_self_supervised(model, scenes.loader(3), epochs=1, seed=0, progress=False)
    # AdamW's first step: decoupled decay w0 (1 - lr wd), then -lr m̂/(√v̂ + ε) = -lr g/(|g| + 1e-8)
    lr, wd = 1e-3, 1e-4
    for n, p in model.named_parameters():
        g = grads.get(n, torch.zeros_like(p))
        want = w0[n] * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-7, msg=n)


def test_grad_clip_bounds_the_sgd_step_norm(scenes: MVSScenes) -> None:
    from distill.strategies.kd_mvs import train_self_supervised

    torch.manual_seed(2)
    model = create("mvsnet_teacher", num_depths=16)
    w0 = [p.detach().clone() for p in model.parameters()]
    train_self_supervised(model, scenes.loader(3), epochs=1, progress=False, optimizer="sgd", lr=1.0, momentum=0.0,
                          weight_decay=0.0, grad_clip=1e-3)
    step = torch.sqrt(sum(((p.detach() - w) ** 2).sum() for p, w in zip(model.parameters(), w0)))
    assert float(step) == pytest.approx(1e-3, rel=1e-3)  # the gradient (norm >> 1e-3) clipped to norm 1e-3


def test_kd_mvs_schedule_spans_each_stage_and_restarts_per_stage(scenes: MVSScenes) -> None:
    from distill.strategies.kd_mvs import kd_mvs

    torch.manual_seed(0)
    teacher, student = create("mvsnet_teacher", num_depths=16), create("mvsnet_student", num_depths=16)
    res = kd_mvs(student, scenes.loader(3), None, teacher=teacher, epochs=3, teacher_epochs=2, progress=False,
                 check={"min_views": 1, "min_confidence": 0.0}, optimizer="sgd", lr=0.04, momentum=0.5,
                 weight_decay=0.0, schedule="multistep", milestones=[1, 2], gamma=0.25, device="cpu", amp=False,
                 fingerprint={"any": 1})
    # lr at each epoch's first step: ×0.25 after epoch 1 and after epoch 2; a fresh schedule for the student
    assert [h["lr"] for h in res.teacher_history] == pytest.approx([0.04, 0.01])
    assert [h["lr"] for h in res.student_history] == pytest.approx([0.04, 0.01, 0.0025])
    # cosine, stepped per batch: one batch per epoch (3 scenes, batch 3) for the teacher, 2 epochs:
    # lr·½(1 + cos(π·1/2)) = lr/2 at epoch 1; the student's 9 labelled rows in batches of 3 = 3 steps per epoch,
    # 3 epochs = 9 steps: lr·½(1 + cos(π·3/9)) = 0.75 lr at epoch 1, lr·½(1 + cos(π·6/9)) = 0.25 lr at epoch 2
    res = kd_mvs(student, scenes.loader(3), None, teacher=teacher, epochs=3, teacher_epochs=2, progress=False,
                 check={"min_views": 1, "min_confidence": 0.0}, optimizer="adam", lr=0.02, schedule="cosine",
                 batch_size=3)
    assert [h["lr"] for h in res.teacher_history] == pytest.approx([0.02, 0.01])
    assert [h["lr"] for h in res.student_history] == pytest.approx([0.02, 0.015, 0.005])


def test_kd_mvs_loop_defaults_are_the_authors_lr_and_weight_decay() -> None:
    from distill.strategies.kd_mvs import _loop_config

    cfg = _loop_config({}, epochs=1, teacher_epochs=1)
    # lr 1e-3, weight decay 1e-4: the authors' --lr / --wd (megvii-research/KD-MVS); AdamW and a constant rate: ours
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["schedule"]) == ("adamw", 1e-3, 1e-4, "constant")
    assert cfg["grad_clip"] is None and cfg["device"] is None
    # a recipe's unset (None) optimiser fields fall back to these, not to fit's
    none = _loop_config({"optimizer": None, "lr": None, "weight_decay": None, "schedule": None}, epochs=1,
                        teacher_epochs=1)
    assert {k: none[k] for k in ("optimizer", "lr", "weight_decay", "schedule")} == \
        {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "constant"}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"optimizer": "lion"}, ValueError, "unknown optimizer 'lion'"),
    ({"schedule": "step"}, ValueError, "unknown schedule 'step'"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"grad_clip": -1.0}, ValueError, "grad_clip must be a number > 0"),
    ({"schedule": "multistep", "milestones": [3]}, ValueError, r"outside 1\.\.2.*teacher_epochs"),
    ({"resume": True}, ValueError, "keep no checkpoints"),
    ({"amp": "bf16"}, ValueError, "float32"),
    ({"warmup": 3}, TypeError, r"unknown argument\(s\) \['warmup'\].*'optimizer'"),
])
def test_kd_mvs_bad_training_keywords_are_named_before_any_work(scenes: MVSScenes, kwargs, error, match) -> None:
    from distill.strategies.kd_mvs import kd_mvs

    teacher, student = create("mvsnet_teacher", num_depths=16), create("mvsnet_student", num_depths=16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with pytest.raises(error, match=match):
        kd_mvs(student, scenes.loader(3), None, teacher=teacher, epochs=3, teacher_epochs=2, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # stage 1 never ran
