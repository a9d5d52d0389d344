"""The GFL-style detector (distill.models.detection) and its task loss ``gfl_loss``.

Box geometry, QFL / DFL / GIoU and the combined GFL loss against numbers worked out by hand or by
plainly written Python loops; ATSS assignment on a hand-built case and against a loop
implementation; decode∘encode; NMS against a plain greedy loop; the model's outputs, taps, FLOPs
ratio, prediction and a few training steps through the Distiller.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill.batch import Batch, DenseBatch
from distill.methods import create_method, method_info
from distill.models import create
from distill.models.detection import (
    Assignment,
    GFLDetector,
    assign_targets,
    batched_nms,
    box_iou,
    decode_boxes,
    distribution_focal_loss,
    encode_boxes,
    gfl_losses,
    giou_loss,
    grid_points,
    integral,
    nms,
    quality_focal_loss,
)

SETTINGS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------- plain-Python references


def py_area(b):
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def py_iou(a, b):
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = py_area(a) + py_area(b) - inter
    return inter / union if union > 0 else 0.0


def py_giou(a, b):
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = py_area(a) + py_area(b) - inter
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (c - union) / c


def py_softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def random_boxes(gen: torch.Generator, n: int, size: float = 64.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size * 0.7
    wh = 4 + torch.rand(n, 2, generator=gen) * size * 0.3
    return torch.cat([xy, xy + wh], 1)


# ---------------------------------------------------------------------------- box geometry


def test_box_iou_and_giou_against_hand_numbers():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    # overlap 1, union 4 + 4 - 1 = 7; the other pairs: [0,0,2,2]&[2,0,3,1] touch (0), [0,0,1,1]&[1,1,3,3] touch (0)
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 0.0], [0.0, 0.0]]))
    # aligned: pair 0 GIoU = 1/7 - (9 - 7)/9; pair 1: IoU 0, hull 3x1 = 3, union 2 -> GIoU = -1/3
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 1 + 1 / 3])
    assert torch.allclose(giou_loss(a, b), expected, atol=1e-6)
    assert torch.allclose(giou_loss(a, a), torch.zeros(2), atol=1e-6)


@SETTINGS
@given(st.integers(0, 10_000))
def test_giou_loss_matches_loop_and_is_bounded(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = random_boxes(g, 6), random_boxes(g, 6)
    got = giou_loss(a, b)
    want = torch.tensor([1 - py_giou(x.tolist(), y.tolist()) for x, y in zip(a, b)])
    assert torch.allclose(got, want, atol=1e-5)
    assert bool((got >= -1e-6).all() and (got <= 2 + 1e-6).all())
    assert torch.allclose(giou_loss(b, a), got, atol=1e-6)  # symmetric
    ious = box_iou(a, b)
    assert torch.allclose(ious, torch.tensor([[py_iou(x.tolist(), y.tolist()) for y in b] for x in a]), atol=1e-6)


def test_grid_points_layout():
    pts, strides = grid_points((32, 48), (8, 16))
    # level 0: 4 x 6 points, level 1: 2 x 3
    assert pts.shape == (24 + 6, 2) and strides.tolist() == [8.0] * 24 + [16.0] * 6
    assert pts[0].tolist() == [4.0, 4.0] and pts[1].tolist() == [12.0, 4.0] and pts[6].tolist() == [4.0, 12.0]
    assert pts[24].tolist() == [8.0, 8.0] and pts[-1].tolist() == [40.0, 24.0]


@SETTINGS
@given(st.integers(0, 10_000))
def test_decode_encode_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    pts, strides = grid_points((64, 64), (8, 16))
    d = torch.rand(2, pts.shape[0], 4, generator=g) * 5
    boxes = decode_boxes(d, pts, strides)
    assert torch.allclose(encode_boxes(boxes, pts, strides), d, atol=1e-5)
    # decode by hand for one point: (x - l s, y - t s, x + r s, y + b s)
    x, y = pts[70].tolist()
    s = strides[70].item()
    l_, t_, r_, b_ = d[1, 70].tolist()
    assert torch.allclose(boxes[1, 70], torch.tensor([x - l_ * s, y - t_ * s, x + r_ * s, y + b_ * s]), atol=1e-5)
    assert bool((encode_boxes(boxes, pts, strides, max_distance=3.0) <= 3.0).all())


def test_integral_is_the_expectation_of_the_bins():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    p = py_softmax([0.0, 1.0, 2.0, -1.0])
    assert integral(logits).item() == pytest.approx(sum(k * pk for k, pk in enumerate(p)), abs=1e-6)
    # a two-hot distribution (0.3 at bin 2, 0.7 at bin 3) integrates to 2.7
    two_hot = torch.log(torch.tensor([[1e-9, 1e-9, 0.3, 0.7, 1e-9]]))
    assert integral(two_hot).item() == pytest.approx(2.7, abs=1e-6)


# ---------------------------------------------------------------------------- losses


def test_quality_focal_loss_against_hand_numbers():
    beta = 1.5
    logits = torch.tensor([[0.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([1, 2])  # point 0: class 1 with quality 0.6; point 1: background (K = 2)
    quality = torch.tensor([0.6, 0.9], dtype=torch.float64)  # 0.9 is never read (background)
    got = quality_focal_loss(logits, labels, quality, beta=beta)

    def qfl(x, y):
        s = sig(x)
        return -abs(y - s) ** beta * ((1 - y) * math.log(1 - s) + y * math.log(s))

    want = torch.tensor([[qfl(0.0, 0.0), qfl(1.0, 0.6)], [qfl(-1.0, 0.0), qfl(2.0, 0.0)]], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)


@SETTINGS
@given(st.integers(0, 10_000))
def test_quality_focal_loss_is_nonnegative_and_zero_at_the_target(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 4, (5,), generator=g)
    quality = torch.rand(5, generator=g, dtype=torch.float64) * 0.98 + 0.01
    assert bool((quality_focal_loss(logits, labels, quality, beta=2.0) >= 0).all())
    target = torch.zeros(5, 3, dtype=torch.float64)
    pos = labels < 3
    target[pos, labels[pos]] = quality[pos]
    at_target = torch.logit(target.clamp(1e-6, 1 - 1e-6))
    assert quality_focal_loss(at_target, labels, quality, beta=2.0).max().item() < 1e-6


def test_distribution_focal_loss_against_hand_numbers():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([1.3, 0.0], dtype=torch.float64)
    p0, p1 = py_softmax([0.0, 1.0, 2.0, 0.5]), py_softmax([1.0, 0.0, 0.0, 0.0])
    want = [-(0.7 * math.log(p0[1]) + 0.3 * math.log(p0[2])), -math.log(p1[0])]
    assert torch.allclose(distribution_focal_loss(logits, target), torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        distribution_focal_loss(logits, torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_gfl_losses_against_a_plain_loop():
    """Two positives on a 32x32 image (20 points, K = 2): each term and its normalisation by hand."""
    torch.manual_seed(0)
    k, r = 2, 4
    pts, strides = grid_points((32, 32), (8, 16))
    n = pts.shape[0]
    logits = torch.randn(1, n, k, dtype=torch.float64)
    box_dist = torch.randn(1, n, 4, r + 1, dtype=torch.float64)
    labels = torch.full((1, n), k)
    boxes = torch.zeros(1, n, 4, dtype=torch.float64)
    gt = {5: (1, [2.0, 3.0, 45.0, 17.0]), 17: (0, [1.0, 2.0, 30.0, 31.0])}  # point 5: r = 33/8 > reg_max, clamped
    for i, (c, b) in gt.items():
        labels[0, i] = c
        boxes[0, i] = torch.tensor(b)
    pos = labels < k
    a = Assignment(labels, boxes, pos, torch.where(pos, 0, -1))
    beta = 1.7
    qfl, giou, dfl = gfl_losses(logits, box_dist, pts, strides, a, beta=beta)

    quality, weights, gious, dfls = {}, {}, {}, {}
    for i, (c, b) in gt.items():
        x, y = pts[i].tolist()
        s = strides[i].item()
        d = [sum(j * pj for j, pj in enumerate(py_softmax(box_dist[0, i, side].tolist()))) for side in range(4)]
        pred = [x - d[0] * s, y - d[1] * s, x + d[2] * s, y + d[3] * s]
        quality[i] = py_iou(pred, b)
        weights[i] = max(sig(v) for v in logits[0, i].tolist())
        gious[i] = 1 - py_giou(pred, b)
        tgt = [min(max(v, 0.0), r - 0.1) for v in [(x - b[0]) / s, (y - b[1]) / s, (b[2] - x) / s, (b[3] - y) / s]]
        side_losses = []
        for side, t in enumerate(tgt):
            p = py_softmax(box_dist[0, i, side].tolist())
            lo = math.floor(t)
            side_losses.append(-((lo + 1 - t) * math.log(p[lo]) + (t - lo) * math.log(p[lo + 1])))
        dfls[i] = sum(side_losses) / 4
    q_sum = 0.0
    for i in range(n):
        for c in range(k):
            y = quality[i] if i in gt and gt[i][0] == c else 0.0
            s = sig(logits[0, i, c].item())
            q_sum += -abs(y - s) ** beta * ((1 - y) * math.log(1 - s) + y * math.log(s))
    wsum = sum(weights.values())
    assert qfl.item() == pytest.approx(q_sum / 2, rel=1e-9)
    assert giou.item() == pytest.approx(sum(weights[i] * gious[i] for i in gt) / wsum, rel=1e-9)
    assert dfl.item() == pytest.approx(sum(weights[i] * dfls[i] for i in gt) / wsum, rel=1e-9)


def test_gfl_losses_without_positives_keep_the_graph():
    pts, strides = grid_points((32, 32), (8, 16))
    logits = torch.randn(1, 20, 3, requires_grad=True)
    box_dist = torch.randn(1, 20, 4, 5, requires_grad=True)
    a = Assignment(torch.full((1, 20), 3), torch.zeros(1, 20, 4), torch.zeros(1, 20, dtype=torch.bool),
                   torch.full((1, 20), -1))
    qfl, giou, dfl = gfl_losses(logits, box_dist, pts, strides, a)
    (qfl + giou + dfl).backward()
    assert giou.item() == 0 and dfl.item() == 0 and qfl.item() > 0
    assert box_dist.grad is not None and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- assignment (ATSS)


def test_atss_on_a_hand_built_case():
    """Box (15, 17, 41, 43) on 64x64, topk 4, anchors of 2 strides (16 px at stride 8, 32 at 16).

    Candidates (closest 4 per level to the centre (28, 30)) and their anchor IoUs worked by hand:
    level 0 points (28,28) 256/676, (28,36) 240/692, (20,28) and (36,28) 208/724; level 1 (24,24)
    575/1125, (24,40) 475/1225, (40,24) 391/1309, (40,40) 323/1377. mean + std = 0.427: only level 1's
    (24, 24) passes, index 64 + 1*4 + 1 = 69.
    """
    pts, strides = grid_points((64, 64), (8, 16))
    ious = [256 / 676, 240 / 692, 208 / 724, 208 / 724, 575 / 1125, 475 / 1225, 391 / 1309, 323 / 1377]
    thr = statistics.mean(ious) + statistics.stdev(ious)
    assert [v >= thr for v in ious] == [False] * 4 + [True] + [False] * 3
    a = assign_targets(pts, strides, [torch.tensor([[15.0, 17.0, 41.0, 43.0]])], [torch.tensor([4])], 10,
                       topk=4, anchor_scale=2.0)
    assert a.positive.nonzero()[:, 1].tolist() == [69]
    assert a.labels[0, 69].item() == 4 and a.gt_index[0, 69].item() == 0
    assert int((a.labels[0] == 10).sum()) == 79 and a.box_targets[0, 69].tolist() == [15.0, 17.0, 41.0, 43.0]
    # with the default anchors (4 strides) the level-0 points win instead: 32-px anchors fit a 26-px box best
    a4 = assign_targets(pts, strides, [torch.tensor([[15.0, 17.0, 41.0, 43.0]])], [torch.tensor([4])], 10, topk=4)
    assert set(a4.positive.nonzero()[:, 1].tolist()) <= set(range(64))


def atss_loop(pts, strides, gts, topk, scale):
    """ATSS written plainly: per box, per level the topk nearest points, mean + stdev, centre inside, max IoU."""
    n = len(pts)
    owner = [-1] * n
    best = [-1.0] * n
    levels = sorted(set(strides))
    for gi, b in enumerate(gts):
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        cands = []
        for lv in levels:
            idx = [i for i in range(n) if strides[i] == lv]
            idx.sort(key=lambda i: (math.hypot(pts[i][0] - cx, pts[i][1] - cy), i))
            cands += idx[:topk]

        def anchor_iou(i):
            h = scale * strides[i] / 2
            return py_iou([pts[i][0] - h, pts[i][1] - h, pts[i][0] + h, pts[i][1] + h], b)

        vals = [anchor_iou(i) for i in cands]
        thr = statistics.mean(vals) + statistics.stdev(vals)
        for i, v in zip(cands, vals):
            x, y = pts[i]
            inside = min(x - b[0], y - b[1], b[2] - x, b[3] - y) > 0.01
            if v >= thr and inside and v > best[i]:
                best[i], owner[i] = v, gi
    return owner


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_atss_matches_a_plain_loop(seed):
    g = torch.Generator().manual_seed(seed)
    pts, strides = grid_points((64, 64), (8, 16, 32))
    gts = [random_boxes(g, 3), random_boxes(g, 1)]
    labels = [torch.tensor([0, 1, 2]), torch.tensor([5])]
    a = assign_targets(pts, strides, gts, labels, 6, topk=5, anchor_scale=3.0)
    for img, (boxes, lab) in enumerate(zip(gts, labels)):
        owner = atss_loop(pts.tolist(), strides.tolist(), boxes.tolist(), 5, 3.0)
        assert a.gt_index[img].tolist() == owner
        want_labels = [lab[o].item() if o >= 0 else 6 for o in owner]
        assert a.labels[img].tolist() == want_labels
    assert a.positive.any()


def test_assignment_of_an_image_without_boxes_is_background():
    pts, strides = grid_points((32, 32), (8, 16))
    a = assign_targets(pts, strides, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], 3)
    assert not a.positive.any() and (a.labels == 3).all() and (a.gt_index == -1).all()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        assign_targets(pts, strides, [torch.tensor([[0.0, 0, 9, 9]])], [torch.tensor([3])], 3)


# ---------------------------------------------------------------------------- NMS


def nms_loop(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(py_iou(boxes[i], boxes[j]) <= thr for j in kept):
            kept.append(i)
    return kept


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from([0.3, 0.5, 0.7]))
def test_nms_matches_a_plain_greedy_loop(seed, thr):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, 25, size=32.0)
    scores = torch.rand(25, generator=g)
    labels = torch.randint(0, 3, (25,), generator=g)
    assert nms(boxes, scores, thr).tolist() == nms_loop(boxes.tolist(), scores.tolist(), thr)
    got = batched_nms(boxes, scores, labels, thr).tolist()
    want = []
    for c in range(3):
        idx = [i for i in range(25) if labels[i] == c]
        want += [idx[j] for j in nms_loop(boxes[idx].tolist(), scores[idx].tolist(), thr)]
    assert sorted(got) == sorted(want)
    assert got == sorted(got, key=lambda i: -scores[i].item())


# ---------------------------------------------------------------------------- the model


def test_model_outputs_taps_and_points():
    m = GFLDetector(num_classes=3, width=8, reg_max=5, strides=(8, 16, 32))
    x = torch.randn(2, 1, 64, 48)
    out = m(x)
    n = 8 * 6 + 4 * 3 + 2 * 2
    assert out["logits"].shape == (2, n, 3) and out["box_dist"].shape == (2, n, 4, 6)
    pts, strides = m.points((64, 48))
    assert pts.shape == (n, 2) and strides.shape == (n,)
    paths = [p for p in m.tap_points]
    taps = distill.taps.Taps(m, paths)
    with taps.recording() as store:
        m(x)
    assert store["fpn_out.2"].shape == (2, 8, 2, 2) and store["cls_out.0"].shape == (2, 3, 8, 6)
    assert store["reg_out.1"].shape == (2, 24, 4, 3) and store["backbone_out.1"].shape == (2, 16, 4, 3)
    # the flattened outputs are the level maps, level by level, row-major, side-major bins
    assert torch.equal(out["logits"][:, 48:60], store["cls_out.1"].flatten(2).transpose(1, 2))
    assert torch.equal(out["box_dist"][0, 48 + 5, 2], store["reg_out.1"][0, 12:18, 1, 2])
    taps.remove()
    boxes = m.decode(out["box_dist"], pts, strides)
    assert torch.allclose(boxes, decode_boxes(integral(out["box_dist"]), pts, strides))
    with pytest.raises(ValueError, match="strides"):
        GFLDetector(strides=(4, 8))


def _macs(model, x):
    total = [0]

    def hook(mod, _inp, out):
        total[0] += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    hs = [mod.register_forward_hook(hook) for mod in model.modules() if isinstance(mod, torch.nn.Conv2d)]
    model(x)
    for h in hs:
        h.remove()
    return total[0]


def test_zoo_pair_and_flops_ratio():
    t, s = create("gfl_teacher"), create("gfl_student")
    x = torch.zeros(1, 1, 64, 64)
    ratio = _macs(s, x) / _macs(t, x)
    assert 1 / 16 <= ratio <= 1 / 8, ratio
    assert t.tap_points == s.tap_points


def test_predict_returns_thresholded_nms_survivors():
    torch.manual_seed(0)
    m = GFLDetector(num_classes=4, width=8, reg_max=4).eval()
    with torch.no_grad():
        m.cls_head.bias.fill_(2.0)  # every point scores high: NMS and the caps do the work
    x = torch.randn(2, 1, 32, 32)
    preds = m.predict(x, score_threshold=0.3, iou_threshold=0.5, max_detections=7)
    assert len(preds) == 2
    for p in preds:
        assert p["boxes"].shape[0] == p["scores"].shape[0] == p["labels"].shape[0] <= 7
        assert bool((p["scores"] > 0.3).all()) and bool((p["boxes"] >= 0).all() and (p["boxes"] <= 32).all())
        for c in p["labels"].unique():
            b = p["boxes"][p["labels"] == c]
            iou = box_iou(b, b).fill_diagonal_(0)
            assert bool((iou <= 0.5).all())
    none = m.predict(x, score_threshold=0.999)
    assert all(p["boxes"].shape == (0, 4) for p in none)


# ---------------------------------------------------------------------------- the task-loss Method


def test_registered_with_paper_and_defaults():
    info = method_info("gfl_loss")
    assert info.family == "task" and info.paper.arxiv == "2006.04388" and info.paper.year == 2020
    assert info.defaults["giou_weight"] == 2.0 and info.defaults["dfl_weight"] == 0.25
    assert info.defaults["beta"] == 2.0 and info.defaults["topk"] == 9


def _scene_batch(b=4, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(b, 1, size, size)
    boxes, labels = [], []
    for i in range(b):
        bx = random_boxes(g, 2, size=float(size))
        lab = torch.randint(0, 3, (2,), generator=g)
        for box, c in zip(bx, lab):
            x0, y0, x1, y1 = box.long().tolist()
            x[i, 0, y0:y1, x0:x1] = 1.0 + c.item()
        boxes.append(bx)
        labels.append(lab)
    return DenseBatch(x, boxes=boxes, labels=labels)


def test_method_is_the_weighted_sum_and_trains_through_the_distiller():
    torch.manual_seed(0)
    model = GFLDetector(num_classes=3, width=8, reg_max=4)
    batch = _scene_batch()
    loss = create_method("gfl_loss", qfl_weight=0.5, giou_weight=3.0, dfl_weight=0.1, beta=1.5, topk=5,
                         anchor_scale=3.0)
    d = distill.Distiller(model, None, losses={"gfl_loss": loss})
    d.prepare(batch)
    out = d(batch)
    pts, strides = model.points((32, 32))
    a = assign_targets(pts, strides, batch.boxes, batch.labels, 3, topk=5, anchor_scale=3.0)
    q, g, f = gfl_losses(out.student["logits"], out.student["box_dist"], pts, strides, a, beta=1.5)
    assert out.total.item() == pytest.approx((0.5 * q + 3.0 * g + 0.1 * f).item(), rel=1e-6)
    opt = torch.optim.Adam(d.trainable_parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        o = d(batch)
        first = o.total.item() if first is None else first
        o.total.backward()
        opt.step()
        opt.zero_grad()
    assert o.total.item() < 0.7 * first


def test_method_errors_are_clear():
    loss = create_method("gfl_loss")
    with pytest.raises(RuntimeError, match="bind_models"):
        loss({"logits": torch.zeros(1, 20, 3), "box_dist": torch.zeros(1, 20, 4, 9)}, {}, _scene_batch(1))
    loss.bind_models(GFLDetector(num_classes=3, width=8), None, _scene_batch(1))
    with pytest.raises(ValueError, match="DenseBatch"):
        loss({"logits": torch.zeros(1, 20, 3), "box_dist": torch.zeros(1, 20, 4, 9)}, {}, Batch(torch.zeros(1, 1, 32, 32)))
    with pytest.raises(TypeError, match="strides"):
        loss.bind_models(torch.nn.Linear(2, 2), None, _scene_batch(1))
    with pytest.raises(ValueError, match="anchor_scale"):
        create_method("gfl_loss", anchor_scale=0.0)
