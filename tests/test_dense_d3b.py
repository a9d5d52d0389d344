"""Point-cloud BEV detectors (PointPillars / PointNet + CenterPoint head) and the 3D distillation
methods: lidar_distill, pointdistiller, sparse_kd3d, sparse_kd3d_label; checked against numbers
worked out by hand or by plainly written loops."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import Distiller
from distill.batch import DenseBatch
from distill.functional import dense3d as D
from distill.methods import create_method, method_info
from distill.methods.dense3d import BeamTeacher, with_teacher_points
from distill.models import create
from distill.models.pointcloud import (
    BEVGrid,
    PointNetBEV,
    PointPillarsBEV,
    bev_targets,
    cell_counts,
    cell_index,
    decode_bev,
    gaussian_radius,
    scatter_max,
    valid_points,
)

torch.set_num_threads(1)

SMALL = BEVGrid((0.0, 16.0), (-8.0, 8.0), (-1.0, 5.0), 1.0)  # 16 x 16 cells


def scenes(n: int = 2, seed: int = 0, grid: BEVGrid = SMALL, pts: int = 300) -> DenseBatch:
    """Stand-in scenes in the point scenes' layout: (B, P, 5) = x, y, z, intensity, valid; boxes (n, 7)."""
    g = torch.Generator().manual_seed(seed)
    rows, boxes, labels = [], [], []
    for _ in range(n):
        c = torch.stack([torch.tensor([4.0, -3.0]), torch.tensor([11.0, 4.0])]) + torch.rand(2, 2, generator=g)
        size = torch.tensor([[3.0, 1.8, 1.5], [0.8, 0.8, 1.7]])
        bx = torch.cat([c, size[:, 2:] / 2, size, torch.tensor([[0.3], [0.0]])], 1)
        p = [(torch.rand(100, 3, generator=g) - 0.5) * size[j] + bx[j, :3] for j in range(2)]
        ground = torch.cat([torch.rand(pts - 200, 1, generator=g) * 16, (torch.rand(pts - 200, 1, generator=g) - .5) * 16,
                            torch.full((pts - 200, 1), 0.02)], 1)
        xyz = torch.cat(p + [ground])
        row = torch.cat([xyz, torch.rand(pts, 1, generator=g), torch.ones(pts, 1)], 1)
        row = torch.cat([row, torch.zeros(20, 5)])  # padding rows
        rows.append(row)
        boxes.append(bx)
        labels.append(torch.tensor([0, 1]))
    return DenseBatch(torch.stack(rows), boxes=boxes, labels=labels)


def small_pair() -> tuple[PointPillarsBEV, PointPillarsBEV]:
    torch.manual_seed(0)
    return PointPillarsBEV(3, 5, 16, (16, 16), SMALL), PointPillarsBEV(3, 5, 8, (8, 8), SMALL)


# ------------------------------------------------------------------------------------------ the models


def test_scatter_max_and_counts_match_a_loop():
    g = torch.Generator().manual_seed(1)
    grid = BEVGrid((0.0, 4.0), (-2.0, 2.0), (-1.0, 1.0), 1.0)
    pts = torch.cat([torch.rand(2, 40, 1, generator=g) * 5 - 0.5, torch.rand(2, 40, 1, generator=g) * 5 - 2.5,
                     torch.rand(2, 40, 1, generator=g) * 2.4 - 1.2], -1)
    valid = torch.rand(2, 40, generator=g) > 0.2
    feats = torch.randn(2, 40, 3, generator=g)
    index, keep = cell_index(pts, valid, grid)
    out = scatter_max(feats, index, keep, grid)
    counts = cell_counts(index, keep, grid)
    want = torch.zeros(2, 3, 4, 4)
    want_counts = torch.zeros(2, 1, 4, 4)
    seen = set()
    for b in range(2):
        for p in range(40):
            x, y, z = pts[b, p].tolist()
            if not valid[b, p] or not (0 <= x < 4 and -2 <= y < 2 and -1 <= z < 1):
                continue
            col, row = int(math.floor(x)), int(math.floor(y + 2))
            want_counts[b, 0, row, col] += 1
            if (b, row, col) not in seen:
                want[b, :, row, col] = feats[b, p]
                seen.add((b, row, col))
            else:
                want[b, :, row, col] = torch.maximum(want[b, :, row, col], feats[b, p])
    assert torch.equal(out, want)
    assert torch.equal(counts, want_counts)
    assert 0 < len(seen) < 32  # some cells empty, some filled


def test_padding_conventions():
    pts = torch.tensor([[[1.0, 2.0, 0.5, 0.3, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]]])
    assert valid_points(pts, valid_column=4).tolist() == [[True, False, False]]
    assert valid_points(pts).tolist() == [[True, False, True]]  # no validity column: zero rows are padding
    assert valid_points(pts, torch.tensor([[False, True, True]])).tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="point_mask must be"):
        valid_points(pts, torch.ones(1, 2, dtype=torch.bool))
    model = create("pillars_student")
    with pytest.raises(ValueError, match=r"expects points \(B, P, 5\)"):
        model(torch.zeros(1, 10, 4))
    # a padded copy of a scene gives the same output as the scene alone
    b = scenes(1)
    model.eval()
    grid_model = PointPillarsBEV(3, 5, 8, (8, 8), SMALL).eval()
    a = grid_model(b.inputs)["heatmap"]
    c = grid_model(torch.cat([b.inputs, torch.zeros(1, 50, 5)], 1))["heatmap"]
    assert torch.allclose(a, c, atol=1e-6)


def test_models_shapes_taps_and_registry():
    b = scenes(2)
    for model in (*small_pair(), PointNetBEV(3, 5, (8, 8), 8, SMALL)):
        out = model(b.inputs)
        assert out["heatmap"].shape == (2, 3, 16, 16) and out["reg"].shape == (2, 8, 16, 16)
        assert out["logits"].shape == (2, 256, 3)
        assert torch.equal(out["logits"][:, 5 * 16 + 7], out["heatmap"][:, :, 5, 7])
        names = dict(model.named_modules())
        for t in ("point_features", "pillar_bev", "pillar_counts", "bev_features", "heatmap_out", "reg_out"):
            assert isinstance(names[t], torch.nn.Identity)
    for name in ("pillars_teacher", "pillars_student", "pointnet_bev_student"):
        m = create(name)
        assert (m.grid.height, m.grid.width) == (64, 64) and m.grid.x_range == (0.0, 40.0)
    t, s = create("pillars_teacher"), create("pillars_student")
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in t.parameters()) / 3


def test_gaussian_radius_hand_numbers():
    # h = 4, w = 2 cells, overlap 0.1: the three CornerNet roots are 4.567, 8.683 and 1.2 (worked by hand)
    r = gaussian_radius(torch.tensor([4.0]), torch.tensor([2.0]), 0.1)
    assert float(r) == pytest.approx(1.2, abs=1e-5)
    r = gaussian_radius(torch.tensor([40.0]), torch.tensor([40.0]), 0.7)
    # third case: a = 4·0.7 = 2.8, b = -2·0.7·80 = -112, c = -0.3·1600 = -480, root (b + sqrt(b² - 4ac)) / 2
    # (divided by 2, not 2a, as CornerNet's and CenterPoint's code do)
    r3 = (-112 + math.sqrt(112 ** 2 + 4 * 2.8 * 480)) / 2
    r1 = (80 + math.sqrt(80 ** 2 - 4 * 1600 * 0.3 / 1.7)) / 2
    r2 = (160 + math.sqrt(160 ** 2 - 16 * 0.3 * 1600)) / 2
    assert float(r) == pytest.approx(min(r1, r2, r3), rel=1e-5)


def test_bev_targets_hand_numbers():
    box = torch.tensor([[5.3, -2.6, 0.8, 4.0, 2.0, 1.6, 0.5]])  # centre in cell col 5, row 5 of SMALL
    t = bev_targets([box], [torch.tensor([2])], SMALL, 3, min_radius=1, min_overlap=0.1)
    assert t.index.tolist() == [[5 * 16 + 5]] and t.mask.tolist() == [[True]]
    want = [0.3, 0.4, 0.8, math.log(4.0), math.log(2.0), math.log(1.6), math.sin(0.5), math.cos(0.5)]
    assert t.reg[0, 0].tolist() == pytest.approx(want, abs=1e-5)
    hm = t.heatmap[0, 2]
    assert float(hm[5, 5]) == 1.0 and t.heatmap[0, :2].abs().sum() == 0
    # radius = max(1, floor(1.2)) = 1 (h = dy = 2, w = dx = 4 cells), sigma = 3 / 6 = 0.5
    assert float(hm[5, 6]) == pytest.approx(math.exp(-1 / (2 * 0.25)), rel=1e-5)
    assert float(hm[6, 6]) == pytest.approx(math.exp(-2 / (2 * 0.25)), rel=1e-5)
    assert float(hm[5, 7]) == 0.0  # outside the (2r + 1)² window
    assert float(t.heatmap.sum()) == pytest.approx(1 + 4 * math.exp(-2) + 4 * math.exp(-4), rel=1e-5)


def test_decode_inverts_the_targets():
    boxes = torch.tensor([[5.3, -2.6, 0.8, 4.0, 2.0, 1.6, 0.5], [12.7, 3.1, 0.9, 0.7, 0.6, 1.8, -2.0]])
    t = bev_targets([boxes], [torch.tensor([2, 0])], SMALL, 3)
    hm = torch.full((1, 3, 16, 16), -8.0)
    reg = torch.zeros(1, 8, 16, 16)
    for j, k in enumerate([2, 0]):
        hm[0, k].view(-1)[t.index[0, j]] = 3.0 - j
        reg[0].view(8, -1)[:, t.index[0, j]] = t.reg[0, j]
    out = decode_bev(hm, reg, SMALL, score_threshold=0.5)[0]
    assert out["labels"].tolist() == [2, 0]
    assert out["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item(),
                                                    torch.sigmoid(torch.tensor(2.0)).item()])
    assert torch.allclose(out["boxes"], boxes, atol=1e-5)


# ------------------------------------------------------------------------------------------ the task loss


def test_centernet_focal_loss_hand_numbers():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)  # p = 0.5, 0.75
    target = torch.tensor([1.0, 0.5]).view(1, 1, 1, 2)
    # alpha = 3, beta = 2: -( (1-0.5)^3 log 0.5 + (1-0.5)^2 0.75^3 log 0.25 ) / 1
    want = -(0.125 * math.log(0.5) + 0.25 * 0.75 ** 3 * math.log(0.25))
    assert float(D.centernet_focal_loss(logits, target, alpha=3.0, beta=2.0)) == pytest.approx(want, rel=1e-5)
    # two centres: the sum is divided by 2
    two = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)
    want2 = -(0.25 * math.log(0.5) + 0.0625 * math.log(0.75)) / 2
    assert float(D.centernet_focal_loss(logits, two)) == pytest.approx(want2, rel=1e-5)


def test_center_reg_loss_hand_numbers():
    reg = torch.zeros(1, 2, 2, 2)
    reg[0, :, 1, 0] = torch.tensor([1.0, -2.0])  # cell index 2
    reg[0, :, 0, 1] = torch.tensor([0.5, 0.5])  # cell index 1
    index = torch.tensor([[2, 1, 3]])
    mask = torch.tensor([[True, True, False]])
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]]])
    w = torch.tensor([1.0, 3.0])
    # (|1| + 3|-2| + |−0.5| + 3|−0.5|) / 2 boxes
    assert float(D.center_reg_loss(reg, index, mask, target, w)) == pytest.approx((1 + 6 + 0.5 + 1.5) / 2)


def test_bev_loss_method_combines_focal_and_l1():
    student, _ = small_pair()
    b = scenes(2)
    m = create_method("bev_loss", reg_weight=0.5, heatmap_weight=2.0, min_radius=1)
    m.bind_models(student, None, b)
    out = student(b.inputs)
    view = {"heatmap_out": out["heatmap"], "reg_out": out["reg"]}
    t = bev_targets(b.boxes, b.labels, SMALL, 3, min_radius=1)
    want = 2.0 * D.centernet_focal_loss(out["heatmap"], t.heatmap) + 0.5 * D.center_reg_loss(out["reg"], t.index,
                                                                                              t.mask, t.reg)
    assert float(m(view, {}, b).detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert method_info("bev_loss").defaults["reg_weight"] == 0.25


# ------------------------------------------------------------------------------------------ LiDAR Distillation


def test_box_region_weights_and_lidar_loss_by_hand():
    grid = BEVGrid((0.0, 4.0), (0.0, 4.0), (-1.0, 1.0), 1.0)
    # box 1 covers cell centres x ∈ {0.5, 1.5}, y ∈ {0.5}: 2 cells; box 2 covers x = 1.5, y ∈ {0.5, 1.5, 2.5}: 3 cells
    boxes = [torch.tensor([[1.0, 0.5, 0, 2.0, 0.4, 1, 0], [1.5, 1.5, 0, 0.6, 2.2, 1, 0]]), torch.zeros(0, 7)]
    w, n = D.box_region_weights(boxes, grid)
    want = torch.zeros(2, 4, 4)
    want[0, 0, 0] += 1 / 2
    want[0, 0, 1] += 1 / 2
    for r in range(3):
        want[0, r, 1] += 1 / 3
    assert n == 2 and torch.allclose(w, want)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    total = 0.0
    for b in range(2):
        for r in range(4):
            for c in range(4):
                total += float(want[b, r, c]) * math.sqrt(float(((t[b, :, r, c] - s[b, :, r, c]) ** 2).sum()))
    assert float(D.lidar_distill_loss(s, t, w, n)) == pytest.approx(total / 2, rel=1e-5)


def test_lidar_distill_method_reads_the_teachers_boxes_and_scan():
    teacher, _ = small_pair()
    student = PointPillarsBEV(3, 5, 16, (16, 16), SMALL)
    high = scenes(2, seed=0)
    low = replace(high, inputs=high.inputs * (torch.arange(high.inputs.shape[1]) % 2 == 0).float().view(1, -1, 1))
    batch = with_teacher_points(low, high)
    m = create_method("lidar_distill", region="gt")
    d = Distiller(student, BeamTeacher(teacher), {"lidar_distill": m}).prepare(batch)
    out = d(batch)
    with torch.no_grad():
        tf = teacher.eval()
        t_bev = {}
        h = tf.bev_features.register_forward_hook(lambda mod, i, o: t_bev.setdefault("t", o))
        tf(high.inputs)  # the teacher sees the full scan
        h.remove()
    w, n = D.box_region_weights(low.boxes, SMALL)
    want = D.lidar_distill_loss(out.student["bev_features"], t_bev["t"], w, n)
    assert float(out.parts["lidar_distill"]) == pytest.approx(float(want.detach()), rel=1e-5)
    # region="teacher": the teacher's own decoded boxes
    m2 = create_method("lidar_distill", score_threshold=0.0, max_boxes=3)
    d2 = Distiller(student, BeamTeacher(teacher), {"lidar_distill": m2}).prepare(batch)
    out2 = d2(batch)
    boxes = [p["boxes"] for p in decode_bev(out2.teacher["heatmap_out"], out2.teacher["reg_out"], SMALL,
                                            score_threshold=0.0, max_detections=3)]
    w2, n2 = D.box_region_weights(boxes, SMALL)
    assert n2 == 6
    want2 = D.lidar_distill_loss(out2.student["bev_features"], out2.teacher["bev_features"], w2, n2)
    assert float(out2.parts["lidar_distill"]) == pytest.approx(float(want2.detach()), rel=1e-5)
    with pytest.raises(KeyError, match="teacher_points"):
        d(low)
    other = scenes(2, seed=5)
    with pytest.raises(ValueError, match="not the same scene"):
        with_teacher_points(low, other)


# ------------------------------------------------------------------------------------------ PointDistiller


def test_pointdistiller_graph_and_reweighting_against_a_loop():
    g = torch.Generator().manual_seed(3)
    b, n, c, s_, k, tau = 2, 12, 3, 4, 3, 0.7
    tf = torch.randn(b, n, c, generator=g)
    sf = torch.randn(b, n, c, generator=g)
    counts = torch.randperm(n, generator=g).float().expand(b, n).clone()
    counts[1] = counts[1].flip(0)
    centres = D.topk_cells(counts, s_)
    nbrs = D.knn_indices(tf, tf.gather(1, centres.unsqueeze(-1).expand(-1, -1, c)), k, candidates=counts > 0)
    gt, gs = D.graph_features(tf, centres, nbrs), D.graph_features(sf, centres, nbrs)
    loss = D.reweighted_graph_loss(gs, gt, counts.gather(1, centres), tau)
    tn, sn, cn = tf.numpy().astype(np.float64), sf.numpy().astype(np.float64), counts.numpy().astype(np.float64)
    total = 0.0
    for i in range(b):
        top = np.argsort(-cn[i], kind="stable")[:s_]
        imp = cn[i, top]
        omega = np.exp(imp / tau - (imp / tau).max())
        omega = omega / omega.sum() * s_
        for j, centre in enumerate(top):
            d = ((tn[i] - tn[i, centre]) ** 2).sum(1)
            d[cn[i] == 0] = np.inf  # the empty pillar is never a neighbour
            near = np.argsort(d, kind="stable")[:k]
            for nb in near:
                et = np.concatenate([tn[i, nb], tn[i, centre]])
                es = np.concatenate([sn[i, nb], sn[i, centre]])
                total += omega[j] * ((et - es) ** 2).sum()
    assert float(loss) == pytest.approx(total / (b * 2 * c * s_ * k), rel=1e-5)
    assert sorted(centres[0].tolist()) == sorted(np.argsort(-cn[0])[:s_].tolist())
    empty = int((counts[0] == 0).nonzero())
    assert empty not in nbrs[0].flatten().tolist()
    assert empty in D.knn_indices(tf, tf, n)[0, 0].tolist()  # without candidates every row is a neighbour


def test_pointdistiller_method_trains_both_adapters_only_on_the_student_side():
    teacher, student = small_pair()
    b = scenes(2)
    d = Distiller(student, teacher, {"pointdistiller": create_method("pointdistiller", num_voxels=8, k=4, tau=0.5,
                                                                      channels=6)}).prepare(b)
    m = d.methods["pointdistiller"]
    assert m.student_adapt[0].in_channels == 16 and m.teacher_adapt[0].in_channels == 32
    out = d(b)
    out.total.backward()
    assert student.pfn.weight.grad is not None and student.pfn.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert m.teacher_adapt[0].weight.grad is not None
    gs, gt, imp = m.graphs(out.student, out.teacher)
    want = D.reweighted_graph_loss(m.student_adapt(gs), m.teacher_adapt(gt), imp, 0.5)
    assert float(out.parts["pointdistiller"]) == pytest.approx(float(want.detach()) * 2.0, rel=1e-5)  # default weight 2


# ------------------------------------------------------------------------------------------ sparse KD


def test_pivotal_masks_and_logit_kd_by_hand():
    t = torch.tensor([[[[0.0, 2.0], [-1.0, 1.0]], [[1.0, -3.0], [3.0, 0.0]]]])  # (1, 2, 2, 2)
    s = torch.zeros(1, 2, 2, 2)
    y = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]], [[0.2, 0.0], [0.0, 0.25]]]])
    sig = torch.sigmoid
    soft = D.pivotal_mask_soft(t, y)
    want = torch.tensor([[[sig(torch.tensor(1.0)) * 1.0, sig(torch.tensor(2.0)) * 0.5],
                          [sig(torch.tensor(3.0)) * 0.0, sig(torch.tensor(1.0)) * 0.25]]])
    assert torch.allclose(soft, want)
    rank = D.pivotal_mask_rank(t, 2)  # the two largest logits: 3.0 at (1, 0) and 2.0 at (0, 1)
    assert rank.tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    # loss with the rank mask: ((0.5 - σ(2))² + (0.5 - σ(-3))²) + ((0.5 - σ(-1))² + (0.5 - σ(3))²) over 2 cells
    want_loss = ((0.5 - sig(torch.tensor(2.0))) ** 2 + (0.5 - sig(torch.tensor(-3.0))) ** 2
                 + (0.5 - sig(torch.tensor(-1.0))) ** 2 + (0.5 - sig(torch.tensor(3.0))) ** 2) / 2
    assert float(D.pivotal_logit_kd(s, t, rank)) == pytest.approx(float(want_loss), rel=1e-5)


def test_sparse_kd3d_method_uses_the_ground_truth_gaussians():
    teacher, student = small_pair()
    b = scenes(2)
    d = Distiller(student, teacher, {"sparse_kd3d": create_method("sparse_kd3d", min_radius=1)}).prepare(b)
    out = d(b)
    y = bev_targets(b.boxes, b.labels, SMALL, 3, min_radius=1).heatmap
    t = out.teacher["heatmap_out"]
    want = D.pivotal_logit_kd(out.student["heatmap_out"], t, D.pivotal_mask_soft(t, y))
    assert float(out.parts["sparse_kd3d"]) == pytest.approx(7.0 * float(want.detach()), rel=1e-5)  # the code's weight 7
    # a student at half the resolution is resized to the teacher's grid
    m = create_method("sparse_kd3d", mask="rank", rank=5)
    half = m({"heatmap_out": out.student["heatmap_out"][:, :, ::2, ::2]}, {"heatmap_out": t}, b)
    up = torch.nn.functional.interpolate(out.student["heatmap_out"][:, :, ::2, ::2], size=(16, 16), mode="bilinear",
                                         align_corners=True)
    assert float(half.detach()) == pytest.approx(float(D.pivotal_logit_kd(up, t, D.pivotal_mask_rank(t, 5)).detach()), rel=1e-6)


def test_label_kd_adds_the_confident_teacher_boxes():
    gt = [torch.tensor([[1.0, 2, 0, 1, 1, 1, 0]])]
    preds = [{"boxes": torch.tensor([[5.0, 5, 0, 2, 2, 2, 0], [7.0, 7, 0, 2, 2, 2, 0]]),
              "scores": torch.tensor([0.7, 0.5]), "labels": torch.tensor([2, 1])}]
    boxes, labels = D.merge_teacher_boxes(gt, [torch.tensor([0])], preds, 0.6)
    assert boxes[0].tolist() == [[5.0, 5, 0, 2, 2, 2, 0], [1.0, 2, 0, 1, 1, 1, 0]] and labels[0].tolist() == [2, 0]
    teacher, student = small_pair()
    b = scenes(2)
    d = Distiller(student, teacher, {"sparse_kd3d_label": create_method("sparse_kd3d_label", score_threshold=0.0,
                                                                         max_boxes=2)}).prepare(b)
    out = d(b)
    preds = decode_bev(out.teacher["heatmap_out"], out.teacher["reg_out"], SMALL, score_threshold=0.0,
                       max_detections=2)
    mb, ml = D.merge_teacher_boxes(b.boxes, b.labels, preds, 0.0)
    task = create_method("bev_loss")
    task.bind_models(student, None, b)
    want = task.loss_on(out.student["heatmap_out"], out.student["reg_out"], mb, ml)
    assert float(out.parts["sparse_kd3d_label"]) == pytest.approx(float(want.detach()), rel=1e-5)
    plain = task.loss_on(out.student["heatmap_out"], out.student["reg_out"], b.boxes, b.labels)
    assert abs(float(want.detach()) - float(plain.detach())) > 1e-4  # the teacher's boxes changed the targets


# ------------------------------------------------------------------------------------------ properties


maps = st.integers(0, 2 ** 31 - 1)


@settings(max_examples=15, deadline=None)
@given(maps, st.floats(0.05, 5.0))
def test_losses_vanish_when_the_student_is_the_teacher(seed, tau):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 5, generator=g)
    y = torch.randn(2, 3, 5, 5, generator=g)
    w = torch.rand(2, 5, 5, generator=g)
    imp = torch.rand(2, 5, generator=g)
    assert float(D.lidar_distill_loss(x, x, w, 3)) == pytest.approx(0.0, abs=1e-4)
    assert float(D.pivotal_logit_kd(x, x, w)) == 0.0
    assert float(D.reweighted_graph_loss(x, x, imp[:, :5], tau)) == 0.0
    assert float(D.lidar_distill_loss(x, y, w, 3)) >= 0 and float(D.pivotal_logit_kd(x, y, w)) >= 0
    assert float(D.reweighted_graph_loss(x, y, imp, tau)) > 0


def test_training_steps_with_each_method_move_only_the_student():
    teacher, _ = small_pair()
    b = scenes(2)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    for losses in ({"bev_loss": 1.0}, {"bev_loss": 1.0, "pointdistiller": 2.0}, {"bev_loss": 1.0, "sparse_kd3d": 7.0},
                   {"sparse_kd3d_label": 1.0}, {"bev_loss": 1.0, "lidar_distill": create_method("lidar_distill",
                                                                                            region="gt")}):
        torch.manual_seed(0)
        student = PointNetBEV(3, 5, (8, 8), 8, SMALL)
        source = None if list(losses) == ["bev_loss"] else teacher
        if "lidar_distill" in losses:
            source, b = BeamTeacher(teacher), with_teacher_points(b, b)
        d = Distiller(student, source, losses).prepare(b)
        opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=1e-2)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        first = None
        for _ in range(4):
            out = d(b)
            out.total.backward()
            opt.step()
            opt.zero_grad()
            first = first if first is not None else float(out.total.detach())
        assert math.isfinite(float(out.total.detach())) and float(out.total.detach()) < first, losses
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    for k, v in teacher.state_dict().items():
        assert torch.equal(frozen[k], v), k


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="region"):
        create_method("lidar_distill", region="box")
    with pytest.raises(ValueError, match="mask"):
        create_method("sparse_kd3d", mask="hard")
    with pytest.raises(ValueError, match="tau"):
        create_method("pointdistiller", tau=0.0)
    with pytest.raises(TypeError, match="BEV detector"):
        create_method("bev_loss").bind_models(torch.nn.Linear(2, 2), None, scenes(1))
    with pytest.raises(ValueError, match="high > low"):
        BEVGrid((1.0, 0.0))
    with pytest.raises(ValueError, match=r"\(n, 7\)"):
        bev_targets([torch.zeros(1, 4)], [torch.zeros(1, dtype=torch.long)], SMALL, 3)
