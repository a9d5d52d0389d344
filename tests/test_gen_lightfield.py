"""R2L (Wang et al. ECCV 2022, arXiv 2203.17261): the procedural scene, volume rendering, the light field
student and the strategy, each against numbers worked out by hand or by a plainly written loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import functional as DF
from distill.data.lightfield import (Scene, cast_rays, get_rays, make_scene, make_views, pose_spherical,
                                     render_views)
from distill.models.nerf import NeLF, NeRF, positional_encoding, sample_depths
from distill.strategies import r2l as R

torch.set_num_threads(1)


def one_sphere_scene(**kw) -> Scene:
    """A unit sphere at the origin, no boxes, the ground disc out of the way."""
    args = dict(sphere_centers=torch.zeros(1, 3), sphere_radii=torch.ones(1), sphere_colors=torch.tensor([[0.2, 0.4, 0.6]]),
                box_min=torch.zeros(0, 3), box_max=torch.zeros(0, 3), box_colors=torch.zeros(0, 3),
                ground_z=-50.0, ground_radius=1.0, light_dir=torch.tensor([1.0, 0.0, 0.0]), ambient=0.5,
                background=torch.tensor([0.9, 0.8, 0.7]))
    args.update(kw)
    return Scene(**args)


# ----------------------------------------------------------------------------------------- cameras, rays


def test_pose_and_rays_by_hand():
    # camera at (4, 0, 0) looking at the origin: back = +x, right = z × back = +y, up = back × right = +z
    c2w = pose_spherical(0.0, 0.0, 4.0)
    assert torch.allclose(c2w[:3, 3], torch.tensor([4.0, 0.0, 0.0]), atol=1e-6)
    o, d = get_rays(1, 1, 3.0, c2w)  # the single pixel's centre is the principal point
    assert torch.allclose(o[0, 0], torch.tensor([4.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(d[0, 0], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)
    # 2x2, focal 1: pixel (i=0, j=0) has camera direction (-0.5, +0.5, -1) = -0.5 right + 0.5 up - back
    _, d = get_rays(2, 2, 1.0, c2w)
    assert torch.allclose(d[0, 0], torch.tensor([-1.0, -0.5, 0.5]), atol=1e-6)
    assert torch.allclose(d[1, 1], torch.tensor([-1.0, 0.5, -0.5]), atol=1e-6)
    # a camera above: elevation 90 has no up axis
    with pytest.raises(ValueError, match="elevation_deg"):
        pose_spherical(0.0, 90.0, 4.0)
    with pytest.raises(ValueError, match="c2w"):
        get_rays(2, 2, 1.0, torch.eye(3))


def test_sphere_hit_distance_colour_and_background():
    scene = one_sphere_scene()
    o = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [5.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[-2.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    colors, t = cast_rays(scene, o, d)
    # hits x = 1 at t = (5 - 1) / 2 (directions are not normalised); normal (1,0,0) faces the light: full albedo
    assert t[0].item() == pytest.approx(2.0, abs=1e-5)
    assert torch.allclose(colors[0], torch.tensor([0.2, 0.4, 0.6]), atol=1e-6)
    assert t[1].item() == pytest.approx(4.0, abs=1e-5)
    assert math.isinf(t[2].item()) and torch.allclose(colors[2], torch.tensor([0.9, 0.8, 0.7]))  # misses
    assert t[3].item() == pytest.approx(1.0, abs=1e-5)  # from inside: the far root
    # light along +z: n·l = 0 at (1, 0, 0), only the ambient half of the albedo
    dark, _ = cast_rays(one_sphere_scene(light_dir=torch.tensor([0.0, 0.0, 2.0])), o[:1], d[:1])
    assert torch.allclose(dark[0], 0.5 * torch.tensor([0.2, 0.4, 0.6]), atol=1e-6)


def test_box_and_ground_by_hand():
    scene = one_sphere_scene(sphere_centers=torch.zeros(0, 3), sphere_radii=torch.zeros(0), sphere_colors=torch.zeros(0, 3),
                             box_min=torch.tensor([[-1.0, -1.0, -1.0]]), box_max=torch.tensor([[1.0, 1.0, 1.0]]),
                             box_colors=torch.tensor([[0.6, 0.2, 0.2]]), light_dir=torch.tensor([0.0, 0.0, 1.0]),
                             ground_z=-2.0, ground_radius=3.0, tile=0.8,
                             ground_colors=torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 0.0]]))
    o = torch.tensor([[0.0, 0.0, 5.0], [3.0, 0.0, 0.5], [2.0, 0.3, 5.0], [1.7, 0.9, 5.0], [0.0, 5.0, 5.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    colors, t = cast_rays(scene, o, d)
    assert t[0].item() == pytest.approx(4.0, abs=1e-5)  # top face, normal +z towards the light: full albedo
    assert torch.allclose(colors[0], torch.tensor([0.6, 0.2, 0.2]), atol=1e-6)
    assert t[1].item() == pytest.approx(2.0, abs=1e-5)  # the x = 1 face, normal +x: n·l = 0
    assert torch.allclose(colors[1], 0.5 * torch.tensor([0.6, 0.2, 0.2]), atol=1e-6)
    # ground at z = -2: (2.0, 0.3): floor(2.5) + floor(0.375) = 2 -> even tile 0; (1.7, 0.9): 2 + 1 = 3 -> tile 1
    assert t[2].item() == pytest.approx(7.0, abs=1e-5) and torch.allclose(colors[2], torch.ones(3))
    assert torch.allclose(colors[3], torch.tensor([0.0, 0.5, 0.0]))
    assert math.isinf(t[4].item())  # (0, 5) is outside the disc of radius 3


def test_render_views_is_per_pixel_ray_casting_and_scene_is_seeded():
    scene = make_scene(3)
    assert torch.equal(make_scene(3).sphere_centers, scene.sphere_centers)
    assert not torch.equal(make_scene(4).sphere_colors[:1], scene.sphere_colors[:1])
    pose = pose_spherical(30.0, 40.0, 4.0)
    image = render_views(scene, pose[None], 6, 5, 5.0)[0]
    o, d = get_rays(6, 5, 5.0, pose)
    for j, i in [(0, 0), (3, 2), (5, 4)]:
        assert torch.allclose(image[j, i], cast_rays(scene, o[j, i][None], d[j, i][None])[0][0])
    views = make_views(scene, 3, H=8, W=8, seed=1)
    assert views.images.shape == (3, 8, 8, 3) and 0.0 <= views.images.min() and views.images.max() <= 1.0
    assert (views.near, views.far) == (2.0, 6.0)
    assert torch.equal(make_views(scene, 3, H=8, W=8, seed=1).images, views.images)
    # the scene is seen: some pixels are not the background
    assert (views.images - scene.background).abs().sum(-1).gt(0).float().mean() > 0.2


# ---------------------------------------------------------------------------------------------- rendering


def test_volume_render_two_samples_by_hand():
    rgb = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    sigma = torch.tensor([[1.0, 2.0]])
    deltas = torch.tensor([[0.5, 1.0]])
    depths = torch.tensor([[1.0, 1.5]])
    out = DF.volume_render(rgb, sigma, deltas, depths, background=torch.tensor([0.0, 0.0, 1.0]))
    w1 = 1 - math.exp(-0.5)
    w2 = math.exp(-0.5) * (1 - math.exp(-2.0))
    assert out["weights"][0].tolist() == pytest.approx([w1, w2], abs=1e-6)
    assert out["acc"].item() == pytest.approx(w1 + w2, abs=1e-6)
    assert out["rgb"][0].tolist() == pytest.approx([w1, w2, 1 - w1 - w2], abs=1e-6)
    assert out["depth"].item() == pytest.approx(w1 * 1.0 + w2 * 1.5, abs=1e-6)
    # no background: black behind
    assert DF.volume_render(rgb, sigma, deltas)["rgb"][0, 2].item() == pytest.approx(0.0, abs=1e-7)


def test_interval_lengths_by_hand():
    deltas = DF.interval_lengths(torch.tensor([[1.0, 1.5, 2.5]]), far=3.0, ray_norm=torch.tensor([2.0]))
    assert deltas.tolist() == [[1.0, 2.0, 1.0]]


def test_positional_encoding_and_depths_by_hand():
    enc = positional_encoding(torch.tensor([[0.25, -0.5]]), num_freqs=2)
    p, q = 0.25, -0.5
    expect = [p, math.sin(math.pi * p), math.cos(math.pi * p), math.sin(2 * math.pi * p), math.cos(2 * math.pi * p),
              q, math.sin(math.pi * q), math.cos(math.pi * q), math.sin(2 * math.pi * q), math.cos(2 * math.pi * q)]
    assert enc[0].tolist() == pytest.approx(expect, abs=1e-6)
    assert sample_depths(2.0, 6.0, 4, 1)[0].tolist() == [2.5, 3.5, 4.5, 5.5]
    t = sample_depths(2.0, 6.0, 4, 50, perturb=True, generator=torch.Generator().manual_seed(0))
    lower = torch.tensor([2.0, 3.0, 4.0, 5.0])
    assert bool(((t >= lower) & (t <= lower + 1)).all()) and t.std(0).min() > 0.1


class ConstantField(torch.nn.Module):
    """A radiance field of constant density and colour (a closed form for the whole rendering)."""

    def __init__(self, sigma: float, color: tuple[float, float, float]) -> None:
        super().__init__()
        self.sigma, self.color = sigma, torch.tensor(color)
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, points):
        return self.color.expand(*points.shape[:-1], 3), torch.full(points.shape[:-1], self.sigma)


def test_render_nerf_rays_constant_medium_closed_form():
    # samples at bin centres t_i, intervals to the next sample and the last to `far`: total length
    # (far - near - w/2)·|d| with w = (far - near)/S; opacity 1 - exp(-σ · length)
    near, far, S, sigma = 2.0, 6.0, 8, 0.3
    rays = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, -2.0], [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    bg = torch.tensor([0.0, 1.0, 0.0])
    out = R.render_nerf_rays(ConstantField(sigma, (1.0, 0.0, 0.0)), rays, near=near, far=far, num_samples=S, background=bg)
    for k, norm in enumerate([2.0, 1.0]):
        acc = 1 - math.exp(-sigma * (far - near - (far - near) / S / 2) * norm)
        assert out["rgb"][k].tolist() == pytest.approx([acc, 1 - acc, 0.0], abs=1e-5)


# -------------------------------------------------------------------------------------------------- models


def test_nelf_forward_matches_a_plain_loop():
    torch.manual_seed(0)
    model = NeLF(2.0, 6.0, num_points=3, num_freqs=2, width=8, depth=6).eval()
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 6  # head + 2 blocks x 2 + tail
    rays = torch.randn(5, 6)
    # the ray representation: points at bin centres 2 + 4/3 (k + 1/2), each encoded, concatenated
    x = []
    for r in rays:
        feats = []
        for k in range(3):
            point = r[:3] + (2.0 + 4.0 / 3 * (k + 0.5)) * r[3:]
            for c in point / 4.0:
                c = float(c)
                feats += [c, math.sin(math.pi * c), math.cos(math.pi * c), math.sin(2 * math.pi * c),
                          math.cos(2 * math.pi * c)]
        x.append(feats)
    x = torch.tensor(x)
    assert torch.allclose(model.encode(rays), x, atol=1e-5)
    h = torch.relu(x @ model.head[0].weight.T + model.head[0].bias)
    g = h
    for block in model.body:
        g = g + (torch.relu(g @ block.fc1.weight.T + block.fc1.bias) @ block.fc2.weight.T + block.fc2.bias)
    expect = torch.sigmoid((h + g) @ model.tail.weight.T + model.tail.bias)
    assert torch.allclose(model(rays), expect, atol=1e-5)
    assert model.macs_per_ray() == 3 * 3 * 5 * 8 + 4 * 64 + 8 * 3
    # paper size: 88 linear layers
    big = NeLF(2.0, 6.0, num_points=16, num_freqs=10, width=16, depth=88)
    assert sum(isinstance(m, torch.nn.Linear) for m in big.modules()) == 88 and big.in_dim == 16 * 3 * 21


def test_nelf_training_mode_jitters_points_inside_bins():
    model = NeLF(2.0, 6.0, num_points=4, num_freqs=1, width=4, depth=2).train()
    rays = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, -1.0]]).expand(20, 6)
    z = -model.ray_points(rays)[..., 2]  # depth along -z, unit direction
    lower = torch.tensor([2.0, 3.0, 4.0, 5.0])
    assert bool(((z >= lower) & (z <= lower + 1)).all()) and z.std(0).min() > 0.05
    assert torch.allclose(-model.eval().ray_points(rays[:1])[0, :, 2], lower + 0.5)


# ------------------------------------------------------------------------------------------------ the loss


def test_r2l_loss_value_and_gradient_only_to_student():
    s = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.1, 0.1]], requires_grad=True)
    t = torch.tensor([[0.3, 0.2, 0.6], [0.4, 0.1, 0.0]], requires_grad=True)
    loss = DF.r2l_loss(s, t)
    assert loss.item() == pytest.approx((0.04 + 0 + 0.09 + 0.09 + 0 + 0.01) / 6, abs=1e-7)
    loss.backward()
    assert s.grad is not None and t.grad is None


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=6, max_size=6), st.lists(st.floats(0, 1), min_size=6, max_size=6))
def test_r2l_loss_properties(a, b):
    x, y = torch.tensor(a).view(2, 3), torch.tensor(b).view(2, 3)
    assert DF.r2l_loss(x, x).item() == 0.0
    assert DF.r2l_loss(x, y).item() >= 0.0
    assert DF.r2l_loss(x, y).item() == pytest.approx(DF.r2l_loss(y, x).item(), abs=1e-7)


# -------------------------------------------------------------------------------------------- the strategy


def test_lr_schedule_warmup_then_decay():
    assert R._lr_at(0, 100, 1e-3, 0.1, 10, 1e-4) == pytest.approx(1e-4)
    assert R._lr_at(5, 100, 1e-3, 0.1, 10, 1e-4) == pytest.approx(5.5e-4)
    assert R._lr_at(10, 100, 1e-3, 0.1, 10, 1e-4) == pytest.approx(1e-3)
    assert R._lr_at(100, 100, 1e-3, 0.1, 10, 1e-4) == pytest.approx(1e-4)


def test_hard_ray_pool_keeps_the_hardest_rays_and_replaces_the_drawn_ones():
    pool = R.HardRayPool(batch_rays=4, hard_ratio=0.5, hard_mul=1.0, generator=torch.Generator().manual_seed(0))
    assert pool.n == 2 and pool.size == 4 and pool.draw() is None
    rays = torch.arange(24.0).view(4, 6)
    colors = rays[:, :3].clone()  # a ray's colour starts with the ray's first number: pairs are checkable
    pool.add(rays, colors, torch.tensor([0.1, 0.9, 0.5, 0.2]))  # the hardest: rows 1 and 2
    assert not pool.full and pool.draw() is None
    assert {int(r[0]) for r in pool.rays} == {6, 12}
    pool.add(rays + 100, colors + 100, torch.tensor([0.3, 0.0, 0.1, 0.8]))  # rows 3 and 0
    assert pool.full and {int(r[0]) for r in pool.rays} == {6, 12, 118, 100}
    for k in range(1, 6):  # several rounds, so that the drawn slots are not always the first ones
        drawn_rays, drawn_colors = pool.draw()
        assert drawn_rays.shape == (2, 6) and torch.equal(drawn_colors[:, 0], drawn_rays[:, 0])  # pairs kept
        kept = {int(r[0]) for r in pool.rays} - {int(r[0]) for r in drawn_rays}
        off = 1000.0 * k
        pool.add(rays + off, colors + off, torch.tensor([0.0, 0.2, 0.1, 0.05]))  # rows 1 and 2 replace the drawn
        assert {int(r[0]) for r in pool.rays} == kept | {int(off) + 6, int(off) + 12} and pool.rays.shape[0] == 4


@pytest.fixture(scope="module")
def tiny():
    scene = make_scene(0)
    train = make_views(scene, 4, H=6, W=6, seed=0)
    test = make_views(scene, 2, H=6, W=6, seed=1)
    torch.manual_seed(0)
    return train, test, NeRF(num_freqs=2, width=16, depth=2)


def test_pseudo_data_is_the_teachers_rendering_from_new_poses(tiny):
    train, _, teacher = tiny
    rays, colors = R.make_pseudo_data(teacher, train, 3, num_samples=8, seed=5, progress=False)
    assert rays.shape == (3 * 36, 6) and colors.shape == (3 * 36, 3)
    with torch.no_grad():
        rendered = R.render_nerf_rays(teacher.eval(), rays, near=train.near, far=train.far, num_samples=8,
                                      background=train.background)["rgb"]
    assert torch.allclose(colors, rendered, atol=1e-6)
    per_image = rays.view(3, 6, 6, 6)
    origins = per_image[:, 0, 0, :3]
    radius, lo, hi = R._camera_ranges(train)
    assert torch.allclose(origins.norm(dim=-1), torch.full((3,), radius), atol=1e-4)
    elev = torch.rad2deg(torch.asin(origins[:, 2] / origins.norm(dim=-1)))
    assert bool(((elev >= lo - 1e-3) & (elev <= hi + 1e-3)).all())
    # one pixel to the right moves the direction by (unit right axis) / f': recover each image's focal f'
    right = per_image[:, 0, 1, 3:] - per_image[:, 0, 0, 3:]
    focal = 1.0 / right.norm(dim=-1)
    assert bool(((focal >= train.focal - 1e-3) & (focal < 2 * train.focal + 1e-3)).all()) and focal.std() > 0.1
    # the same seed gives the same data; focal_scale (1, 1) keeps the focal
    rays_b, _ = R.make_pseudo_data(teacher, train, 3, num_samples=8, seed=5, progress=False)
    assert torch.equal(rays, rays_b)
    rays_c, _ = R.make_pseudo_data(teacher, train, 2, num_samples=8, focal_scale=(1.0, 1.0), seed=5, progress=False)
    step = rays_c.view(2, 6, 6, 6)[:, 0, 1, 3:] - rays_c.view(2, 6, 6, 6)[:, 0, 0, 3:]
    assert torch.allclose(1.0 / step.norm(dim=-1), torch.full((2,), train.focal), atol=1e-4)


def test_r2l_end_to_end_tiny(tiny):
    train, test, teacher = tiny
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1)
    student = NeLF(train.near, train.far, num_points=4, num_freqs=2, width=16, depth=4)
    s_before = [p.clone() for p in student.parameters()]
    res = R.r2l(student, train, test, teacher=teacher, num_samples=8, pseudo_images=2, distill_steps=3,
                finetune_steps=2, batch_rays=16, lr=1e-3, warmup_steps=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is frozen
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    assert res.pseudo_rays == 2 * 36 and len(res.history["distill"]) == 2 and len(res.history["finetune"]) == 2
    assert res.teacher_psnr is not None and res.student_psnr is not None and res.speedup > 0
    assert res.macs_ratio == pytest.approx(student.macs_per_ray() / (teacher.macs_per_point() * 8))
    assert R.evaluate_views(student, test)["psnr"] == pytest.approx(res.student_psnr)


def test_train_nerf_and_nelf_lower_their_loss(tiny):
    train, _, _ = tiny
    torch.manual_seed(0)
    teacher = NeRF(num_freqs=2, width=16, depth=2)
    hist = R.train_nerf(teacher, train, steps=120, batch_rays=64, num_samples=8, lr=1e-2, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    o, d, colors = train.rays()
    torch.manual_seed(0)
    student = NeLF(train.near, train.far, num_points=4, num_freqs=2, width=16, depth=4)
    hist = R.train_nelf(student, torch.cat([o, d], -1), colors, steps=120, batch_rays=64, lr=3e-3, warmup_steps=5,
                        hard_ratio=0.25, hard_mul=2.0, progress=False)
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]


def test_r2l_errors_and_registry(tiny):
    train, _, teacher = tiny
    from distill.strategies.registry import strategy_info

    info = strategy_info("r2l")
    assert info.paper.arxiv == "2203.17261" and info.paper.year == 2022 and info.family == "generative"
    with pytest.raises(ValueError, match="near/far"):
        R.r2l(NeLF(1.0, 6.0, num_points=2, num_freqs=1, width=4, depth=2), train, teacher=teacher, progress=False)
    with pytest.raises(ValueError, match="pseudo_images"):
        R.r2l(NeLF(train.near, train.far, num_points=2, num_freqs=1, width=4, depth=2), train, teacher=teacher,
              pseudo_images=0, distill_steps=3, progress=False)
    with pytest.raises(TypeError, match="teacher"):
        R.r2l(NeLF(train.near, train.far, num_points=2, num_freqs=1, width=4, depth=2), train,
              teacher=torch.nn.Linear(2, 2), progress=False)
    with pytest.raises(ValueError, match="rays must be"):
        NeLF(2.0, 6.0)(torch.zeros(3, 5))
