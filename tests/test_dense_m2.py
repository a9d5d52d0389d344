"""Detection distillation (issue 14, part M2): Quantization Mimic, ADL, FGD, Rank Mimicking, PFI, LD,
LD on the valuable localization region, LGD.

Each loss against numbers worked out independently (numpy and plain loops written here), their
invariants (zero at agreement, non-negative) with hypothesis, and every method for a few training
steps on stand-in 64x64 scenes with ``gfl_loss`` and the GFL detectors: the loss is finite, gradients reach the student and the method's parts, never the teacher.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill import functional as DF
from distill.batch import DenseBatch
from distill.methods import create_method, method_info
from distill.methods.dense_det import GcBlock
from distill.models import create

torch.set_num_threads(1)
SETTINGS = settings(max_examples=20, deadline=None)
NAMES = ("quantization_mimic", "adl", "fgd", "rank_mimicking", "pfi", "ld", "ld_vlr", "lgd")
ARXIV = {"quantization_mimic": "1805.02152", "adl": "1901.00366", "fgd": "2111.11837", "rank_mimicking": "2112.04840",
         "pfi": "2112.04840", "ld": "2102.12252", "ld_vlr": "2204.05957", "lgd": "2109.11496"}


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------- registry


def test_registered_with_papers_and_defaults():
    for name in NAMES:
        info = method_info(name)
        assert info.family == "detection" and info.paper.arxiv == ARXIV[name] and info.summary
    assert method_info("fgd").defaults["temperature"] == 0.5
    assert (method_info("fgd").defaults["alpha"], method_info("fgd").defaults["lam"]) == (1e-3, 5e-6)
    assert method_info("ld").defaults["tau"] == 10.0 and method_info("ld").defaults["weight"] == 0.25
    assert method_info("ld_vlr").defaults["alpha_vl"] == 0.25
    assert method_info("lgd").cls.needs_teacher is False


# ---------------------------------------------------------------------------- Quantization Mimic


def test_quantization_mimic_matches_a_loop_and_passes_gradients_straight_through():
    s, t = rand(0, 2, 3, 4, 5, scale=2.0), rand(1, 2, 3, 4, 5, scale=2.0)
    region = rand(2, 2, 4, 5) > 0.3
    step = 0.7
    s.requires_grad_(True)
    got = DF.quantization_mimic_loss(s, t, region, step)
    sn, tn, rn = s.detach().numpy(), t.numpy(), region.numpy()
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(5):
                if rn[b, i, j]:
                    count += 1
                    for c in range(3):
                        total += (step * np.round(tn[b, c, i, j] / step) - step * np.round(sn[b, c, i, j] / step)) ** 2
    assert got.item() == pytest.approx(total / (2 * count), rel=1e-10)
    got.backward()
    q = lambda x: step * np.round(x / step)  # noqa: E731
    expected_grad = -(q(tn) - q(sn)) * rn[:, None] / count
    np.testing.assert_allclose(s.grad.numpy(), expected_grad, rtol=1e-10)
    assert DF.quantization_mimic_loss(s, t, torch.zeros_like(region), step).item() == 0.0


# ---------------------------------------------------------------------------- ADL


def np_adl(zs, zt, beta, gamma, power):
    q, p = sigmoid(zt), sigmoid(zs)
    kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    ent = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    loss = (1 - np.exp(-(kl + beta * ent))) ** gamma * kl
    denom = max(1.0, (q ** power).sum()) if power is not None else loss.size / loss.shape[-1]
    return loss.sum() / denom


@pytest.mark.parametrize("power", [1.3, None])
def test_adl_matches_numpy(power):
    zs, zt = rand(3, 2, 7, 4, scale=2.0), rand(4, 2, 7, 4, scale=3.0)
    got = DF.adl_loss(zs, zt, beta=0.7, gamma=1.5, normalizer_power=power).item()
    assert got == pytest.approx(np_adl(zs.numpy(), zt.numpy(), 0.7, 1.5, power), rel=1e-9)


def test_adl_weight_is_differentiated_like_the_closed_form():
    zs, zt = rand(5, 1, 3, 2), rand(6, 1, 3, 2)
    zs.requires_grad_(True)
    DF.adl_loss(zs, zt, beta=0.5, gamma=2.0, normalizer_power=None).backward()
    eps = 1e-6
    base = zs.detach().numpy()
    for idx in np.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[idx] += eps
        down[idx] -= eps
        num = (np_adl(up, zt.numpy(), 0.5, 2.0, None) - np_adl(down, zt.numpy(), 0.5, 2.0, None)) / (2 * eps)
        assert zs.grad.numpy()[idx] == pytest.approx(num, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------- FGD


def test_fgd_masks_on_a_hand_built_case():
    # 32x32 image, stride 8 -> 4x4 cells with centres 4, 12, 20, 28
    big = torch.tensor([[0.0, 0.0, 16.0, 24.0]])  # columns 0-1, rows 0-2: 6 cells
    small = torch.tensor([[10.0, 10.0, 14.0, 14.0]])  # cell (1, 1) only
    fg, scale, bg = DF.fgd_masks([torch.cat([big, small]), torch.zeros(0, 4)], 4, 4, 8.0, dtype=torch.float64)
    expect_fg = np.zeros((4, 4))
    expect_fg[0:3, 0:2] = 1
    np.testing.assert_array_equal(fg[0].numpy(), expect_fg)
    expect_scale = expect_fg / 6
    expect_scale[1, 1] = 1.0  # the smaller box wins
    np.testing.assert_allclose(scale[0].numpy(), expect_scale)
    np.testing.assert_allclose(bg[0].numpy(), (1 - expect_fg) / 10)
    np.testing.assert_allclose(bg[1].numpy(), np.full((4, 4), 1 / 16))
    assert fg[1].sum() == 0


def test_fgd_attention_and_losses_match_numpy():
    s, t = rand(7, 2, 3, 4, 5), rand(8, 2, 3, 4, 5)
    temp = 0.8
    sa, ca = DF.fgd_attention(t, temp)
    tn = t.numpy()
    g_s = np.abs(tn).mean(axis=1).reshape(2, -1)
    np.testing.assert_allclose(sa.numpy(), (20 * softmax(g_s / temp)).reshape(2, 4, 5), rtol=1e-10)
    g_c = np.abs(tn).mean(axis=(2, 3))
    np.testing.assert_allclose(ca.numpy(), 3 * softmax(g_c / temp), rtol=1e-10)
    fg = (rand(9, 2, 4, 5) > 0).double() * 0.25
    bg = (fg == 0).double() / (fg == 0).double().sum(dim=(1, 2), keepdim=True)
    l_fg, l_bg = DF.fgd_feature_loss(s, t, fg, bg, sa, ca, alpha=0.3, beta=0.2)
    sn = s.numpy()
    acc_fg = acc_bg = 0.0
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(5):
                    d = (tn[b, c, i, j] - sn[b, c, i, j]) ** 2 * sa[b, i, j].item() * ca[b, c].item()
                    acc_fg += fg[b, i, j].item() * d
                    acc_bg += bg[b, i, j].item() * d
    assert l_fg.item() == pytest.approx(0.3 * acc_fg / 2, rel=1e-10)
    assert l_bg.item() == pytest.approx(0.2 * acc_bg / 2, rel=1e-10)
    sa_s, ca_s = DF.fgd_attention(s, temp)
    l_at = DF.fgd_attention_loss(sa_s, ca_s, sa, ca, gamma=0.4).item()
    want = 0.4 * (np.abs(sa.numpy() - sa_s.numpy()).sum() + np.abs(ca.numpy() - ca_s.numpy()).sum()) / 2
    assert l_at == pytest.approx(want, rel=1e-10)
    assert DF.fgd_global_loss(s, t, lam=0.5).item() == pytest.approx(0.5 * ((tn - sn) ** 2).sum() / 2, rel=1e-10)


def test_gcblock_is_the_context_formula():
    torch.manual_seed(0)
    block = GcBlock(4).double()
    torch.nn.init.normal_(block.transform[-1].weight)  # leave the zero init so the added term shows
    x = rand(10, 2, 4, 3, 3)
    got = block(x).detach().numpy()
    xn = x.numpy()
    wk, bk = block.key.weight.detach().numpy().reshape(4), block.key.bias.item()
    w1, b1 = block.transform[0].weight.detach().numpy().reshape(2, 4), block.transform[0].bias.detach().numpy()
    ln = block.transform[1]
    w2, b2 = block.transform[3].weight.detach().numpy().reshape(4, 2), block.transform[3].bias.detach().numpy()
    for b in range(2):
        flat = xn[b].reshape(4, 9)
        attn = softmax(wk @ flat + bk)
        ctx = flat @ attn  # (4,)
        h = w1 @ ctx + b1
        h = (h - h.mean()) / np.sqrt(h.var() + ln.eps) * ln.weight.detach().numpy().reshape(2) + \
            ln.bias.detach().numpy().reshape(2)
        add = w2 @ np.maximum(h, 0) + b2
        np.testing.assert_allclose(got[b], xn[b] + add[:, None, None], rtol=1e-9)


# ---------------------------------------------------------------------------- Rank Mimicking / PFI


def test_rank_mimicking_matches_a_loop():
    s, t = rand(11, 9, scale=2.0), rand(12, 9, scale=2.0)
    groups = torch.tensor([5, 5, 5, 2, 2, 7, 9, 9, 9])
    tau = 2.0
    got = DF.rank_mimicking_loss(s, t, groups, tau).item()
    total = 0.0
    ids = sorted(set(groups.tolist()))
    for g in ids:
        idx = [k for k in range(9) if groups[k].item() == g]
        pt, ps = softmax(t.numpy()[idx] / tau), softmax(s.numpy()[idx] / tau)
        total += (pt * np.log(pt / ps)).sum()
    assert got == pytest.approx(total / len(ids), rel=1e-10)


def test_pfi_matches_numpy():
    s, t = rand(13, 2, 3, 4, 4), rand(14, 2, 3, 4, 4)
    ps, pt = torch.sigmoid(rand(15, 2, 5, 4, 4)), torch.sigmoid(rand(16, 2, 5, 4, 4))
    diff = DF.prediction_difference(ps, pt)
    np.testing.assert_allclose(diff.numpy(), ((pt.numpy() - ps.numpy()) ** 2).mean(axis=1), rtol=1e-12)
    got = DF.pfi_loss(s, t, diff).item()
    want = (diff.numpy() * ((t.numpy() - s.numpy()) ** 2).sum(axis=1)).sum() / (2 * 4 * 4)
    assert got == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------------------- LD and the VLR


def test_ld_loss_matches_numpy():
    s, t = rand(17, 5, 4, 7, scale=3.0), rand(18, 5, 4, 7, scale=3.0)
    w = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    tau = 3.0
    got = DF.ld_loss(s, t, w, tau).item()
    pt, ps = softmax(t.numpy() / tau), softmax(s.numpy() / tau)
    per = tau ** 2 * (pt * np.log(pt / ps)).sum(axis=(1, 2))
    assert got == pytest.approx((w.numpy() * per).sum() / w.numpy().sum(), rel=1e-10)
    assert DF.ld_loss(s, t, torch.zeros(5, dtype=torch.float64), tau).item() == 0.0


def _iou_diou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / union
    rho2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    cw, ch = max(a[2], b[2]) - min(a[0], b[0]), max(a[3], b[3]) - min(a[1], b[1])
    return iou, iou - rho2 / (cw ** 2 + ch ** 2)


def test_valuable_localization_region_matches_a_loop():
    # 32x32 image, strides 8 and 16: 16 + 4 points at cell centres
    pts, strs = [], []
    for s, n in ((8, 4), (16, 2)):
        for i in range(n):
            for j in range(n):
                pts.append(((j + 0.5) * s, (i + 0.5) * s))
                strs.append(float(s))
    boxes = [(3.0, 5.0, 19.0, 17.0), (14.0, 12.0, 31.0, 30.0)]
    scale, topk, alpha = 3.0, 3, 0.4
    got = DF.valuable_localization_region(torch.tensor(pts, dtype=torch.float64), torch.tensor(strs, dtype=torch.float64),
                                          torch.tensor(boxes, dtype=torch.float64), anchor_scale=scale, topk=topk,
                                          alpha_vl=alpha).numpy()
    anchors = [(x - s * scale / 2, y - s * scale / 2, x + s * scale / 2, y + s * scale / 2) for (x, y), s in zip(pts, strs)]
    want = np.zeros(len(pts))
    for box in boxes:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        cand = []
        for s in (8.0, 16.0):
            idx = [k for k in range(len(pts)) if strs[k] == s]
            idx.sort(key=lambda k: (pts[k][0] - cx) ** 2 + (pts[k][1] - cy) ** 2)
            cand += idx[:topk]
        ious = [_iou_diou(anchors[k], box)[0] for k in cand]
        thr = np.mean(ious) + np.std(ious, ddof=1)
        for k in range(len(pts)):
            iou, diou = _iou_diou(anchors[k], box)
            if alpha * thr <= diou < thr:
                want[k] = max(want[k], iou)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert (got > 0).sum() >= 2  # the case exercises the region


# ---------------------------------------------------------------------------- LGD


def test_lgd_feature_loss_is_instance_normalised_mse():
    s, k = rand(19, 2, 3, 4, 4, scale=2.0) + 1.0, rand(20, 2, 3, 4, 4)
    got = DF.lgd_feature_loss(s, k).item()

    def inorm(x):
        mu = x.mean(axis=(2, 3), keepdims=True)
        return (x - mu) / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5)

    assert got == pytest.approx(((inorm(k.numpy()) - inorm(s.numpy())) ** 2).mean(), rel=1e-9)


# ---------------------------------------------------------------------------- invariants


@SETTINGS
@given(st.integers(0, 10_000))
def test_losses_vanish_when_student_equals_teacher_and_are_non_negative(seed):
    x, y = rand(seed, 2, 3, 4, 4), rand(seed + 1, 2, 3, 4, 4)
    region = rand(seed + 2, 2, 4, 4) > 0
    assert DF.quantization_mimic_loss(x, x, region, 0.3).item() == 0.0
    assert DF.quantization_mimic_loss(x, y, region, 0.3).item() >= 0.0
    z1, z2 = rand(seed + 3, 2, 6, 3, scale=3.0), rand(seed + 4, 2, 6, 3, scale=3.0)
    assert abs(DF.adl_loss(z1, z1).item()) < 1e-12 and DF.adl_loss(z1, z2).item() >= 0.0
    d1, d2 = rand(seed + 5, 6, 4, 5, scale=3.0), rand(seed + 6, 6, 4, 5, scale=3.0)
    w = rand(seed + 7, 6).abs()
    assert abs(DF.ld_loss(d1, d1, w, 4.0).item()) < 1e-10 and DF.ld_loss(d1, d2, w, 4.0).item() >= 0.0
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    assert abs(DF.rank_mimicking_loss(w, w, groups).item()) < 1e-12
    assert DF.rank_mimicking_loss(w, rand(seed + 8, 6), groups).item() >= -1e-12
    sa, ca = DF.fgd_attention(y)
    fg, bg = (region.double() * 0.1), (~region).double() * 0.1
    assert all(v.item() == 0.0 for v in DF.fgd_feature_loss(y, y, fg, bg, sa, ca, 1.0, 1.0))
    assert DF.pfi_loss(x, x, region.double()).item() == 0.0


# ---------------------------------------------------------------------------- methods on the detectors


@pytest.fixture(scope="module")
def scene_batch() -> DenseBatch:
    """Four 64x64 stand-in scenes: bright noisy rectangles where the boxes are (the scene loaders of
    distill.data.scenes yield the same DenseBatch; examples/dense/dense_det_kd.py runs on them)."""
    g = torch.Generator().manual_seed(3)
    boxes = [torch.tensor([[4.0, 6.0, 26.0, 30.0], [34.0, 30.0, 60.0, 58.0]]), torch.tensor([[10.0, 12.0, 40.0, 44.0]]),
             torch.tensor([[2.0, 40.0, 22.0, 62.0], [30.0, 2.0, 50.0, 20.0], [40.0, 36.0, 62.0, 60.0]]),
             torch.tensor([[20.0, 18.0, 46.0, 48.0]])]
    labels = [torch.tensor([3, 7]), torch.tensor([1]), torch.tensor([0, 9, 4]), torch.tensor([5])]
    images = torch.rand(4, 1, 64, 64, generator=g) * 0.2
    for i, bx in enumerate(boxes):
        for x1, y1, x2, y2 in bx.long().tolist():
            images[i, 0, y1:y2, x1:x2] += 0.8 * torch.rand(y2 - y1, x2 - x1, generator=g)
    return DenseBatch(images, boxes=boxes, labels=labels)


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    teacher, student = create("gfl_teacher", width=32), create("gfl_student", width=16)
    return teacher, student


@pytest.mark.parametrize("name", NAMES)
def test_method_trains_the_student_never_the_teacher(name, scene_batch, detectors):
    teacher, _ = detectors
    torch.manual_seed(1)
    student = create("gfl_student", width=16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = distill.Distiller(student, None if name == "lgd" else teacher, losses={"gfl_loss": 1.0, name: 2.0})
    d.prepare(scene_batch)
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=0.01)
    for _ in range(2):
        out = d(scene_batch)
        assert math.isfinite(out.parts[name].item())
        opt.zero_grad()
        out.total.backward()
        opt.step()
    # the method's loss alone reaches the student
    opt.zero_grad()
    out = d(scene_batch)
    d.methods[name](out.student, out.teacher or {}, scene_batch).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    if name != "rank_mimicking":  # zero when teacher and student rank every candidate alike (checked below)
        assert grads, f"{name}: no gradient reached the student"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"{name} changed the teacher's {k}"
    d.detach_taps()


def test_flatten_levels_follows_the_detectors_point_order(scene_batch, detectors):
    from distill.taps import Taps

    teacher, _ = detectors
    paths = ["cls_out.0", "cls_out.1", "reg_out.0", "reg_out.1"]
    taps = Taps(teacher, paths)
    with taps.recording() as store, torch.no_grad():
        out = teacher(scene_batch.inputs)
    taps.remove()
    assert torch.equal(DF.flatten_levels([store["cls_out.0"], store["cls_out.1"]]), out["logits"])
    assert torch.equal(DF.flatten_levels([store["reg_out.0"], store["reg_out.1"]], group=4), out["box_dist"])
    x = torch.arange(2 * 6 * 2 * 3.0).reshape(2, 6, 2, 3)  # channel g*3 + d is entry d of group g
    flat = DF.flatten_levels([x], group=2)
    assert flat.shape == (2, 6, 2, 3) and flat[1, 4, 1, 2].item() == x[1, 5, 1, 1].item()


def test_rank_mimicking_on_the_detector_equals_the_loop_over_assigned_candidates(scene_batch, detectors):
    from distill.models.detection import assign_targets, grid_points

    teacher, _ = detectors
    torch.manual_seed(2)
    student = create("gfl_student", width=16)
    m = create_method("rank_mimicking", tau=0.5)
    m.bind_models(student, teacher, scene_batch)
    zs, zt = rand(27, 4, 80, 10, scale=2.0), rand(28, 4, 80, 10, scale=2.0)
    got = m({"logits": zs}, {"logits": zt}, scene_batch).item()
    pts, strs = grid_points((64, 64), (8, 16))
    a = assign_targets(pts, strs, scene_batch.boxes, scene_batch.labels, 10, anchor_scale=4.0)
    total, count = 0.0, 0
    for b in range(len(scene_batch)):
        for g in range(len(scene_batch.boxes[b])):
            idx = (a.gt_index[b] == g).nonzero().flatten().tolist()
            if not idx:
                continue
            c = int(scene_batch.labels[b][g])
            pt = softmax(sigmoid(zt[b, idx, c].numpy()) / 0.5)
            ps = softmax(sigmoid(zs[b, idx, c].numpy()) / 0.5)
            total += (pt * np.log(pt / ps)).sum()
            count += 1
    assert count > 0 and got == pytest.approx(total / count, rel=1e-9)


def test_ld_on_the_detector_uses_the_positive_points(scene_batch, detectors):
    from distill.models.detection import assign_targets, grid_points

    teacher, student = detectors
    m = create_method("ld", tau=2.0, weighting="none")
    m.bind_models(student, teacher, scene_batch)
    s, t = rand(21, 4, 80, 4, 9).float(), rand(22, 4, 80, 4, 9).float()
    got = m({"logits": torch.zeros(4, 80, 10), "box_dist": s}, {"box_dist": t}, scene_batch).item()
    pts, strs = grid_points((64, 64), (8, 16))
    a = assign_targets(pts, strs, scene_batch.boxes, scene_batch.labels, 10, anchor_scale=4.0)
    bi, pi = a.positive.nonzero(as_tuple=True)
    pt, ps = softmax(t[bi, pi].numpy() / 2.0), softmax(s[bi, pi].numpy() / 2.0)
    want = 4.0 * (pt * np.log(pt / ps)).sum(axis=(1, 2)).mean()
    assert len(bi) > 0 and got == pytest.approx(want, rel=1e-5)


def test_fgd_method_uses_box_masks_on_each_level(scene_batch):
    m = create_method("fgd", temperature=0.7, alpha=2.0, beta=3.0, gamma=0.5, lam=0.1)
    s = {"fpn_out.0": rand(23, 4, 8, 8, 8).float(), "fpn_out.1": rand(24, 4, 8, 4, 4).float()}
    t = {"fpn_out.0": rand(25, 4, 8, 8, 8).float(), "fpn_out.1": rand(26, 4, 8, 4, 4).float()}
    m.prepare(s, t, scene_batch)
    parts = m.parts(s, t, scene_batch)
    want_fg = want_bg = 0.0
    for level, stride in ((0, 8.0), (1, 16.0)):
        ss, tt = s[f"fpn_out.{level}"].numpy(), t[f"fpn_out.{level}"].numpy()
        h = ss.shape[-1]
        for b, boxes in enumerate(scene_batch.boxes):
            centres = (np.arange(h) + 0.5) * stride
            scale = np.zeros((h, h))
            for x1, y1, x2, y2 in boxes.numpy():
                cells = ((centres[:, None] >= y1) & (centres[:, None] <= y2)) & ((centres[None] >= x1) & (centres[None] <= x2))
                if cells.sum():
                    scale = np.maximum(scale, cells / cells.sum())
            bgm = (scale == 0) / max(1, (scale == 0).sum())
            sa = h * h * softmax(np.abs(tt[b]).mean(0).reshape(-1) / 0.7).reshape(h, h)
            ca = 8 * softmax(np.abs(tt[b]).mean(axis=(1, 2)) / 0.7)
            d = (tt[b] - ss[b]) ** 2 * sa[None] * ca[:, None, None]
            want_fg += 2.0 * (d * scale[None]).sum() / 4
            want_bg += 3.0 * (d * bgm[None]).sum() / 4
    assert parts["fg"].item() == pytest.approx(want_fg, rel=1e-4)
    assert parts["bg"].item() == pytest.approx(want_bg, rel=1e-4)
    # the GcBlock starts as the identity: the global term is λ Σ (T - S)² / B at initialisation
    want_gl = sum(0.1 * ((t[k] - s[k]) ** 2).sum().item() / 4 for k in s)
    assert parts["global"].item() == pytest.approx(want_gl, rel=1e-5)


def test_bad_inputs_raise_clear_errors(scene_batch, detectors):
    teacher, student = detectors
    with pytest.raises(ValueError, match="levels"):
        create_method("fgd", levels=())
    with pytest.raises(ValueError, match="tau"):
        create_method("ld", tau=0.0)
    m = create_method("ld")
    m.bind_models(student, teacher, scene_batch)
    with pytest.raises(ValueError, match="DenseBatch"):
        m({"box_dist": torch.zeros(4, 80, 4, 9), "logits": torch.zeros(4, 80, 10)}, {"box_dist": torch.zeros(4, 80, 4, 9)},
          distill.batch.Batch(scene_batch.inputs))
    with pytest.raises(ValueError, match="reg_max"):
        m({"box_dist": torch.zeros(4, 80, 4, 9), "logits": torch.zeros(4, 80, 10)}, {"box_dist": torch.zeros(4, 80, 4, 17)},
          scene_batch)
    with pytest.raises(TypeError, match="strides"):
        create_method("rank_mimicking").bind_models(torch.nn.Linear(2, 2), None, scene_batch)
    five = create("gfl_student", num_classes=5)
    with pytest.raises(ValueError, match="teacher.s have 5"):  # before any training step
        distill.Distiller(create("gfl_student"), five, losses={"gfl_loss": 1.0, "adl": 1.0}).prepare(scene_batch)
