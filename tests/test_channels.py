"""CWD, MGD, SimKD and SemCKD.

Each loss against an independent computation (numpy, explicit loops), its properties (zero at
agreement, non-negative), the methods on synthetic views (gradients reach the student and the
method's parts, never the teacher) and end to end through the Distiller and ``fit``.
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
from distill.adapters import ShapeMismatchError
from distill.methods import CWD, MGD, SemCKD, SimKD, create_method, list_methods, method_info
from distill.models import create
from _views import CNN_PAIRS, cnn_views, prepare_and_snapshot, prepare_checked, tiny_loader

SETTINGS = settings(max_examples=25, deadline=None)
NEW = ("cwd", "mgd", "simkd", "semckd")
seeds = st.integers(0, 10_000)


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------- registry


def test_registered_with_paper_family_and_defaults():
    assert set(NEW) <= {i.name for i in list_methods("features")}
    arxiv = {"cwd": "2011.13256", "mgd": "2205.01529", "simkd": "2203.14001", "semckd": "2012.03236"}
    years = {"cwd": 2021, "mgd": 2022, "simkd": 2022, "semckd": 2021}
    for name in NEW:
        info = method_info(name)
        assert info.family == "features" and info.paper.arxiv == arxiv[name] and info.paper.year == years[name]
        assert info.paper.venue and info.paper.authors and info.summary
    assert method_info("cwd").defaults["tau"] == 4.0
    assert method_info("cwd").defaults["pairs"] == (("stage3", "stage3"),)
    d = method_info("mgd").defaults
    assert (d["alpha"], d["mask_ratio"], d["mask"]) == (7e-5, 0.5, "spatial")
    assert method_info("simkd").defaults["factor"] == 2
    assert method_info("simkd").defaults["teacher_classifier"] is None
    d = method_info("semckd").defaults
    assert d["beta"] == 400.0 and d["student_taps"] == ("stage1", "stage2", "stage3") == d["teacher_taps"]


# ---------------------------------------------------------------------------- CWD


def np_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    b, c = s.shape[:2]
    total = 0.0
    for i in range(b):
        for k in range(c):
            xs, xt = s[i, k].ravel() / tau, t[i, k].ravel() / tau
            ps = [math.exp(v) / sum(math.exp(u) for u in xs) for v in xs]
            pt = [math.exp(v) / sum(math.exp(u) for u in xt) for v in xt]
            total += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    return total * tau * tau / (b * c)


def test_cwd_matches_loops():
    s, t = rand(1, 2, 3, 2, 3), rand(2, 2, 3, 2, 3, scale=2.0)
    for tau in (1.0, 4.0, 0.5):
        assert DF.cwd_loss(s, t, tau).item() == pytest.approx(np_cwd(s.numpy(), t.numpy(), tau), rel=1e-10)


@SETTINGS
@given(seeds, st.integers(1, 4), st.integers(1, 4), st.floats(0.5, 8.0))
def test_cwd_zero_at_agreement_nonnegative_and_shift_invariant(seed, b, c, tau):
    s, t = rand(seed, b, c, 3, 2), rand(seed + 1, b, c, 3, 2)
    assert DF.cwd_loss(t, t.clone(), tau).item() == pytest.approx(0.0, abs=1e-12)
    loss = DF.cwd_loss(s, t, tau).item()
    assert loss >= -1e-12
    # a per-channel constant does not change a channel's spatial softmax
    shift = rand(seed + 2, b, c, 1, 1)
    assert DF.cwd_loss(s + shift, t, tau).item() == pytest.approx(loss, rel=1e-9, abs=1e-12)


def test_cwd_rejects_unequal_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        DF.cwd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))


# ---------------------------------------------------------------------------- MGD


def test_mgd_mask_ratio_reproducible_and_shared_over_channels():
    m1 = DF.mgd_mask(64, 8, 8, 0.65, torch.Generator().manual_seed(3))
    m2 = DF.mgd_mask(64, 8, 8, 0.65, torch.Generator().manual_seed(3))
    assert m1.shape == (64, 1, 8, 8) and torch.equal(m1, m2)
    assert set(m1.unique().tolist()) <= {0.0, 1.0}
    assert (1 - m1.mean().item()) == pytest.approx(0.65, abs=0.03)  # fraction masked ≈ λ
    assert DF.mgd_mask(2, 3, 3, 0.0).min().item() == 1.0
    assert DF.mgd_mask(2, 3, 3, 1.0).max().item() == 0.0
    with pytest.raises(ValueError):
        DF.mgd_mask(2, 3, 3, 1.5)


def test_mgd_channel_mask_masks_whole_channels_per_sample():
    m1 = DF.mgd_channel_mask(64, 32, 0.15, torch.Generator().manual_seed(3))
    assert m1.shape == (64, 32, 1, 1)
    assert torch.equal(m1, DF.mgd_channel_mask(64, 32, 0.15, torch.Generator().manual_seed(3)))
    assert set(m1.unique().tolist()) <= {0.0, 1.0}
    assert (1 - m1.mean().item()) == pytest.approx(0.15, abs=0.03)  # fraction of channels masked ≈ λ
    # broadcast on a map, a masked channel is zero at every position, a kept one untouched
    x = torch.rand(64, 32, 3, 3) + 1.0
    y = x * m1
    for b, c in ((0, 0), (5, 7), (63, 31)):
        if m1[b, c, 0, 0] == 0:
            assert y[b, c].abs().max().item() == 0.0
        else:
            assert torch.equal(y[b, c], x[b, c])
    with pytest.raises(ValueError, match="ratio"):
        DF.mgd_channel_mask(2, 3, -0.1)


def test_mgd_loss_matches_loops_and_properties():
    g, t = rand(3, 3, 2, 2, 3), rand(4, 3, 2, 2, 3)
    gn, tn = g.numpy(), t.numpy()
    want = sum((tn[b, k, i, j] - gn[b, k, i, j]) ** 2 for b in range(3) for k in range(2) for i in range(2)
               for j in range(3)) / 3
    assert DF.mgd_loss(g, t).item() == pytest.approx(want, rel=1e-12)
    assert DF.mgd_loss(t, t.clone()).item() == 0.0


# ---------------------------------------------------------------------------- SimKD


def test_simkd_loss_matches_loops_both_reductions():
    p, t = rand(5, 2, 3, 2, 2), rand(6, 2, 3, 2, 2)
    sq = sum(float(v) ** 2 for v in (p - t).numpy().ravel())
    assert DF.simkd_loss(p, t).item() == pytest.approx(sq / p.numel(), rel=1e-12)
    assert DF.simkd_loss(p, t, "sum").item() == pytest.approx(sq / 2, rel=1e-12)
    assert DF.simkd_loss(t, t.clone()).item() == 0.0
    with pytest.raises(ValueError):
        DF.simkd_loss(p, t, "none")


# ---------------------------------------------------------------------------- SemCKD


def test_semckd_similarity_attention_and_loss_match_loops():
    f = rand(7, 3, 2, 2, 2)
    fn = f.numpy().reshape(3, -1)
    sim = DF.semckd_similarity(f).numpy()
    for i in range(3):
        for j in range(3):
            assert sim[i, j] == pytest.approx(sum(fn[i, n] * fn[j, n] for n in range(fn.shape[1])), rel=1e-12)

    b, s_len, t_len, d = 3, 2, 3, 4
    q, k = rand(8, b, s_len, d), rand(9, b, t_len, d)
    att = DF.semckd_attention(q, k)
    qn, kn = q.numpy(), k.numpy()
    for bb in range(b):
        for s in range(s_len):
            e = [math.exp(float(np.dot(qn[bb, s], kn[bb, t]))) for t in range(t_len)]
            for t in range(t_len):
                assert att[bb, s, t].item() == pytest.approx(e[t] / sum(e), rel=1e-12)

    shapes = [(2, 2, 2), (4, 1, 1), (3, 2, 1)]  # teacher layer t: (C, H, W)
    proj = [[rand(10 + 3 * s + t, b, *shapes[t]) for t in range(t_len)] for s in range(s_len)]
    targ = [[rand(40 + 3 * s + t, b, *shapes[t]) for t in range(t_len)] for s in range(s_len)]
    total = 0.0
    for bb in range(b):
        for s in range(s_len):
            for t in range(t_len):
                diff = (proj[s][t][bb] - targ[s][t][bb]).numpy().ravel()
                total += att[bb, s, t].item() * sum(float(v) ** 2 for v in diff) / diff.size
    want = total / (b * s_len)
    assert DF.semckd_loss(proj, targ, att).item() == pytest.approx(want, rel=1e-10)


@SETTINGS
@given(seeds, st.integers(1, 4))
def test_semckd_zero_at_agreement_nonnegative_and_attention_rows_are_distributions(seed, b):
    q, k = rand(seed, b, 2, 3), rand(seed + 1, b, 3, 3)
    att = DF.semckd_attention(q, k)
    assert torch.allclose(att.sum(-1), torch.ones(b, 2, dtype=att.dtype))
    targ = [[rand(seed + 2 + t, b, 2, 2, 2) for t in range(3)] for _ in range(2)]
    proj = [[x.clone() for x in row] for row in targ]
    assert DF.semckd_loss(proj, targ, att).item() == 0.0
    proj = [[rand(seed + 9 + t, b, 2, 2, 2) for t in range(3)] for _ in range(2)]
    assert DF.semckd_loss(proj, targ, att).item() >= 0.0


# ---------------------------------------------------------------------------- methods on synthetic views

B = 6


def make_views(seed: int = 0):
    return cnn_views(B, seed)


@pytest.mark.parametrize("name", NEW)
def test_method_forward_gradients_reach_student_and_parts_never_teacher(name):
    student, teacher, batch = make_views()
    m = create_method(name)
    params = prepare_checked(m, student, teacher, batch)
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    for key in m.student_taps:
        g = student[key].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (name, key)
    for key, t in teacher.items():
        assert t.grad is None, (name, key)
    assert student["logits"].grad is None
    assert params, name  # channel counts differ in these views: every method has trainable parts
    for pname, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)


def test_cwd_method_matches_functional_identity_for_equal_channels_and_sums_pairs():
    student, teacher, batch = make_views(1)
    m = CWD(pairs=[("stage3", "stage3"), ("stage2", "stage2")], tau=2.0)
    m.prepare(student, teacher, batch)
    assert all(isinstance(a, torch.nn.Conv2d) and a.kernel_size == (1, 1) for a in m.align)
    want = DF.cwd_loss(m.align[0](student["stage3"]), teacher["stage3"], 2.0) + \
        DF.cwd_loss(m.align[1](student["stage2"]), teacher["stage2"], 2.0)
    assert torch.allclose(m(student, teacher, batch), want)
    same = CWD()
    t = {k: v.detach() for k, v in teacher.items()}
    same.prepare(t, t, batch)
    assert isinstance(same.align[0], torch.nn.Identity)
    assert same(t, t, batch).item() == pytest.approx(0.0, abs=1e-7)
    # a 4x4 student map against a 2x2 teacher map: the aligner also resamples (stride-2 conv)
    down = CWD(pairs=[("stage2", "stage3")])
    down.prepare(student, teacher, batch)
    assert down.align[0].stride == (2, 2) and down.align[0](student["stage2"]).shape == teacher["stage3"].shape
    odd = dict(student, stage2=torch.randn(B, 6, 3, 3))  # 3x3 -> 4x4: no integer factor
    with pytest.raises(ShapeMismatchError, match="spatial"):
        CWD(pairs=[("stage2", "stage2")]).prepare(odd, teacher, batch)


def test_mgd_method_matches_functional_with_a_fixed_mask_and_draws_fresh_masks_only_in_training():
    student, teacher, batch = make_views(2)
    m = MGD(seed=5, mask_ratio=0.5, alpha=3e-3)  # a non-default scale: a dropped alpha would show
    m.prepare(student, teacher, batch)
    assert isinstance(m.align, torch.nn.Conv2d)
    convs = [x for x in m.generation if isinstance(x, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)] and isinstance(m.generation[1], torch.nn.ReLU)
    s, t = student["stage3"], teacher["stage3"]
    mask = DF.mgd_mask(B, 2, 2, 0.5, torch.Generator().manual_seed(5))
    want = 3e-3 * DF.mgd_loss(m.generation(m.align(s) * mask), t)
    assert torch.allclose(m(student, teacher, batch), want)  # the first training draw of seed 5
    assert not torch.equal(m.draw_mask(t), mask)  # the generator advanced
    m.eval()
    e1, e2 = m.draw_mask(t), m.draw_mask(t)
    assert torch.equal(e1, e2) and torch.equal(e1, mask)  # eval: reproducible, training sequence untouched
    assert torch.allclose(m(student, teacher, batch), want)
    # alpha scales the loss; with mask ratio 0 and a generator reproducing the teacher the loss is 0
    m2 = MGD(alpha=7e-5, mask_ratio=0.0)
    tt = {k: v.detach() for k, v in teacher.items()}
    m2.prepare(tt, tt, batch)
    assert isinstance(m2.align, torch.nn.Identity)
    with torch.no_grad():
        for conv in (m2.generation[0], m2.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[range(16), range(16), 1, 1] = 1.0  # identity 3x3 kernels
    tt["stage3"] = tt["stage3"].relu()  # the ReLU between the convs keeps non-negative maps
    assert m2(tt, tt, batch).item() == pytest.approx(0.0, abs=1e-10)


def test_mgd_channel_mask_option_matches_functional():
    student, teacher, batch = make_views(2)
    m = MGD(seed=7, mask_ratio=0.15, mask="channel", alpha=0.02)
    m.prepare(student, teacher, batch)
    s, t = student["stage3"], teacher["stage3"]
    mask = DF.mgd_channel_mask(B, t.shape[1], 0.15, torch.Generator().manual_seed(7))
    want = 0.02 * DF.mgd_loss(m.generation(m.align(s) * mask), t)
    assert torch.allclose(m(student, teacher, batch), want)
    assert "mask=channel" in repr(m)
    with pytest.raises(ValueError, match="mask"):
        MGD(mask="pixel")


def test_simkd_projector_loss_and_classifier_checks():
    student, teacher, batch = make_views(3)
    m = SimKD()
    m.prepare(student, teacher, batch)
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    assert [c.out_channels for c in m.projector if isinstance(c, torch.nn.Conv2d)] == [8, 8, 16]
    assert torch.allclose(m(student, teacher, batch), DF.simkd_loss(m.projector(student["stage3"]), teacher["stage3"]))
    with pytest.raises(ValueError, match="teacher's classifier"):
        m.student_predictor(torch.nn.Identity())
    with pytest.raises(ShapeMismatchError, match="12 features"):
        m.student_predictor(torch.nn.Identity(), torch.nn.Linear(12, 10))
    fc = torch.nn.Linear(16, 10)
    m.set_teacher_classifier(fc)
    assert m.teacher_classifier is fc and not any(p is q for p in m.parameters() for q in fc.parameters())
    # the student's larger map is pooled to the teacher's size before the projector
    pooled = SimKD(student_tap="stage2")
    pooled.prepare(student, teacher, batch)
    want = DF.simkd_loss(pooled.projector(torch.nn.functional.avg_pool2d(student["stage2"], 2)), teacher["stage3"])
    assert torch.allclose(pooled(student, teacher, batch), want)


def test_simkd_predictor_uses_projector_and_frozen_teacher_classifier():
    torch.manual_seed(0)
    student, teacher = create("cnn", widths=(4, 8, 8)), create("cnn", widths=(8, 16, 16))
    m = SimKD(teacher_classifier=teacher.fc)
    d = distill.Distiller(student, teacher, losses={"simkd": m})
    x = torch.randn(4, 1, 8, 8)
    d.prepare((x, torch.zeros(4, dtype=torch.long)))
    pred = m.student_predictor(student).eval()
    feats: dict[str, torch.Tensor] = {}
    h = student.stage3.register_forward_hook(lambda mod, i, o: feats.__setitem__("f", o))
    with torch.no_grad():
        out = pred(x)
        want = teacher.fc(m.projector(feats["f"]).mean(dim=(2, 3)))
    h.remove()
    assert out.shape == (4, 10) and torch.allclose(out, want, atol=1e-6)
    assert all(not p.requires_grad for p in pred.classifier.parameters())
    assert pred.classifier is d.teacher.model.fc


def test_semckd_method_matches_functional_pads_small_batches_and_pooled_embedding():
    student, teacher, batch = make_views(4)
    m = SemCKD(beta=7.0)  # a non-default scale: a dropped beta would show
    m.prepare(student, teacher, batch)
    assert sorted(m.proj) == [f"{i}_{j}" for i in range(3) for j in range(3)]
    assert m.query[0].linear1.in_features == B and m.query[0].linear2.out_features == max(1, B // 4)
    fs = [student[k] for k in ("stage1", "stage2", "stage3")]
    ft = [teacher[k] for k in ("stage1", "stage2", "stage3")]
    projected, targets = [], []
    pool = torch.nn.functional.adaptive_avg_pool2d
    for i, s in enumerate(fs):
        row_p, row_t = [], []
        for j, t in enumerate(ft):
            if s.shape[-1] > t.shape[-1]:
                row_p.append(m.proj[f"{i}_{j}"](pool(s, t.shape[-2:])))
                row_t.append(t)
            else:
                row_p.append(m.proj[f"{i}_{j}"](s))
                row_t.append(pool(t, s.shape[-2:]))
        projected.append(row_p)
        targets.append(row_t)
    att = m.attention(fs, ft)
    assert att.shape == (B, 3, 3)
    assert torch.allclose(m(student, teacher, batch), 7.0 * DF.semckd_loss(projected, targets, att), rtol=1e-5)
    # a smaller last batch: similarity rows zero-padded to the prepared width; a larger one is refused
    small_s = {k: v[:4] for k, v in student.items()}
    small_t = {k: v[:4] for k, v in teacher.items()}
    assert torch.isfinite(m(small_s, small_t, batch))
    big = {k: torch.cat([v, v]) for k, v in student.items()}
    with pytest.raises(ShapeMismatchError, match="batches of 6"):
        m(big, {k: torch.cat([v, v]) for k, v in teacher.items()}, batch)
    pooled = SemCKD(embedding="pooled", embed_dim=5)
    pooled.prepare(student, teacher, batch)
    assert pooled.query[2].linear1.in_features == 8 and pooled.key[2].linear1.in_features == 16
    assert torch.isfinite(pooled(big, {k: torch.cat([v, v]) for k, v in teacher.items()}, batch))
    with pytest.raises(ValueError, match="embedding"):
        SemCKD(embedding="mean")


# ---------------------------------------------------------------------------- end to end

PAIRS = CNN_PAIRS


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("name", NEW)
def test_end_to_end_fit_through_the_distiller(name, pair, tmp_path):
    torch.manual_seed(0)
    student, teacher = PAIRS[pair]()
    teacher_params = [p.detach().clone() for p in teacher.parameters()]
    kw = {"teacher_classifier": teacher.fc} if name == "simkd" else {}
    method = create_method(name, **kw)
    losses = {name: method} if name == "simkd" else {"ce": 1.0, name: method}  # SimKD trains with its loss alone
    d = distill.Distiller(student, teacher, losses=losses)
    x, y, loader = tiny_loader()
    method_params, before = prepare_and_snapshot(d, method, loader)
    res = distill.fit(d, loader, loader, epochs=2, lr=0.01, schedule="constant", run_dir=tmp_path, progress=False)
    assert len(res.history) == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, method_params))  # the method's parts trained
    assert all(torch.equal(a, p) for a, p in zip(teacher_params, teacher.parameters()))  # teacher frozen
    d.eval()
    out = d((x[:4], y[:4]))
    assert torch.isfinite(out.parts[name]) and out.parts[name].item() >= 0
    if name == "simkd":
        pred = method.student_predictor(d.student).eval()
        with torch.no_grad():
            assert torch.isfinite(pred(x[:4])).all() and pred(x[:4]).shape == (4, 10)
