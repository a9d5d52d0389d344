"""DETRDistill, Dense Teacher and DTG-SSOD (issue 14, part M3): each loss against numbers worked out
independently (plain numpy loops, brute-force matchings), plus the methods and strategies end to end
on tiny inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill import functional as DF
from distill.batch import DenseBatch
from distill.models import create
from distill.taps import TapError

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- numpy references


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_xyxy(b):
    cx, cy, w, h = b
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def np_iou_giou(a, b):
    """IoU and GIoU of two xyxy boxes, written out."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / union
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou, iou - (c - union) / c


def np_bce(p, y):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def sig(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- DETRDistill: logits


def _detr_preds(seed, b=1, q=3, k1=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, q, k1, generator=g) * 2
    centre = 0.3 + 0.4 * torch.rand(b, q, 2, generator=g)
    size = 0.1 + 0.3 * torch.rand(b, q, 2, generator=g)
    return logits, torch.cat([centre, size], -1)


def test_hungarian_logits_kd_matches_brute_force_and_hand_terms():
    s_logits, s_boxes = _detr_preds(0)
    t_logits, t_boxes = _detr_preds(1)
    t_logits[0, 2, -1] = 9.0  # teacher prediction 2 is "no object": no box terms for it
    cls_w, l1_w, giou_w = 0.7, 3.0, 1.5
    got = DF.hungarian_logits_kd_loss(s_logits, s_boxes, t_logits, t_boxes, cls_weight=cls_w, l1_weight=l1_w,
                                      giou_weight=giou_w)
    sl, sb, tl, tb = (x[0].double().numpy() for x in (s_logits, s_boxes, t_logits, t_boxes))
    ps, pt = np_softmax(sl), np_softmax(tl)
    labels = tl.argmax(-1)

    def cost(q, j):  # DETR's matching cost with costs 1, 5, 2
        return -ps[q, labels[j]] + 5 * np.abs(sb[q] - tb[j]).sum() - 2 * np_iou_giou(np_xyxy(sb[q]), np_xyxy(tb[j]))[1]

    best = min(itertools.permutations(range(3)), key=lambda perm: sum(cost(q, j) for j, q in enumerate(perm)))
    kl = np.mean([(pt[j] * (np.log(pt[j]) - np.log(ps[q]))).sum() for j, q in enumerate(best)])
    objects = [(q, j) for j, q in enumerate(best) if labels[j] != 2]
    l1 = sum(np.abs(sb[q] - tb[j]).sum() for q, j in objects) / len(objects)
    giou = sum(1 - np_iou_giou(np_xyxy(sb[q]), np_xyxy(tb[j]))[1] for q, j in objects) / len(objects)
    assert got.item() == pytest.approx(cls_w * kl + l1_w * l1 + giou_w * giou, rel=1e-5)


def test_hungarian_logits_kd_is_zero_for_the_teacher_itself_and_reaches_only_the_student():
    t_logits = torch.tensor([[[6.0, -3, -3], [-3, 6.0, -3], [-3, -3, 6.0]]])
    t_boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.3], [0.8, 0.7, 0.2, 0.2]]])
    perm = [2, 0, 1]  # the student holds the same predictions in another order
    s_logits = t_logits[:, perm].clone().requires_grad_(True)
    s_boxes = t_boxes[:, perm].clone().requires_grad_(True)
    teacher = t_logits.clone().requires_grad_(True)
    loss = DF.hungarian_logits_kd_loss(s_logits, s_boxes, teacher, t_boxes)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    DF.hungarian_logits_kd_loss(s_logits + 0.3, s_boxes, teacher, t_boxes).backward()
    assert s_logits.grad is not None and teacher.grad is None


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3))
def test_hungarian_logits_kd_is_non_negative(seed, b):
    s_logits, s_boxes = _detr_preds(seed, b=b, q=4)
    t_logits, t_boxes = _detr_preds(seed + 1, b=b, q=4)
    assert DF.hungarian_logits_kd_loss(s_logits, s_boxes, t_logits, t_boxes).item() >= 0


# ----------------------------------------------------------------------------- DETRDistill: features and queries


def test_query_quality_is_score_times_best_iou():
    t_logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.5, 3.0]]])  # K = 2 classes + no object
    t_boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2]]])
    gt = [torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.25, 0.2, 0.2, 0.2]])]
    got = DF.query_quality(t_logits, t_boxes, gt)
    p = np_softmax(t_logits[0].numpy().astype(float))
    want = []
    for j in range(2):
        best = max(np_iou_giou(np_xyxy(t_boxes[0, j].numpy()), np_xyxy(g.numpy()))[0] for g in gt[0])
        want.append(p[j, :2].max() * best)
    assert got[0].tolist() == pytest.approx(want, rel=1e-5)
    # no ground truth: the score alone
    assert DF.query_quality(t_logits, t_boxes, [torch.zeros(0, 4)])[0].tolist() == pytest.approx(
        p[:, :2].max(-1).tolist(), rel=1e-5)


def test_target_aware_mask_and_feature_loss_by_hand():
    g = torch.Generator().manual_seed(3)
    t_feat, s_feat = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    queries, quality = torch.randn(2, 3, 4, generator=g), torch.rand(2, 3, generator=g)
    quality[1] = 0.0  # an image whose queries are all worthless: the floor, then a flat mask of ones
    floor = 0.05
    mask = DF.target_aware_mask(t_feat, queries, quality, floor=floor)
    want = np.zeros((2, 5))
    for b in range(2):
        for n in range(5):
            f = t_feat[b, n].double().numpy()
            total = 0.0
            for j in range(3):
                q = queries[b, j].double().numpy()
                total += quality[b, j].item() * (q @ f) / (np.linalg.norm(q) * np.linalg.norm(f))
            want[b, n] = max(total, floor)
        want[b] /= want[b].max()
    assert mask.double().numpy() == pytest.approx(want, rel=1e-5)
    assert mask[1].tolist() == pytest.approx([1.0] * 5)
    loss = DF.target_aware_feature_loss(s_feat, t_feat, mask)
    ref = sum(((want[b, n] * (t_feat[b, n, d] - s_feat[b, n, d]).item()) ** 2)
              for b in range(2) for n in range(5) for d in range(4)) / 40
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_query_prior_assignment_loss_by_hand():
    logits = torch.tensor([[[1.0, 0.0, 0.5], [0.2, 2.0, 0.1]]])  # K = 2, Q = 2
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4]]])
    gt_boxes, gt_labels = [torch.tensor([[0.4, 0.5, 0.2, 0.2]])], [torch.tensor([1])]
    matches = [[(torch.tensor([0]), torch.tensor([0]))]]  # the teacher's assignment: query 0 <-> object 0
    ce_w, l1_w, giou_w, eos = 0.5, 2.0, 3.0, 0.25
    got = DF.query_prior_assignment_loss([logits], [boxes], gt_boxes, gt_labels, matches, no_object_weight=eos,
                                         ce_weight=ce_w, l1_weight=l1_w, giou_weight=giou_w)
    p = np_softmax(logits[0].double().numpy())
    ce = (1.0 * -np.log(p[0, 1]) + eos * -np.log(p[1, 2])) / (1.0 + eos)  # weighted mean; query 1 is "no object"
    l1 = np.abs(boxes[0, 0].numpy() - gt_boxes[0][0].numpy()).sum()
    giou = 1 - np_iou_giou(np_xyxy(boxes[0, 0].numpy()), np_xyxy(gt_boxes[0][0].numpy()))[1]
    assert got.item() == pytest.approx(ce_w * ce + l1_w * l1 + giou_w * giou, rel=1e-5)


def _detr_batch(b=2, hw=32):
    g = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[2.0, 3.0, 14.0, 15.0], [16.0, 10.0, 30.0, 28.0]]) for _ in range(b)]
    labels = [torch.tensor([1, 4]) for _ in range(b)]
    return DenseBatch(torch.randn(b, 1, hw, hw, generator=g), None, boxes=boxes, labels=labels)


def test_detrdistill_method_trains_the_student_and_its_adapters_only():
    torch.manual_seed(0)
    student, teacher = create("detr_student"), create("detr_teacher")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = _detr_batch()
    d = distill.Distiller(student, teacher, {"detrdistill": {"layer_pairs": [(0, 1), (1, 2)], "feature_weight": 2.0}})
    d.prepare(batch)
    method = d.methods["detrdistill"]
    params = list(d.trainable_parameters())
    assert any(p is method.query_adapter.weight for p in params) and any(p is method.feat_adapter.weight for p in params)
    out = d(batch)
    out.total.backward()
    assert method.query_adapter.weight.grad is not None and method.feat_adapter.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    # the query part alone: the teacher's queries (through the adapter) replace the student's own
    student.zero_grad()
    q = distill.Distiller(student, teacher, {"detrdistill": {"logits_weight": 0.0, "feature_weight": 0.0}})
    q.prepare(batch)
    q(batch).total.backward()
    own = student.query_embed.weight.grad
    assert (own is None or not own.any()) and q.methods["detrdistill"].query_adapter.weight.grad.abs().sum() > 0


def test_detrdistill_parts_add_up_and_the_query_part_reads_the_teacher_queries():
    torch.manual_seed(0)
    student, teacher = create("detr_student"), create("detr_teacher")
    batch = _detr_batch()
    pairs = [(1, 2)]

    def part(**weights):
        d = distill.Distiller(student, teacher, {"detrdistill": {"layer_pairs": pairs, **weights}})
        d.prepare(batch)
        d.methods["detrdistill"].load_state_dict(ref.methods["detrdistill"].state_dict())
        d.eval()
        return d(batch).total.item()

    ref = distill.Distiller(student, teacher, {"detrdistill": {"layer_pairs": pairs}})
    ref.prepare(batch)
    ref.eval()
    whole = ref(batch).total.item()
    logits = part(feature_weight=0.0, query_weight=0.0)
    feature = part(logits_weight=0.0, query_weight=0.0)
    query = part(logits_weight=0.0, feature_weight=0.0)
    assert whole == pytest.approx(logits + feature + query, rel=1e-5)
    # the logits part alone is the functional loss on the last layers' predictions
    out_s, out_t = student.eval()(batch.inputs), teacher.eval()(batch.inputs)
    assert logits == pytest.approx(DF.hungarian_logits_kd_loss(out_s["logits"], out_s["boxes"], out_t["logits"],
                                                               out_t["boxes"]).item(), rel=1e-5)
    # the query part: the student's predictions with the adapted teacher queries in place of its own,
    # under the teacher's own matching of its last layer to the ground truth
    from distill.models.detr import hungarian_match, normalize_boxes

    method = ref.methods["detrdistill"]
    queries = method.query_adapter(teacher.query_embed.weight)
    with torch.no_grad():
        swapped = torch.func.functional_call(student, {"query_embed.weight": queries}, (batch.inputs,))
    assert not torch.allclose(swapped["boxes"], out_s["boxes"])
    with torch.no_grad():
        torch.testing.assert_close(method._query_predictions(batch)[-1], (swapped["logits"], swapped["boxes"]))
    gt = [normalize_boxes(b, (32, 32)) for b in batch.boxes]
    match = hungarian_match(out_t["logits"], out_t["boxes"], gt, batch.labels)
    want = DF.query_prior_assignment_loss([swapped["logits"]], [swapped["boxes"]], gt, batch.labels, [match])
    assert query == pytest.approx(want.item(), rel=1e-5)


def test_detrdistill_refuses_bad_layer_pairs_before_training():
    student, teacher = create("detr_student"), create("detr_teacher")
    d = distill.Distiller(student, teacher, {"detrdistill": {"layer_pairs": [(2, 2)]}})  # the student has 2 layers
    with pytest.raises(ValueError, match="layer_pairs"):
        d.prepare(_detr_batch())
    with pytest.raises(TapError, match="decoder_out.3"):  # the teacher has 3: its tap does not exist
        distill.Distiller(student, teacher, {"detrdistill": {"layer_pairs": [(0, 3)]}})
    with pytest.raises(ValueError, match="layer_pairs"):
        distill.methods.create_method("detrdistill", layer_pairs=[])


# ----------------------------------------------------------------------------- Dense Teacher


def test_select_dense_region_keeps_the_top_ratio():
    t = torch.tensor([[0.0, -1.0], [3.0, -2.0], [-5.0, 1.0], [2.0, 2.5], [-4.0, -4.0]])
    assert DF.select_dense_region(t, 0.4).tolist() == [False, True, False, True, False]
    assert DF.select_dense_region(t, 0.01).tolist() == [False, True, False, False, False]  # at least one point


def test_dense_pseudo_label_loss_by_hand():
    g = torch.Generator().manual_seed(5)
    m, k = 6, 3
    s_logits, t_logits = torch.randn(m, k, generator=g), torch.randn(m, k, generator=g) * 2
    pts = torch.rand(m, 2, generator=g) * 20 + 10
    s_boxes = torch.cat([pts - 5 - torch.rand(m, 2, generator=g) * 3, pts + 5], -1)
    t_boxes = torch.cat([pts - 6, pts + 4 + torch.rand(m, 2, generator=g) * 3], -1)
    ratio, beta, cw, bw = 0.45, 1.5, 3.0, 0.5  # 2.7 points: the region holds 2
    got = DF.dense_pseudo_label_loss(s_logits, s_boxes, t_logits, t_boxes, ratio=ratio, beta=beta, cls_weight=cw,
                                     box_weight=bw)
    tp = [[sig(t_logits[i, c].item()) for c in range(k)] for i in range(m)]
    count = int(m * ratio)
    selected = sorted(range(m), key=lambda i: -max(tp[i]))[:count]
    cls = 0.0
    for i in range(m):
        for c in range(k):
            ps = sig(s_logits[i, c].item())
            y = tp[i][c] if i in selected else 0.0
            cls += np_bce(ps, y) * abs(y - ps) ** beta
    cls /= sum(max(tp[i]) for i in selected)
    box = np.mean([1 - np_iou_giou(s_boxes[i].double().numpy(), t_boxes[i].double().numpy())[1] for i in selected])
    assert got.item() == pytest.approx(cw * cls + bw * box, rel=1e-5)


def test_dense_pseudo_label_loss_is_zero_only_through_the_box_term_for_the_teacher_itself():
    t = torch.tensor([[8.0, -8.0], [-8.0, -8.0], [-8.0, 8.0]])
    boxes = torch.tensor([[0.0, 0, 4, 4], [2, 2, 6, 6], [1, 1, 5, 9]])
    # pushed-down points pay σ^β BCE(σ, 0): with near-0 teacher scores everywhere else the loss is tiny
    assert DF.dense_pseudo_label_loss(t, boxes, t, boxes, ratio=0.67).item() == pytest.approx(0.0, abs=1e-3)


# ----------------------------------------------------------------------------- DTG-SSOD


def test_inverse_nms_clusters_on_a_hand_built_case():
    boxes = torch.tensor([
        [0.0, 0, 10, 10],    # 0: score .9, class 0 -> kept
        [2.0, 0, 12, 10],    # 1: .8, IoU(0) = .67 -> joins 0
        [0.0, 1, 10, 11],    # 2: .7, class 1 -> its own cluster (NMS is class-wise)
        [5.5, 0, 15.5, 10],  # 3: .6, IoU(0) = .29, IoU(1) = .48: a suppressed box suppresses nobody -> kept
        [0.0, 0, 10, 10.5],  # 4: .2 -> below the score threshold
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2])
    labels = torch.tensor([0, 0, 1, 0, 0])
    got = DF.inverse_nms_clusters(boxes, scores, labels, score_threshold=0.3, iou_threshold=0.4)
    assert got.tolist() == [0, 0, 2, 3, -1]
    assert DF.inverse_nms_clusters(boxes, scores, labels, score_threshold=0.3, iou_threshold=0.2).tolist() == \
        [0, 0, 2, 0, -1]


def test_dtg_loss_by_hand():
    g = torch.Generator().manual_seed(7)
    n, k = 5, 2
    s_logits, t_logits = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g) * 2
    t_logits[0] = torch.tensor([3.0, -1.0])  # the cluster heads' classes: 0 for head 0, 1 for head 3
    t_logits[3] = torch.tensor([-1.0, 2.0])
    base = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 10], [0, 1, 9, 11], [20, 20, 30, 30], [40, 40, 45, 45]])
    s_boxes = base + torch.rand(n, 4, generator=g)
    t_boxes = base + torch.rand(n, 4, generator=g)
    cluster = torch.tensor([0, 0, 0, 3, -1])
    tau, beta, wi, wb, wr = 0.5, 1.0, 0.6, 1.7, 2.5
    got = DF.dtg_loss(s_logits, s_boxes, t_logits, t_boxes, cluster, tau=tau, beta=beta, inc_weight=wi, box_weight=wb,
                      rank_weight=wr)
    cls_of = {0: 0, 3: 1}
    inc = 0.0
    for i in range(n):
        for c in range(k):
            ps = sig(s_logits[i, c].item())
            y = 0.0
            h = int(cluster[i])
            if h >= 0 and c == cls_of[h]:
                y = np_iou_giou(s_boxes[i].double().numpy(), t_boxes[h].double().numpy())[0]
            inc += np_bce(ps, y) * abs(y - ps) ** beta
    inc /= 4
    box = np.mean([1 - np_iou_giou(s_boxes[i].double().numpy(), t_boxes[i].double().numpy())[1] for i in range(4)])
    members = [0, 1, 2]  # the one cluster with two members or more; class 0
    pt = np_softmax(np.array([t_logits[i, 0].item() for i in members]) / tau)
    ps = np_softmax(np.array([s_logits[i, 0].item() for i in members]) / tau)
    rank = (pt * (np.log(pt) - np.log(ps))).sum()
    assert got.item() == pytest.approx(wi * inc + wb * box + wr * rank, rel=1e-5)


# ----------------------------------------------------------------------------- the SSOD strategies


def test_ssod_teacher_copies_then_averages():
    from distill.strategies.dense_ssod import SSODTeacher

    student = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher = SSODTeacher(student, decay=0.75, start_steps=2)
    for step, value in enumerate([3.0, 5.0, 9.0, 1.0]):
        with torch.no_grad():
            student.weight.fill_(value)
        teacher.on_step_end(student)
        if step == 1:
            assert teacher.model.weight[0, 0].item() == pytest.approx(5.0)  # still a copy
    # step 3: 0.75 * 5 + 0.25 * 9 = 6; step 4: 0.75 * 6 + 0.25 * 1 = 4.75
    assert teacher.model.weight[0, 0].item() == pytest.approx(4.75)


def _scenes(n):
    from distill.data.scenes import make_scenes

    return make_scenes("digits", "train", n_scenes=n, seed=1, objects=(1, 2))


def test_ssod_loader_joins_labelled_first_and_is_deterministic():
    from distill.strategies.dense_ssod import SSODLoader

    sc = _scenes(12)
    loader = SSODLoader(sc.subset(range(4)).loader(2), sc.subset(range(4, 12)).loader(4), seed=3)
    batches = list(loader)
    assert len(batches) == 2 == len(loader)
    b = batches[0]
    assert b.labeled.tolist() == [True, True, False, False, False, False]
    assert [len(x) for x in b.boxes[2:]] == [0, 0, 0, 0] and all(len(x) for x in b.boxes[:2])
    assert torch.equal(b.teacher_inputs, sc.normalize(torch.cat([sc.images[:2], sc.images[4:8]])))
    assert not torch.equal(b.inputs, b.teacher_inputs)
    assert torch.equal(next(iter(loader)).inputs, b.inputs)


@pytest.mark.parametrize("name", ["dense_teacher", "dtg_ssod"])
def test_ssod_strategies_run_and_the_teacher_follows_the_student(name):
    from distill.strategies.dense_ssod import DenseTeacherLoss
    from distill.strategies.registry import strategy_info

    info = strategy_info(name)
    assert info.family == "semi-supervised" and info.paper.arxiv in ("2207.02541", "2207.05536")
    sc = _scenes(12)
    torch.manual_seed(0)
    student = create("gfl_student", width=8)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    r = info.fn(student, sc.subset(range(4)).loader(2), None, epochs=1, unlabeled_loader=sc.subset(range(4, 12)).loader(4),
                burn_in=0, ema_start=1, progress=False, optimizer="adamw", lr=1e-3)
    unsup = "train_dense_teacher" if name == "dense_teacher" else "train_dtg"
    assert unsup in r.history[0] and math.isfinite(r.history[0][unsup])
    ema = r.ema_model.state_dict()
    moved = [k for k, v in ema.items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved and any(not torch.equal(v, student.state_dict()[k]) for k, v in ema.items() if v.is_floating_point())
    ramp = DenseTeacherLoss(burn_in_steps=4)
    factors = []
    for _ in range(10):
        factors.append(ramp.weight_factor())
        ramp.on_step_end()
    assert factors == [0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1]


def test_ssod_batch_parts_give_every_rank_labelled_and_unlabeled_images():
    # under torchrun each rank must compute both losses on every step (tests/test_strategies_distributed.py runs
    # both strategies from recipes on 2 processes); a contiguous split gave rank 0 every labelled image
    from distill.strategies.dense_ssod import SSODLoader

    sc = _scenes(10)
    batch = next(iter(SSODLoader(sc.subset(range(4)).loader(4), sc.subset(range(4, 10)).loader(6), seed=1)))
    assert batch.labeled.tolist() == [True] * 4 + [False] * 6
    parts = [batch.part(r, 2) for r in range(2)]
    order = [0, 1, 4, 5, 6, 2, 3, 7, 8, 9]  # rank 0: labelled 0-1, unlabeled 4-6; rank 1: labelled 2-3, unlabeled 7-9
    assert [p.labeled.tolist() for p in parts] == [[True, True, False, False, False]] * 2
    assert torch.equal(torch.cat([p.inputs for p in parts]), batch.inputs[order])
    assert torch.equal(torch.cat([p.teacher_inputs for p in parts]), batch.teacher_inputs[order])
    for got, want in zip([b for p in parts for b in p.boxes], [batch.boxes[i] for i in order]):
        assert torch.equal(got, want)
    assert [len(b) for b in parts[1].labels[2:]] == [0, 0, 0]  # unlabeled images carry no boxes
    with pytest.raises(ValueError, match="4 labelled and 6 unlabeled images cannot be split over 5"):
        batch.part(0, 5)


# ----------------------------------------------------------------------------- recipes (data.task)


def _dense_recipe(name: str) -> dict:
    from pathlib import Path

    from distill.recipes import read_recipe_file

    raw = read_recipe_file(Path(__file__).resolve().parents[1] / "recipes" / "dense" / name)
    raw["data"].update(name="digits_scenes", train_subset=16, batch_size=8, options={"n_scenes": 24})
    raw["train"]["epochs"], raw["seeds"] = 1, [0]
    return raw


def test_a_semi_supervised_dense_recipe_runs(tmp_path):
    import json

    from distill.recipes import parse_recipe
    from distill.runner import run_recipe

    raw = _dense_recipe("ssod_dense_teacher.yaml")
    raw["strategy"]["labeled"] = 8
    (run,) = run_recipe(parse_recipe(raw), out_dir=tmp_path, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "dense_teacher" and summary["last_acc"] is not None  # mAP from the evaluator
    assert summary["data"]["task"] == "detection" and summary["data"]["train_size"] == 16


def test_a_dense_model_trained_alone_uses_the_task_loss_and_the_task_metric(tmp_path):
    import json

    from distill.recipes import RecipeError, parse_recipe
    from distill.runner import run_recipe

    raw = _dense_recipe("detection_gfl_teacher.yaml")
    raw["student"] = {"name": "gfl_student", "kwargs": {"width": 8}}
    (run,) = run_recipe(parse_recipe(raw), out_dir=tmp_path, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["losses"]) == ["gfl_loss"]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any("val_student_map_50" in row for row in history)  # detection_evaluator, not top-1
    with pytest.raises(RecipeError, match="family 'task'"):
        run_recipe(parse_recipe({**raw, "name": "no_task_loss", "losses": {"ce": 1.0}}), out_dir=tmp_path,
                   progress=False)
    with pytest.raises(RecipeError, match="task 'classification' does not fit"):
        parse_recipe({**raw, "data": {**raw["data"], "task": "classification"}})
    with pytest.raises(RecipeError, match="takes no 'augment'"):
        parse_recipe({**raw, "data": {**raw["data"], "augment": {"flip": True}}})
    with pytest.raises(RecipeError, match="data.options: .*n_scene"):
        run_recipe(parse_recipe({**raw, "name": "bad_option", "data": {**raw["data"], "options": {"n_scene": 3}}}),
                   out_dir=tmp_path, progress=False)
