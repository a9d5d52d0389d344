"""Issue 14, part D3a: point scenes (ray casting, beams, camera), BEV AP, the monocular pair and MonoDistill.

Every expected number is worked out by hand or by a plain loop here, independently of the code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from distill import Distiller
from distill import functional as DF
from distill.batch import DenseBatch
from distill.data.pointscenes import (
    CameraConfig,
    LidarConfig,
    beam_elevations,
    cast_rays,
    lidar_scan,
    make_point_scenes,
    points_in_boxes,
    sparse_depth_map,
)
from distill.methods import create_method
from distill.models import create
from distill.models.mono3d import decode_mono, mono_targets
from distill.train.bev_eval import bev_iou, bev_map, evaluate_bev

torch.set_num_threads(1)
D64 = torch.float64


@pytest.fixture(scope="module")
def scenes():
    return make_point_scenes(3, seed=5, objects=(3, 5))


# ----------------------------------------------------------------------------------------------
# ray casting, beams, boxes, camera
# ----------------------------------------------------------------------------------------------


def test_cast_rays_hand_cases():
    boxes = torch.tensor([[10.0, 0, 1, 2, 2, 2, 0], [10.0, 6, 1, 1, 1, 2, 0]], dtype=D64)  # box; cylinder r=0.5
    shapes = torch.tensor([0, 1])
    o = torch.tensor([0.0, 0, 1], dtype=D64)
    s2 = math.sqrt(0.5)
    dirs = torch.tensor([[1.0, 0, 0], [s2, 0, -s2], [0, 0, 1], [10 / math.hypot(10, 6), 6 / math.hypot(10, 6), 0]],
                        dtype=D64)
    t, hit, n = cast_rays(o, dirs, boxes, shapes)
    assert t[0].item() == pytest.approx(9.0) and hit[0] == 0 and n[0].tolist() == pytest.approx([-1, 0, 0])
    assert t[1].item() == pytest.approx(math.sqrt(2)) and hit[1] == -1 and n[1].tolist() == pytest.approx([0, 0, 1])
    assert math.isinf(t[2].item()) and hit[2] == -2
    # towards the cylinder's axis: the hit is one radius short of the axis
    assert t[3].item() == pytest.approx(math.hypot(10, 6) - 0.5) and hit[3] == 1
    assert n[3, :2].tolist() == pytest.approx([-10 / math.hypot(10, 6), -6 / math.hypot(10, 6)])
    # yawed box (45°): the ray along +x meets its corner at x = 10 − √2; a cylinder's top cap from above
    t2, hit2, _ = cast_rays(o, dirs[:1], torch.tensor([[10.0, 0, 1, 2, 2, 2, math.pi / 4]], dtype=D64),
                            torch.tensor([0]))
    assert t2[0].item() == pytest.approx(10 - math.sqrt(2)) and hit2[0] == 0
    t3, hit3, n3 = cast_rays(torch.tensor([10.0, 6, 5], dtype=D64), torch.tensor([[0.0, 0, -1]], dtype=D64),
                             boxes, shapes)
    assert t3[0].item() == pytest.approx(3.0) and hit3[0] == 1 and n3[0].tolist() == pytest.approx([0, 0, 1])
    # max_range drops far hits
    t4, hit4, _ = cast_rays(o, dirs[:1], boxes, shapes, max_range=8.0)
    assert math.isinf(t4[0].item()) and hit4[0] == -2


def test_lidar_points_on_a_wall_at_known_range():
    # a wide box whose front face is the plane x = 19 (|y| <= 5, 0 <= z <= 2); no noise
    cfg = LidarConfig(beams=16, azimuth_resolution=2.0, azimuth_fov=20.0, height=1.8, range_noise=0.0)
    box = torch.tensor([[20.0, 0, 1, 2, 10, 2, 0]])
    pts, hit = lidar_scan(box, torch.tensor([0]), torch.tensor([0]), cfg)
    on = pts[hit == 0].double()
    assert len(on) > 0
    assert on[:, 0].tolist() == pytest.approx([19.0] * len(on), abs=1e-4)
    elev = beam_elevations(16)
    for x, y, z, inten in on.tolist():
        e = math.atan2(z - 1.8, math.hypot(x, y))
        a = math.atan2(y, x)
        assert min(abs(e - float(v)) for v in elev) < 1e-5  # each point lies on one of the 16 beams
        # range along the beam: 19 / (cos e cos a); intensity = 0.6 (car) × |cos incidence| = 0.6 cos e cos a
        assert math.dist((x, y, z), (0, 0, 1.8)) == pytest.approx(19 / (math.cos(e) * math.cos(a)), rel=1e-5)
        assert inten == pytest.approx(0.6 * math.cos(e) * math.cos(a), rel=1e-4)
    # the beams that pass over the 2 m wall (z > 2 at x = 19) reach the ground behind it or nothing
    assert ((1.8 + 19 * torch.tan(elev)) > 2.0).sum() > 0


def test_reduced_beams_are_a_subset(scenes):
    elev64, elev16 = beam_elevations(64), beam_elevations(16)
    assert torch.equal(elev16, elev64[::4]) and len(beam_elevations(32)) == 32
    s16 = scenes.with_beams(16)
    for a, b in zip(scenes.scenes, s16.scenes):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.image, b.image)
        full = {tuple(p) for p in a.points.tolist()}
        assert all(tuple(p) in full for p in b.points.tolist())
        assert 0.15 < len(b.points) / len(a.points) < 0.35
    with pytest.raises(ValueError, match="divisor of 64"):
        make_point_scenes(1, beams=24)


def test_boxes_enclose_the_points_that_hit_them(scenes):
    for sc in scenes.scenes:
        obj = sc.point_object
        assert (obj >= 0).any()
        inside = points_in_boxes(sc.points, sc.boxes, margin=0.1)  # 0.1 m > 4σ of the 0.02 m range noise
        assert inside[obj >= 0].gather(1, obj[obj >= 0, None]).all()
        # and a point that hit the ground is not inside any box grown by less than the noise
        tight = points_in_boxes(sc.points, sc.boxes, margin=-0.1)
        assert not tight[obj < 0].any()
        assert sc.labels.tolist() and all(0 <= k < 3 for k in sc.labels.tolist())


def test_sparse_depth_map_hand_intrinsics():
    k = torch.tensor([[100.0, 0, 40], [0, 50.0, 30], [0, 0, 1]])
    pts = torch.tensor([[10.0, 0, 1.5], [10.0, -2, 0.5], [5.0, 0, 1.5], [-3.0, 0, 1.5], [10.0, 30, 1.5]])
    d = sparse_depth_map(pts, k, 1.5, (64, 80))
    # (10, 0, 1.5) → u = 40, v = 30; (5, 0, 1.5) falls in the same pixel nearer: min depth 5
    # (10, −2, 0.5): x_c = 2, y_c = 1 → u = 40 + 100·0.2 = 60, v = 30 + 50·0.1 = 35; behind / outside: dropped
    expect = torch.zeros(1, 64, 80)
    expect[0, 30, 40] = 5.0
    expect[0, 35, 60] = 10.0
    assert torch.equal(d, expect)


def test_camera_intrinsics_and_scene_depth_agree(scenes):
    k = CameraConfig().intrinsics()
    torch.testing.assert_close(k, torch.tensor([[80.0, 0, 80], [0, 80, 32], [0, 0, 1]]))
    sc = scenes.scenes[0]
    assert torch.equal(sc.depth, sparse_depth_map(sc.points, k, 1.6, (64, 160)))
    assert 0 < (sc.depth > 0).float().mean() < 0.6 and 0 <= sc.image.min() and sc.image.max() <= 1


def test_loader_layout_and_determinism(scenes):
    b = next(iter(scenes.loader(2)))
    assert isinstance(b, DenseBatch) and b.inputs.shape[-1] == 5 and b.inputs.shape[0] == 2
    assert torch.equal(b.point_mask, b.inputs[..., 4] > 0)
    n0 = len(scenes.scenes[0].points)
    assert torch.equal(b.inputs[0, :n0, :4], scenes.scenes[0].points)
    assert not b.inputs[~b.point_mask].any()  # padding rows are all zeros
    assert b.extras["intrinsics"].shape == (2, 3, 3) and b.extras["camera_height"].tolist() == pytest.approx([1.6, 1.6])
    cam = next(iter(scenes.loader(2, inputs="camera")))
    assert cam.inputs.shape == (2, 2, 64, 160) and cam.point_mask is None
    assert torch.equal(cam.inputs[:, 1:], cam.extras["depth"]) and torch.equal(cam.inputs[:, :1], cam.extras["image"])
    again = make_point_scenes(3, seed=5, objects=(3, 5))
    assert all(torch.equal(a.points, c.points) for a, c in zip(scenes.scenes, again.scenes))
    other = make_point_scenes(1, seed=6, objects=(3, 5))
    assert not torch.equal(other.scenes[0].boxes[:1], scenes.scenes[0].boxes[:1])
    with pytest.raises(ValueError, match="inputs must be"):
        scenes.loader(2, inputs="lidar")


# ----------------------------------------------------------------------------------------------
# BEV AP
# ----------------------------------------------------------------------------------------------


def test_bev_iou_hand_cases():
    a = np.array([[0, 0, 0, 4, 2, 1, 0.0]])
    b = np.array([[1, 0, 5, 4, 2, 3, 0.0],  # shifted 1 m: overlap 3·2 = 6, union 10
                  [0, 0, 0, 4, 2, 1, math.pi / 2],  # crossed: overlap 2·2 = 4, union 12
                  [0, 0, 0, 4, 2, 1, math.pi],  # half turn: the same rectangle
                  [9, 9, 0, 4, 2, 1, 0.0]])
    assert bev_iou(a, b)[0].tolist() == pytest.approx([0.6, 1 / 3, 1.0, 0.0])
    sq = np.array([[0, 0, 0, 2, 2, 1, 0.0]])
    rot = np.array([[0, 0, 0, 2, 2, 1, math.pi / 4]])
    octagon = 8 * (math.sqrt(2) - 1)  # the intersection of a 2x2 square and its 45° turn
    assert bev_iou(sq, rot)[0, 0] == pytest.approx(octagon / (8 - octagon))


def _gt():
    return [{"boxes": torch.tensor([[10.0, 0, 1, 4, 2, 1.5, 0]]), "labels": torch.tensor([0])},
            {"boxes": torch.tensor([[20.0, 3, 1, 4, 2, 1.5, 0]]), "labels": torch.tensor([0])}]


def test_bev_map_perfect_shifted_and_false_positive():
    gt = _gt()
    perfect = [{"boxes": g["boxes"], "scores": torch.tensor([0.9]), "labels": g["labels"]} for g in gt]
    assert bev_map(perfect, gt, (0.5, 0.7)) == pytest.approx({"bev_ap_50": 100, "bev_ap_70": 100, "bev_ap": 100})
    shifted = [perfect[0], {"boxes": torch.tensor([[21.0, 3, 1, 4, 2, 1.5, 0]]), "scores": torch.tensor([0.8]),
                            "labels": torch.tensor([0])}]
    # IoU 0.6: a match at 0.5; at 0.7 one of two boxes found first → precision 1 up to recall 0.5:
    # 51 of COCO's 101 recall points (0, 0.01, ..., 0.5)
    r = bev_map(shifted, gt, (0.5, 0.7))
    assert r["bev_ap_50"] == pytest.approx(100) and r["bev_ap_70"] == pytest.approx(100 * 51 / 101)
    # a higher-scored false positive before the only true positive: precision 1/2 at every recall
    fp = [{"boxes": torch.tensor([[30.0, -5, 1, 4, 2, 1.5, 0], [10.0, 0, 1, 4, 2, 1.5, 0]]),
           "scores": torch.tensor([0.95, 0.9]), "labels": torch.tensor([0, 0])}]
    assert bev_map(fp, gt[:1], (0.5,))["bev_ap"] == pytest.approx(50)
    wrong_class = [{**p, "labels": torch.tensor([1])} for p in perfect]
    assert bev_map(wrong_class, gt, (0.5,), num_classes=2)["bev_ap"] == pytest.approx(0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        bev_map(perfect, gt, (1.5,))
    with pytest.raises(ValueError, match="expected \\(n, 7\\)"):
        bev_map([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.zeros(1)}], gt[:1])


def test_evaluate_bev_calls_predict_with_intrinsics(scenes):
    class Oracle(torch.nn.Module):  # predicts the ground truth of the scenes in loader order
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = 0

        def predict(self, x, intrinsics=None):
            assert intrinsics is not None and intrinsics.shape == (x.shape[0], 3, 3)
            out = []
            for _ in range(x.shape[0]):
                sc = scenes.scenes[self.seen]
                self.seen += 1
                out.append({"boxes": sc.boxes, "scores": torch.ones(len(sc.boxes)), "labels": sc.labels})
            return out

    assert evaluate_bev(Oracle(), scenes.loader(2, inputs="camera"))["bev_ap"] == pytest.approx(100)


# ----------------------------------------------------------------------------------------------
# the monocular model's geometry
# ----------------------------------------------------------------------------------------------


def test_mono_targets_hand_projection():
    k = torch.tensor([[80.0, 0, 80], [0, 80.0, 32], [0, 0, 1]])
    boxes = [torch.tensor([[10.0, 0, 1.6, 4, 2, 1.5, 0.0], [20.0, -4.5, 0.6, 0.8, 0.8, 1.8, 0.3]])]
    t = mono_targets(boxes, [torch.tensor([0, 1])], k, 1.6, (16, 40), 4, 3)
    # box 0: x_c = 0, y_c = 0 → (u, v) = (80, 32) → cell (row 8, col 20), offset (0, 0), depth 10
    # box 1: x_c = 4.5, y_c = 1 → u = 80 + 80·4.5/20 = 98, v = 32 + 80/20 = 36 → /4 = (24.5, 9): cell (9, 24)
    assert t.index[0].tolist() == [8 * 40 + 20, 9 * 40 + 24] and t.mask[0].tolist() == [True, True]
    torch.testing.assert_close(t.offset[0], torch.tensor([[0.0, 0], [0.5, 0]]))
    assert t.depth[0].tolist() == pytest.approx([10, 20])
    assert t.log_size[0, 1].tolist() == pytest.approx([math.log(0.8), math.log(0.8), math.log(1.8)], rel=1e-6)
    alpha = 0.3 - math.atan2(-4.5, 20)
    assert t.yaw[0, 1].tolist() == pytest.approx([math.sin(2 * alpha), math.cos(2 * alpha)], rel=1e-5)
    assert t.heatmap[0, 0, 8, 20] == 1 and t.heatmap[0, 1, 9, 24] == 1 and t.heatmap[0, 2].max() == 0
    assert t.heatmap[0, 0, 8, 21] < 1


def test_decode_inverts_the_targets():
    k = torch.tensor([[80.0, 0, 80], [0, 80.0, 32], [0, 0, 1]])
    boxes = torch.tensor([[12.0, 1.3, 0.8, 4.2, 1.8, 1.6, 0.7], [25.0, -6.1, 1.4, 7.0, 2.4, 2.8, -2.0]])
    t = mono_targets([boxes], [torch.tensor([0, 2])], k, 1.6, (16, 40), 4, 3)
    out = {"logits": torch.full((1, 3, 16, 40), -10.0), "offset": torch.zeros(1, 2, 16, 40),
           "depth": torch.zeros(1, 1, 16, 40), "size": torch.zeros(1, 3, 16, 40), "yaw": torch.zeros(1, 2, 16, 40)}
    for j, c in enumerate([0, 2]):
        cell = int(t.index[0, j])
        r, col = divmod(cell, 40)
        out["logits"][0, c, r, col] = 5.0
        out["offset"][0, :, r, col] = t.offset[0, j]
        z = float(t.depth[0, j])
        out["depth"][0, 0, r, col] = -math.log(z)  # 1/σ(o) − 1 = z  ⇔  o = −log z
        out["size"][0, :, r, col] = t.log_size[0, j]
        out["yaw"][0, :, r, col] = t.yaw[0, j]
    det = decode_mono(out, k, 1.6, 4)[0]
    order = det["labels"].argsort()
    got = det["boxes"][order]
    assert det["labels"][order].tolist() == [0, 2]
    torch.testing.assert_close(got[:, :6], boxes[:, :6], atol=1e-3, rtol=0)
    dyaw = torch.remainder(got[:, 6] - boxes[:, 6], math.pi)  # boxes are symmetric under a half turn
    assert torch.minimum(dyaw, math.pi - dyaw).max() < 1e-3


# ----------------------------------------------------------------------------------------------
# MonoDistill's terms against plain loops
# ----------------------------------------------------------------------------------------------


def _affinity_loop(f: torch.Tensor, normalize: bool) -> np.ndarray:
    b, c, h, w = f.shape
    v = f.double().numpy().reshape(b, c, h * w)
    a = np.zeros((b, h * w, h * w))
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                dot = sum(v[n, ch, i] * v[n, ch, j] for ch in range(c))
                if normalize:
                    dot /= math.sqrt(sum(v[n, ch, i] ** 2 for ch in range(c))) * math.sqrt(
                        sum(v[n, ch, j] ** 2 for ch in range(c)))
                a[n, i, j] = dot
    return a


def test_affinity_and_scene_loss():
    f = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])  # f_0 = (1, 0), f_1 = (1, 1)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(DF.monodistill_affinity(f)[0], torch.tensor([[1, r], [r, 1]]))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 2, 3, generator=g)
    for norm in (True, False):
        expect = np.abs(_affinity_loop(t, norm) - _affinity_loop(s, norm)).sum() / (2 * 6 * 6)
        assert DF.monodistill_scene_loss(s, t, normalize=norm).item() == pytest.approx(expect, rel=1e-5)


def test_object_and_result_losses_against_loops():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    mask = DF.box_cell_mask([torch.tensor([[1.2, 0.5, 2.1, 1.0]]), torch.tensor([[0.0, 2.0, 1.0, 4.0]])], (4, 5))
    # image 0: rows [0, 1), cols [1, 3); image 1: rows [2, 4), cols [0, 1)
    cells = [(0, 0, 1), (0, 0, 2), (1, 2, 0), (1, 3, 0)]
    expect_mask = torch.zeros(2, 4, 5)
    for b, r, c in cells:
        expect_mask[b, r, c] = 1
    assert torch.equal(mask, expect_mask)
    of = sum(sum((s[b, ch, r, c] - t[b, ch, r, c]).item() ** 2 for ch in range(3)) / 3 for b, r, c in cells) / 4
    assert DF.monodistill_object_loss(s, t, mask).item() == pytest.approx(of, rel=1e-5)
    s2, t2 = torch.randn(2, 2, 4, 5, generator=g), torch.randn(2, 2, 4, 5, generator=g)
    orr = sum(sum(abs((x[b, ch, r, c] - y[b, ch, r, c]).item()) for ch in range(x.shape[1])) / x.shape[1]
              for x, y in ((s, t), (s2, t2)) for b, r, c in cells) / 4
    assert DF.monodistill_result_loss([s, s2], [t, t2], mask).item() == pytest.approx(orr, rel=1e-5)
    assert DF.monodistill_object_loss(s, t, torch.zeros(2, 4, 5)).item() == 0.0


def test_heatmap_focal_loss_against_loop():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 3, 3, generator=g)
    heat = torch.rand(1, 2, 3, 3, generator=g) * 0.9
    heat[0, 0, 1, 1] = 1.0
    heat[0, 1, 2, 0] = 1.0
    total = 0.0
    for c in range(2):
        for i in range(3):
            for j in range(3):
                p = 1 / (1 + math.exp(-logits[0, c, i, j].item()))
                y = heat[0, c, i, j].item()
                total += (1 - p) ** 3 * math.log(p) if y == 1 else (1 - y) ** 5 * p ** 3 * math.log(1 - p)
    got = DF.mono_heatmap_focal_loss(logits, heat, alpha=3.0, beta=5.0).item()
    assert got == pytest.approx(-total / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# the methods on the models
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def camera_batch():
    data = make_point_scenes(2, seed=11, objects=(2, 3))
    return next(iter(data.loader(2, inputs="camera")))


def test_mono3d_loss_against_independent_terms(camera_batch):
    torch.manual_seed(0)
    model = create("mono_student", widths=(4, 8, 8, 8), head_width=8)
    out = model(camera_batch.inputs)
    view = {"logits": out["logits"], "offset_out": out["offset"], "depth_out": out["depth"], "size_out": out["size"],
            "yaw_out": out["yaw"]}
    loss = create_method("mono3d_loss", heatmap=0.5, offset=2.0, depth=0.25, size=3.0, yaw=1.5)
    got = loss(view, {}, camera_batch).item()
    t = mono_targets(camera_batch.boxes, camera_batch.labels, camera_batch.extras["intrinsics"], 1.6, (16, 40), 4, 3)
    expect = 0.5 * DF.mono_heatmap_focal_loss(out["logits"], t.heatmap).item()
    n = int(t.mask.sum())
    for b in range(2):
        for j in range(t.mask.shape[1]):
            if not t.mask[b, j]:
                continue
            r, c = divmod(int(t.index[b, j]), 40)
            dz = 1 / torch.sigmoid(out["depth"][b, 0, r, c]).item() - 1
            expect += 2.0 * (out["offset"][b, :, r, c] - t.offset[b, j]).abs().sum().item() / n
            expect += 0.25 * abs(dz - t.depth[b, j].item()) / n
            expect += 3.0 * (out["size"][b, :, r, c] - t.log_size[b, j]).abs().sum().item() / n
            expect += 1.5 * (out["yaw"][b, :, r, c] - t.yaw[b, j]).abs().sum().item() / n
    assert got == pytest.approx(expect, rel=1e-4)


def _fake_views(seed: int, batch: DenseBatch, c: int = 6):
    g = torch.Generator().manual_seed(seed)
    v = {"logits": torch.randn(2, 3, 16, 40, generator=g), "feat": torch.randn(2, c, 16, 40, generator=g)}
    for name, ch in (("offset_out", 2), ("depth_out", 1), ("size_out", 3), ("yaw_out", 2)):
        v[name] = torch.randn(2, ch, 16, 40, generator=g)
    return v


def test_monodistill_weights_each_term(camera_batch):
    s, t = _fake_views(0, camera_batch), _fake_views(1, camera_batch)
    m = create_method("monodistill", scene_weight=0.3, object_weight=7.0, result_weight=2.0, adapter=False,
                      normalize=False)
    m.prepare(s, t, camera_batch)
    got = m(s, t, camera_batch).item()
    tg = mono_targets(camera_batch.boxes, camera_batch.labels, camera_batch.extras["intrinsics"], 1.6, (16, 40), 4, 3)
    m_of = DF.box_cell_mask(tg.boxes2d, (16, 40))
    m_or = (tg.heatmap.amax(1) >= math.exp(-2)).float()
    heads = ("offset_out", "depth_out", "size_out", "yaw_out")
    expect = (0.3 * DF.monodistill_scene_loss(s["feat"], t["feat"], normalize=False).item()
              + 7.0 * DF.monodistill_object_loss(s["feat"], t["feat"], m_of).item()
              + 2.0 * DF.monodistill_result_loss([s[h] for h in heads], [t[h] for h in heads], m_or).item())
    assert got == pytest.approx(expect, rel=1e-5)
    assert m_of.sum() > m_or.sum() > 0  # objects' boxes cover more cells than their centres' neighbourhoods


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_monodistill_zero_at_teacher_nonnegative_and_student_only_gradient(camera_batch, seed, scale):
    m = create_method("monodistill", adapter=False)
    t = {k: v * scale for k, v in _fake_views(seed, camera_batch).items()}
    m.prepare(t, t, camera_batch)
    assert m(t, t, camera_batch).item() == pytest.approx(0.0, abs=1e-5)
    s = {k: v.clone().requires_grad_(True) for k, v in _fake_views(seed + 1, camera_batch).items()}
    tt = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    loss = m(s, tt, camera_batch)
    assert loss.item() >= 0
    loss.backward()
    assert s["feat"].grad is not None and s["feat"].grad.abs().sum() > 0 and s["offset_out"].grad.abs().sum() > 0
    assert all(v.grad is None for v in tt.values())


def test_student_trains_with_monodistill_and_teacher_stays_frozen():
    data = make_point_scenes(4, seed=21, objects=(2, 3))
    loader = data.loader(2, shuffle=True, inputs="camera")
    torch.manual_seed(0)
    teacher = create("mono_teacher", widths=(4, 8, 12, 12), head_width=8)
    student = create("mono_student", widths=(4, 8, 8, 8), head_width=8)
    d = Distiller(student, teacher, losses={"mono3d_loss": 1.0, "monodistill": 1.0})
    d.prepare(next(iter(loader)))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = [p.clone() for p in student.parameters()]
    opt = torch.optim.Adam(list(d.trainable_parameters()), 1e-3)
    first = None
    for _ in range(2):
        for b in loader:
            out = d(b)
            first = first if first is not None else {k: float(v) for k, v in out.parts.items()}
            out.total.backward()
            opt.step()
            opt.zero_grad()
    assert set(first) == {"mono3d_loss", "monodistill"} and first["monodistill"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    # the adapter maps the student's 8 channels onto the teacher's 12
    assert d.methods["monodistill"].adapter[-1].out_channels == 12
    preds = student.predict(b.inputs, b.extras["intrinsics"], score_threshold=0.0, max_detections=5)
    assert len(preds) == 2 and preds[0]["boxes"].shape == (5, 7)


def test_clear_errors(camera_batch):
    with pytest.raises(ValueError, match="needs DenseBatch"):
        create_method("mono3d_loss")({"logits": torch.zeros(1, 3, 4, 4)}, {}, DenseBatch(torch.zeros(1, 1, 16, 16)))
    with pytest.raises(ValueError, match="scene_weight must be >= 0"):
        create_method("monodistill", scene_weight=-1)
    with pytest.raises(ValueError, match="input channel 2"):
        create("mono_student", input_channel=2)(torch.zeros(1, 2, 64, 160))
    with pytest.raises(ValueError, match="divisible by 8"):
        create("mono_student")(torch.zeros(1, 2, 60, 160))
    with pytest.raises(ValueError, match="extras\\['camera_height'\\]"):
        b = DenseBatch(camera_batch.inputs, boxes=camera_batch.boxes, labels=camera_batch.labels,
                       extras={"intrinsics": camera_batch.extras["intrinsics"]})
        create_method("mono3d_loss")({"logits": torch.zeros(2, 3, 16, 40)}, {}, b)
