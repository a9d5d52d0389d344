"""Issue 14, part D2b: the DeepLab-lite segmenter + ``seg_ce``, the small DETR + ``hungarian_match`` + ``detr_loss``.

Every expected number here is computed independently of the code under test: by hand, with a
plain loop, with numpy, or by brute force over permutations.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill.batch import DenseBatch
from distill.methods import create_method, method_info
from distill.models import create
from distill.models.detr import (box_cxcywh_to_xyxy, detr_set_loss, generalized_box_iou, hungarian_match,
                                 normalize_boxes, sine_position_encoding)
from distill.models.segmentation import seg_cross_entropy
from distill.taps import Taps

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------


def _giou_ref(a, b) -> float:
    """GIoU of two xyxy boxes (lists of 4 floats), written out by hand."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    union = area_a + area_b - inter
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (c - union) / c


def _to_xyxy(b):
    cx, cy, w, h = b
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _cost_ref(logits: np.ndarray, boxes: np.ndarray, tb: np.ndarray, tl: np.ndarray, wc: float, wb: float, wg: float):
    """(Q, n) matching cost with plain loops."""
    q, n = logits.shape[0], tb.shape[0]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    cost = np.zeros((q, n))
    for i in range(q):
        for j in range(n):
            l1 = np.abs(boxes[i] - tb[j]).sum()
            g = _giou_ref(_to_xyxy(boxes[i]), _to_xyxy(tb[j]))
            cost[i, j] = -wc * p[i, tl[j]] + wb * l1 - wg * g
    return cost


def _brute_force(cost: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
    """The cheapest one-to-one assignment of min(Q, n) pairs, by trying every injection."""
    q, n = cost.shape
    best, pairs = math.inf, []
    if n <= q:
        for perm in itertools.permutations(range(q), n):  # gt j -> query perm[j]
            c = sum(cost[perm[j], j] for j in range(n))
            if c < best:
                best, pairs = c, sorted((perm[j], j) for j in range(n))
    else:
        for perm in itertools.permutations(range(n), q):  # query i -> gt perm[i]
            c = sum(cost[i, perm[i]] for i in range(q))
            if c < best:
                best, pairs = c, sorted((i, perm[i]) for i in range(q))
    return best, pairs


def _random_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([cxcy, wh], dim=1)


# ------------------------------------------------------------------------------------------
# boxes, positional encoding
# ------------------------------------------------------------------------------------------


def test_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    # first pair: inter 1, union 7, hull 9 -> 1/7 - 2/9; second: disjoint, union 5, hull 5x2=10 -> 0 - 5/10
    assert generalized_box_iou(a, b).tolist()[0] == pytest.approx([1 / 7 - 2 / 9, -0.5], abs=1e-6)
    with pytest.raises(ValueError, match="x2 >= x1"):
        generalized_box_iou(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), a)


def test_box_conversions_and_normalisation_use_width_for_x():
    # a 40-wide, 20-high image: x is divided by W = 40, y by H = 20
    boxes = torch.tensor([[4.0, 2.0, 12.0, 10.0]])
    assert normalize_boxes(boxes, (20, 40)).tolist()[0] == pytest.approx([8 / 40, 6 / 20, 8 / 40, 8 / 20])
    assert box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])).tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7])


def test_sine_position_encoding_by_hand():
    # h = 2, w = 3, dim = 4: channels (sin y, cos y, sin x, cos x) with y = (i+1)/2·2π, x = (j+1)/3·2π
    pe = sine_position_encoding(2, 3, 4)
    assert pe.shape == (6, 4)
    # raster index of (row 1, column 0) is 1·3 + 0 = 3
    y, x = 2 / 2 * 2 * math.pi, 1 / 3 * 2 * math.pi
    assert pe[3].tolist() == pytest.approx([math.sin(y), math.cos(y), math.sin(x), math.cos(x)], abs=1e-6)
    # dim 8: the second frequency divides by T^(2·1/4) = 100
    pe8 = sine_position_encoding(1, 1, 8, temperature=10000.0)
    c = 2 * math.pi
    assert pe8[0].tolist() == pytest.approx([math.sin(c), math.cos(c), math.sin(c / 100), math.cos(c / 100)] * 2,
                                            abs=1e-6)


# ------------------------------------------------------------------------------------------
# Hungarian matching
# ------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(q=st.integers(1, 5), n=st.integers(0, 5), seed=st.integers(0, 10_000))
def test_hungarian_match_equals_brute_force(q, n, seed):
    g = torch.Generator().manual_seed(seed)
    k = 4
    logits = torch.randn(1, q, k + 1, generator=g) * 2
    boxes = _random_boxes(g, q)[None]
    tb = _random_boxes(g, n)
    tl = torch.randint(0, k, (n,), generator=g)
    wc, wb, wg = 1.5, 3.0, 0.7  # non-default cost weights
    (qi, gi), = hungarian_match(logits, boxes, [tb], [tl], cost_class=wc, cost_bbox=wb, cost_giou=wg)
    cost = _cost_ref(logits[0].double().numpy(), boxes[0].double().numpy(), tb.double().numpy(), tl.numpy(), wc, wb, wg)
    best, pairs = _brute_force(cost)
    assert len(qi) == min(q, n)
    got = sum(cost[a, b] for a, b in zip(qi.tolist(), gi.tolist()))
    assert got == pytest.approx(best, abs=1e-5)
    assert sorted(zip(qi.tolist(), gi.tolist())) == pairs or got == pytest.approx(best, abs=1e-9)


def test_hungarian_match_each_cost_term_decides():
    # two queries, two objects; query 0 predicts class 1 with box A', query 1 class 0 with box B'
    logits = torch.tensor([[[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]]])
    a = [0.3, 0.3, 0.2, 0.2]
    b = [0.7, 0.7, 0.2, 0.2]
    tb = torch.tensor([a, b])
    # class only: object 0 has class 0 -> query 1, object 1 has class 1 -> query 0
    boxes = torch.tensor([[a, b]])
    (qi, gi), = hungarian_match(logits, boxes, [tb], [torch.tensor([0, 1])], 1.0, 0.0, 0.0)
    assert dict(zip(gi.tolist(), qi.tolist())) == {0: 1, 1: 0}
    # boxes only (L1): query 0 sits on object 0
    (qi, gi), = hungarian_match(logits, boxes, [tb], [torch.tensor([0, 1])], 0.0, 1.0, 0.0)
    assert dict(zip(gi.tolist(), qi.tolist())) == {0: 0, 1: 1}
    # GIoU only agrees with L1 here
    (qi, gi), = hungarian_match(logits, boxes, [tb], [torch.tensor([0, 1])], 0.0, 0.0, 1.0)
    assert dict(zip(gi.tolist(), qi.tolist())) == {0: 0, 1: 1}


# ------------------------------------------------------------------------------------------
# the DETR set loss
# ------------------------------------------------------------------------------------------


def _hand_case():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]]])  # B=1, Q=3, K=2 (+ no object)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.2, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]]])
    tb = torch.tensor([[0.5, 0.4, 0.4, 0.2]])
    tl = torch.tensor([1])
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    return logits, boxes, tb, tl, matches


def test_detr_set_loss_by_hand():
    logits, boxes, tb, tl, matches = _hand_case()
    w0 = 0.25  # non-default no-object weight
    t = detr_set_loss(logits, boxes, [tb], [tl], matches, no_object_weight=w0)

    def nll(z, y):
        return -(z[y] - math.log(sum(math.exp(v) for v in z)))

    rows = logits[0].tolist()
    ce = (1.0 * nll(rows[0], 1) + w0 * nll(rows[1], 2) + w0 * nll(rows[2], 2)) / (1.0 + w0 + w0)
    l1 = 0.0 + 0.1 + 0.0 + 0.2  # |0.5-0.5| + |0.5-0.4| + |0.4-0.4| + |0.4-0.2|, one box
    giou = 1 - _giou_ref(_to_xyxy([0.5, 0.5, 0.4, 0.4]), _to_xyxy([0.5, 0.4, 0.4, 0.2]))
    assert t["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert t["l1"].item() == pytest.approx(l1, rel=1e-5)
    assert t["giou"].item() == pytest.approx(giou, rel=1e-5)
    # box boxes are [0.3,0.3,0.7,0.7] vs [0.3,0.3,0.7,0.5]: IoU = 0.08/0.16 = 0.5, hull = union -> GIoU 0.5
    assert giou == pytest.approx(0.5)


def test_detr_loss_method_weights_and_pixel_targets():
    logits, boxes, tb, tl, _ = _hand_case()
    h, w = 20, 40  # non-square: targets are normalised by (W, H, W, H)
    px = box_cxcywh_to_xyxy(tb) * torch.tensor([w, h, w, h])
    batch = DenseBatch(torch.zeros(1, 1, h, w), None, boxes=[px], labels=[tl])
    m = create_method("detr_loss", no_object_weight=0.25, ce_weight=1.5, l1_weight=3.0, giou_weight=0.5, aux_loss=False)
    view = {"logits": logits, "box_out": boxes}
    got = m(view, {}, batch)
    matches = hungarian_match(logits, boxes, [tb], [tl])
    assert [x.tolist() for x in matches[0]] == [[0], [0]]  # the hand case's matching
    t = detr_set_loss(logits, boxes, [tb], [tl], matches, 0.25)
    assert got.item() == pytest.approx(1.5 * t["ce"].item() + 3.0 * t["l1"].item() + 0.5 * t["giou"].item(), rel=1e-5)
    # hand numbers again, so a wrong term inside detr_set_loss cannot cancel out
    assert got.item() == pytest.approx(1.5 * t["ce"].item() + 3.0 * 0.3 + 0.5 * 0.5, rel=1e-5)
    # aux: each earlier layer adds its own matched loss
    m_aux = create_method("detr_loss", no_object_weight=0.25, ce_weight=1.5, l1_weight=3.0, giou_weight=0.5)
    aux_logits = torch.stack([logits, logits.flip(1)], dim=1)  # (B, 2, Q, K+1)
    aux_boxes = torch.stack([boxes, boxes.flip(1)], dim=1)
    total = m_aux({**view, "aux_cls_out": aux_logits, "aux_box_out": aux_boxes}, {}, batch)
    parts = [m(dict(logits=aux_logits[:, i], box_out=aux_boxes[:, i]), {}, batch) for i in range(2)]
    assert total.item() == pytest.approx(got.item() + sum(p.item() for p in parts), rel=1e-5)


def test_detr_loss_defaults_are_the_papers():
    d = method_info("detr_loss").defaults
    assert (d["no_object_weight"], d["l1_weight"], d["giou_weight"], d["ce_weight"]) == (0.1, 5.0, 2.0, 1.0)
    assert (d["cost_class"], d["cost_bbox"], d["cost_giou"], d["aux_loss"]) == (1.0, 5.0, 2.0, True)
    assert method_info("detr_loss").paper.arxiv == "2005.12872"
    assert method_info("seg_ce").paper.arxiv == "1411.4038"


def test_detr_loss_errors_and_empty_images():
    logits, boxes, tb, tl, matches = _hand_case()
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        detr_set_loss(logits, boxes, [tb], [torch.tensor([2])], matches)
    batch = DenseBatch(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="boxes and labels"):
        create_method("detr_loss")({"logits": logits, "box_out": boxes}, {}, batch)
    # an image with no objects: every query is "no object", box terms are 0
    empty = [(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))]
    t = detr_set_loss(logits, boxes, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], empty, 0.25)
    nll = -torch.log_softmax(logits[0], -1)[:, 2].mean()  # weights all equal -> a plain mean
    assert t["ce"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert t["l1"].item() == 0.0 and t["giou"].item() == 0.0


# ------------------------------------------------------------------------------------------
# the DETR model
# ------------------------------------------------------------------------------------------


def test_detr_shapes_taps_and_predict():
    torch.manual_seed(0)
    model = create("detr_student", num_classes=5, num_queries=6, num_decoder_layers=3).eval()
    x = torch.rand(2, 1, 32, 48)
    taps = Taps(model, ["backbone_out", "encoder_out", "decoder_out.0", "decoder_out.2", "query_embed", "cls_out",
                        "box_out", "aux_cls_out", "aux_box_out"])
    with taps.recording() as store:
        out = model(x)
    assert out["logits"].shape == (2, 6, 6) and out["boxes"].shape == (2, 6, 4)
    assert store["backbone_out"].shape == (2, 64, 4, 6)
    assert store["encoder_out"].shape == (2, 24, 32)
    assert store["decoder_out.0"].shape == (2, 6, 32)
    assert store["query_embed"].shape == (2, 6, 32)
    assert store["aux_cls_out"].shape == (2, 2, 6, 6) and store["aux_box_out"].shape == (2, 2, 6, 4)
    assert torch.equal(store["cls_out"], out["logits"]) and torch.equal(store["box_out"], out["boxes"])
    # the heads are shared across layers: layer 0's aux logits are the class head on decoder_out.0
    assert torch.allclose(model.class_head(store["decoder_out.0"]), store["aux_cls_out"][:, 0], atol=1e-6)
    assert torch.allclose(model.class_head(store["decoder_out.2"]), out["logits"], atol=1e-6)
    assert bool(((out["boxes"] > 0) & (out["boxes"] < 1)).all())
    with torch.no_grad():  # "no object" dominates, class 0 is the best object class
        model.class_head.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 9.0]))
    out = model(x)
    preds = model.predict(x, score_threshold=0.0, max_detections=4)
    assert len(preds) == 2 and preds[0]["labels"].tolist() == [0, 0, 0, 0]
    p = preds[0]
    assert p["boxes"].shape == (4, 4) and p["labels"].dtype == torch.long
    assert bool((p["scores"][:-1] >= p["scores"][1:]).all())
    assert bool((p["boxes"][:, [0, 2]] <= 48).all() and (p["boxes"][:, [1, 3]] <= 32).all())
    # the scores are the best object-class probabilities (no-object excluded)
    probs = out["logits"][0].softmax(-1)[:, :-1].max(-1).values.sort(descending=True).values[:4]
    assert torch.allclose(p["scores"], probs, atol=1e-6)
    with pytest.raises(ValueError, match="d_model"):
        create("detr_student", d_model=30)


def test_detr_trains_through_the_distiller():
    torch.manual_seed(0)
    model = create("detr_student", num_classes=3, num_queries=4, widths=(8, 8, 16), d_model=16, dim_feedforward=32)
    boxes = [torch.tensor([[2.0, 2.0, 12.0, 14.0]]), torch.tensor([[16.0, 8.0, 30.0, 30.0], [1.0, 20.0, 9.0, 31.0]])]
    labels = [torch.tensor([0]), torch.tensor([2, 1])]
    batch = DenseBatch(torch.rand(2, 1, 32, 32), None, boxes=boxes, labels=labels)
    d = distill.Distiller(model, None, losses={"detr_loss": 1.0})
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = d(batch)
        first = first if first is not None else out.total.item()
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert out.total.item() < 0.6 * first


# ------------------------------------------------------------------------------------------
# the segmenter and seg_ce
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seg_teacher", "seg_student"])
def test_segmenter_shapes_and_taps(name):
    model = create(name, num_classes=7).eval()
    taps = Taps(model, ["backbone_out.0", "backbone_out.1", "backbone_out.2", "feat", "logits_map"])
    x = torch.rand(3, 1, 40, 36)
    with taps.recording() as store:
        out = model(x)
    assert out["logits"].shape == (3, 7, 10, 9)
    assert store["backbone_out.0"].shape[-2:] == (20, 18)
    assert store["backbone_out.1"].shape[-2:] == (10, 9) and store["backbone_out.2"].shape[-2:] == (10, 9)
    assert store["feat"].shape[:2] == (3, model.classifier.in_channels) and store["feat"].shape[-2:] == (10, 9)
    assert torch.equal(store["logits_map"], out["logits"])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 16, 16))


def test_seg_cross_entropy_ignore_index_by_hand():
    # full-resolution logits (no resampling): a plain loop over the labelled pixels
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    masks = torch.randint(0, 4, (2, 3, 5), generator=g)
    masks[0, 0, :] = 255
    masks[1, 2, 1] = 255
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(5):
                y = int(masks[b, i, j])
                if y == 255:
                    continue
                z = logits[b, :, i, j].tolist()
                total += -(z[y] - math.log(sum(math.exp(v) for v in z)))
                count += 1
    assert seg_cross_entropy(logits, masks).item() == pytest.approx(total / count, rel=1e-5)
    # another ignore index: 255 is then a class value out of range
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        seg_cross_entropy(logits, masks, ignore_index=3)
    # all ignored: 0 and a gradient path
    z = logits.clone().requires_grad_(True)
    loss = seg_cross_entropy(z, torch.full((2, 3, 5), 255))
    loss.backward()
    assert loss.item() == 0.0 and z.grad is not None


def test_seg_ce_upsamples_low_resolution_logits():
    # spatially constant logits upsample to the same values, so the loss has a closed form;
    # the mask is 4x the logits' size and its class varies by pixel
    z = torch.tensor([1.0, -0.5, 2.0])
    logits = z.view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    masks = torch.tensor([[0, 1, 2, 255, 2, 2, 0, 1]]).view(1, 2, 4).repeat(1, 4, 2)[:, :8, :8]
    logp = torch.log_softmax(z, 0).tolist()
    labelled = [int(v) for v in masks.flatten() if int(v) != 255]
    expected = -sum(logp[v] for v in labelled) / len(labelled)
    batch = DenseBatch(torch.zeros(1, 1, 8, 8), masks)
    m = create_method("seg_ce")
    assert m({"logits": logits}, {}, batch).item() == pytest.approx(expected, rel=1e-5)
    # a bilinear upsampling (not nearest) of a ramp: interior pixels average their neighbours
    ramp = torch.zeros(1, 2, 2, 2)
    ramp[0, 1, :, 1] = 4.0  # class 1's score: 0 in column 0, 4 in column 1
    up = torch.nn.functional.interpolate(ramp, size=(4, 4), mode="bilinear", align_corners=False)
    assert up[0, 1, 0].tolist() == pytest.approx([0.0, 1.0, 3.0, 4.0])  # the half-pixel rule, worked by hand
    mask1 = torch.ones(1, 4, 4, dtype=torch.long)
    want = float(np.mean([math.log(1 + math.exp(-v)) for v in [0.0, 1.0, 3.0, 4.0]]))
    assert seg_cross_entropy(ramp, mask1).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="semantic masks"):
        m({"logits": logits}, {}, DenseBatch(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 6))
def test_seg_cross_entropy_non_negative_and_zero_at_certainty(seed, k):
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, k, (2, 6, 6), generator=g)
    logits = torch.randn(2, k, 6, 6, generator=g)
    assert seg_cross_entropy(logits, masks).item() >= 0
    confident = torch.nn.functional.one_hot(masks, k).permute(0, 3, 1, 2).float() * 60.0
    assert seg_cross_entropy(confident, masks).item() == pytest.approx(0.0, abs=1e-6)


def _toy_scenes(n: int, size: int = 32, seed: int = 0) -> DenseBatch:
    """Bright squares (class 1) and bars (class 2) on a dark canvas: a stand-in for the scene sets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    m = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, size - 10, (2,), generator=g).tolist()
        x[i, 0, r:r + 8, c:c + 8] = 1.0
        m[i, r:r + 8, c:c + 8] = 1
        r2 = int(torch.randint(0, size - 3, (1,), generator=g))
        x[i, 0, r2:r2 + 2, :] += 0.5
        m[i, r2:r2 + 2, :] = torch.where(m[i, r2:r2 + 2, :] == 0, 2, m[i, r2:r2 + 2, :])
    return DenseBatch(x, m)


def test_segmenter_learns_a_toy_task_with_seg_ce():
    torch.manual_seed(0)
    batch = _toy_scenes(8)
    d = distill.Distiller(create("seg_student", num_classes=3), None, losses={"seg_ce": 1.0})
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        out = d(batch)
        first = first if first is not None else out.total.item()
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert out.total.item() < 0.3 * first
