"""Segmentation distillation (issue 14, part M1): SKD (pixel, pair-wise, holistic), Knowledge Adaptation,
IFVD, CIRKD, Graph Flow, and CWD / MGD on dense maps.

Every formula is checked against numbers worked out here with numpy and plain loops (never by
calling the code under test twice); methods are checked to run, to send gradients only where they
should, and to train a few steps on real-pixel scenes (scikit-learn digits, embedded).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from distill import Distiller, fit_hint_stage
from distill import functional as DF
from distill.batch import DenseBatch
from distill.methods import create_method, method_info
from distill.methods.dense_seg import CIRKD, SKDHolistic, GraphFlow, KnowledgeAdaptation

torch.set_num_threads(1)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_cos(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    return float(a @ b / ((np.linalg.norm(a) + eps) * (np.linalg.norm(b) + eps)))


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------------------------- SKD


def test_seg_pixel_kd_loss_matches_a_loop() -> None:
    r = _rng(1)
    s, t = r.normal(size=(2, 3, 2, 3)) * 2, r.normal(size=(2, 3, 2, 3)) * 2
    tau = 2.5
    total = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(3):
                ps, pt = _np_softmax(s[b, :, i, j] / tau, 0), _np_softmax(t[b, :, i, j] / tau, 0)
                total += float((pt * np.log(pt / ps)).sum())
    expected = tau * tau * total / (2 * 2 * 3)
    assert DF.seg_pixel_kd_loss(_t(s), _t(t), tau).item() == pytest.approx(expected, rel=1e-10)


def _np_pool(f: np.ndarray, k: int) -> np.ndarray:
    b, c, h, w = f.shape
    oh, ow = math.ceil(h / k), math.ceil(w / k)
    out = np.empty((b, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = f[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].max(axis=(2, 3))
    return out


def _np_affinity(f: np.ndarray) -> np.ndarray:
    b, c, h, w = f.shape
    v = f.reshape(b, c, h * w)
    a = np.empty((b, h * w, h * w))
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                a[n, i, j] = _np_cos(v[n, :, i], v[n, :, j])
    return a


@pytest.mark.parametrize("size,scale,k", [(6, 0.5, 3), (8, 0.25, 2), (5, 0.1, 1)])
def test_skd_pairwise_loss_matches_a_loop(size: int, scale: float, k: int) -> None:
    r = _rng(2)
    s, t = r.normal(size=(2, 3, size, size)), r.normal(size=(2, 5, size, size))  # channels differ
    a_s, a_t = _np_affinity(_np_pool(s, k)), _np_affinity(_np_pool(t, k))
    n = a_s.shape[-1]
    expected = ((a_s - a_t) ** 2).sum() / (n * n) / 2
    assert DF.skd_pairwise_loss(_t(s), _t(t), scale).item() == pytest.approx(expected, rel=1e-9)


def test_wgan_terms_closed_forms() -> None:
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -0.5])
    assert DF.wgan_critic_loss(real, fake).item() == pytest.approx(0.0 - 2.0)
    assert DF.wgan_generator_loss(fake).item() == pytest.approx(0.0)
    # a linear critic D(x) = <w, x> has gradient w everywhere: GP = (||w|| - 1)^2
    w = torch.tensor([[[0.3, -1.2], [2.0, 0.1]]])
    x_r, x_f = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    gp = DF.wgan_gradient_penalty(lambda x: (x * w).flatten(1).sum(1), x_r, x_f, torch.rand(4))
    assert gp.item() == pytest.approx((math.sqrt(0.09 + 1.44 + 4.0 + 0.01) - 1) ** 2, rel=1e-6)
    # D(x) = sum x^2: gradient 2 x_hat with x_hat = a real + (1 - a) fake
    a = torch.tensor([0.0, 0.25, 1.0, 0.5])
    gp = DF.wgan_gradient_penalty(lambda x: x.pow(2).flatten(1).sum(1), x_r, x_f, a)
    xh = a.view(4, 1, 1, 1) * x_r + (1 - a.view(4, 1, 1, 1)) * x_f
    expected = np.mean([(2 * float(xh[b].norm()) - 1) ** 2 for b in range(4)])
    assert gp.item() == pytest.approx(expected, rel=1e-5)


def _views(s_map: torch.Tensor, t_map: torch.Tensor, key: str = "logits") -> tuple[dict, dict]:
    return {"logits": s_map, key: s_map}, {"logits": t_map, key: t_map}


def test_skd_holistic_gradients_split_between_student_and_critic() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16)
    s = torch.randn(3, 4, 8, 8, requires_grad=True)
    t = torch.randn(3, 4, 8, 8)
    batch = DenseBatch(inputs=x)
    m = SKDHolistic(critic_scale=0.25, gp_weight=2.0, critic_dim=4)
    sv, tv = _views(s, t)
    m.prepare(sv, tv, batch)
    m.critic.eval()  # spectral norm without power iterations: every call sees the same normalised weights
    loss = m(sv, tv, batch)
    loss.backward()
    g_student = s.grad.clone()
    g_critic = [p.grad.clone() for p in m.critic.parameters()]
    # the student's gradient is that of -mean D(softmax(s), x) alone ...
    s2 = s.detach().clone().requires_grad_(True)
    cond = F.adaptive_avg_pool2d(x, (8, 8))
    (-m.critic(torch.cat([torch.softmax(s2, 1), cond], 1)).mean()).backward()
    assert torch.allclose(g_student, s2.grad, atol=1e-6)
    # ... and the critic's is critic_scale times that of its own objective (with the same alpha)
    m.critic.zero_grad()
    gen = torch.Generator().manual_seed(0)
    alpha = torch.rand(3, generator=gen)
    ps, pt = torch.softmax(s.detach(), 1), torch.softmax(t, 1)
    d = lambda z: m.critic(torch.cat([z, cond], 1))  # noqa: E731
    xh = (alpha.view(3, 1, 1, 1) * pt + (1 - alpha.view(3, 1, 1, 1)) * ps).requires_grad_(True)
    (gr,) = torch.autograd.grad(d(xh).sum(), xh, create_graph=True)
    gp = ((gr.flatten(1).norm(dim=1) - 1) ** 2).mean()
    (0.25 * (d(ps).mean() - d(pt).mean() + 2.0 * gp)).backward()
    for a, b in zip(g_critic, m.critic.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-6)
    assert loss.item() == pytest.approx((0.25 * (d(ps).mean() - d(pt).mean() + 2.0 * gp)).item(), rel=1e-5)


# ------------------------------------------------------------------------------ Knowledge Adaptation


def test_ka_losses_match_loops() -> None:
    r = _rng(3)
    a, z = r.normal(size=(2, 3, 2, 2)), r.normal(size=(2, 3, 2, 2))
    for p in (2.0, 1.0, 3.0):
        per = []
        for b in range(2):
            u, v = a[b].ravel() / np.linalg.norm(a[b]), z[b].ravel() / np.linalg.norm(z[b])
            per.append((np.abs(u - v) ** p).sum() ** (1 / p))
        assert DF.ka_adaptation_loss(_t(a), _t(z), p).item() == pytest.approx(np.mean(per), rel=1e-9)
    s, t = r.normal(size=(2, 4, 3, 2)), r.normal(size=(2, 2, 3, 2))
    expected = ((_np_affinity(s) - _np_affinity(t)) ** 2).mean()
    assert DF.ka_affinity_loss(_t(s), _t(t)).item() == pytest.approx(expected, rel=1e-9)


def test_feature_reconstruction_loss() -> None:
    a, b = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[0.0, 4.0]]]])
    assert DF.feature_reconstruction_loss(a, b).item() == pytest.approx((1 + 4) / 2)


# ------------------------------------------------------------------------------ IFVD


def _np_ifv(f: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    b, c, h, w = f.shape
    out = np.ones((b, h, w))
    for n in range(b):
        for cls in range(k):
            pix = [(i, j) for i in range(h) for j in range(w) if y[n, i, j] == cls]
            if not pix:
                continue
            proto = np.mean([f[n, :, i, j] for i, j in pix], axis=0)
            for i, j in pix:
                out[n, i, j] = _np_cos(f[n, :, i, j], proto)
    return out


def test_ifvd_matches_a_loop() -> None:
    r = _rng(4)
    s, t = r.normal(size=(2, 3, 3, 4)), r.normal(size=(2, 5, 3, 4))
    y = r.integers(0, 3, size=(2, 3, 4))
    y[0, 0, :2] = 255
    m_s, m_t = _np_ifv(s, y, 3), _np_ifv(t, y, 3)
    valid = y != 255
    expected = ((m_s - m_t)[valid] ** 2).mean()
    got = DF.ifvd_loss(_t(s), _t(t), torch.tensor(y), 3)
    assert got.item() == pytest.approx(expected, rel=1e-6)  # the loop's cosine puts eps on each norm
    assert np.allclose(DF.ifvd_variation_map(_t(s), torch.tensor(y), 3).numpy()[valid], m_s[valid])


def test_ifvd_method_resizes_labels_and_reads_classes_from_teacher_logits() -> None:
    r = _rng(5)
    s, t = r.normal(size=(2, 3, 2, 2)), r.normal(size=(2, 4, 2, 2))
    y = np.array([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 1, 1]]] * 2)
    y_small = y[:, ::2, ::2]
    m = create_method("ifvd", weight=3.0)
    assert m.weight == 3.0 and method_info("ifvd").defaults["weight"] == 200.0
    sv = {"logits": torch.zeros(2, 3, 2, 2), "feat": _t(s)}
    tv = {"logits": torch.zeros(2, 3, 2, 2), "feat": _t(t)}
    got = m(sv, tv, DenseBatch(inputs=torch.zeros(2, 1, 4, 4), targets=torch.tensor(y)))
    expected = ((_np_ifv(s, y_small, 3) - _np_ifv(t, y_small, 3)) ** 2).mean()
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------ CIRKD


def test_cirkd_minibatch_pixel_loss_matches_a_loop() -> None:
    r = _rng(6)
    s, t = r.normal(size=(3, 2, 2, 2)), r.normal(size=(3, 4, 2, 2))
    tau = 0.3

    def emb(f: np.ndarray) -> np.ndarray:
        v = f.reshape(f.shape[0], f.shape[1], -1).transpose(0, 2, 1)
        return v / np.linalg.norm(v, axis=2, keepdims=True)

    es, et = emb(s), emb(t)
    total = 0.0
    for i in range(3):
        for j in range(3):
            ps, pt = _np_softmax(es[i] @ es[j].T / tau, 1), _np_softmax(et[i] @ et[j].T / tau, 1)
            total += (pt * np.log(pt / ps)).sum() / es.shape[1]
    expected = total / 9
    assert DF.cirkd_minibatch_pixel_loss(_t(s), _t(t), tau).item() == pytest.approx(expected, rel=1e-9)


def test_cirkd_memory_loss_matches_a_loop() -> None:
    r = _rng(7)
    s, t, q = r.normal(size=(5, 3)), r.normal(size=(5, 3)), r.normal(size=(7, 3))
    tau, kd = 0.2, 2.0
    total = 0.0
    for m in range(5):
        ps, pt = _np_softmax(s[m] @ q.T / (tau * kd), 0), _np_softmax(t[m] @ q.T / (tau * kd), 0)
        total += (pt * np.log(pt / ps)).sum()
    expected = kd * kd * total / 5
    assert DF.cirkd_memory_loss(_t(s), _t(t), _t(q), tau, kd).item() == pytest.approx(expected, rel=1e-9)


def test_cirkd_banks_enqueue_regions_and_pixels() -> None:
    m = CIRKD(num_classes=3, pixel_memory_size=5, region_memory_size=2, pixel_contrast_size=2,
              region_contrast_size=1, pixel_update_freq=2)
    sv = {"logits": torch.zeros(1, 3, 2, 2), "feat": torch.randn(1, 2, 2, 2)}
    # channel 0 / channel 1 at positions (0,0) (0,1) (1,0) (1,1): pixels (3,0), (0,1), (0,2), (0,5)
    t = torch.tensor([[[[3.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [2.0, 5.0]]]])  # (1, 2, 2, 2)
    tv = {"logits": torch.zeros(1, 3, 2, 2), "feat": t}
    y = torch.tensor([[[0, 1], [0, 255]]])
    batch = DenseBatch(inputs=torch.zeros(1, 1, 2, 2), targets=y)
    m.prepare(sv, tv, batch)
    before = m.region_queue.clone()
    emb = F.normalize(t, dim=1)
    m.enqueue(emb, y)
    # class 0: unit pixels (1,0) and (0,1): region = normalised mean (1,1)/sqrt2; class 1: (0,1); class 2 absent
    r2 = 1 / math.sqrt(2)
    assert torch.allclose(m.region_queue[0, 0], torch.tensor([r2, r2]))
    assert torch.allclose(m.region_queue[1, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(m.region_queue[2], before[2]) and m.region_ptr.tolist() == [1, 1, 0]
    assert m.pixel_ptr.tolist() == [2, 1, 0]
    assert sorted(map(tuple, m.pixel_queue[0, :2].tolist())) == [(0.0, 1.0), (1.0, 0.0)]
    m.enqueue(emb, y)
    m.enqueue(emb, y)  # class 0 wraps: 4 + 2 >= 5 -> the last two rows, pointer back to 0
    assert m.pixel_ptr.tolist()[0] == 0
    assert sorted(map(tuple, m.pixel_queue[0, -2:].tolist())) == [(0.0, 1.0), (1.0, 0.0)]
    assert m.region_ptr.tolist() == [1, 1, 0]  # region banks of 2 wrapped after two pushes


# ------------------------------------------------------------------------------ Graph Flow


def test_graph_flow_losses_match_loops() -> None:
    r = _rng(8)
    s = [r.normal(size=(2, 3, 4, 4)), r.normal(size=(2, 2, 2, 2))]
    t = [r.normal(size=(2, 3, 4, 4)), r.normal(size=(2, 2, 2, 2))]

    def vert(f: np.ndarray) -> np.ndarray:
        v = f.mean(axis=(2, 3))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def edges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # 4x4 -> 2x2 by 2x2 averages
        out = np.empty((2, 3, 2))
        for n in range(2):
            for c in range(3):
                for d in range(2):
                    out[n, c, d] = _np_cos(a[n, c].ravel(), b[n, d].ravel())
        return out

    v_exp = np.mean([((vert(x) - vert(y)) ** 2).sum(axis=1).mean() for x, y in zip(s, t)])
    e_exp = ((edges(*s) - edges(*t)) ** 2).mean()
    v, e = DF.graph_flow_losses([_t(x) for x in s], [_t(x) for x in t])
    assert v.item() == pytest.approx(v_exp, rel=1e-9) and e.item() == pytest.approx(e_exp, rel=1e-7)


# ------------------------------------------------------------------------------ CWD / MGD on dense maps


def test_cwd_on_segmentation_logits_matches_a_loop() -> None:
    r = _rng(9)
    s, t = r.normal(size=(2, 3, 2, 3)), r.normal(size=(2, 3, 2, 3))
    tau = 3.0
    total = 0.0
    for b in range(2):
        for c in range(3):
            ps, pt = _np_softmax(s[b, c].ravel() / tau, 0), _np_softmax(t[b, c].ravel() / tau, 0)
            total += (pt * np.log(pt / ps)).sum()
    expected = tau * tau * total / (2 * 3)
    m = create_method("cwd", pairs=[("logits_map", "logits_map")], tau=tau)
    sv, tv = _views(_t(s), _t(t), "logits_map")
    m.prepare(sv, tv, DenseBatch(inputs=torch.zeros(2, 1, 8, 12)))
    assert m(sv, tv, DenseBatch(inputs=torch.zeros(2, 1, 8, 12))).item() == pytest.approx(expected, rel=1e-9)


def test_mgd_on_feature_maps_with_other_widths() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    m = create_method("mgd", student_tap="feat", teacher_tap="feat", alpha=0.5, mask_ratio=0.4, seed=3)
    sv, tv = _views(s, t, "feat")
    batch = DenseBatch(inputs=torch.zeros(2, 1, 12, 12))
    m.prepare(sv, tv, batch)
    m.eval()  # eval: the mask is drawn from a fresh generator seeded with `seed`
    keep = (torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(3)) >= 0.4).float()
    gen = m.generation(m.align(s) * keep)
    expected = 0.5 * float(((gen - t) ** 2).sum().detach()) / 2
    assert m(sv, tv, batch).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ invariants


_maps = st.integers(0, 10_000).map(lambda seed: torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)))


@settings(max_examples=15, deadline=None)
@given(_maps, _maps)
def test_losses_are_zero_on_equal_maps_and_nonnegative(a: torch.Tensor, b: torch.Tensor) -> None:
    y = (a[:, 0] > 0).long()
    for f in (lambda s, t: DF.seg_pixel_kd_loss(s, t, 2.0), lambda s, t: DF.skd_pairwise_loss(s, t, 0.5),
              lambda s, t: DF.ka_affinity_loss(s, t), lambda s, t: DF.ka_adaptation_loss(s, t),
              lambda s, t: DF.ifvd_loss(s, t, y, 2), lambda s, t: DF.cirkd_minibatch_pixel_loss(s, t, 0.1),
              lambda s, t: sum(DF.graph_flow_losses([s, s[:, :2]], [t, t[:, :2]]))):
        assert f(a, a).abs().item() < 1e-5
        assert f(a, b).item() >= -1e-6
    assert DF.cirkd_memory_loss(a.flatten(1), a.flatten(1), b.flatten(1)).abs().item() < 1e-5


def test_shape_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="equal shapes"):
        DF.seg_pixel_kd_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="H x W"):
        DF.skd_pairwise_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        DF.ifvd_variation_map(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 7), 2)
    with pytest.raises(ValueError, match="at least two layers"):
        GraphFlow(pairs=[("feat", "feat")])
    with pytest.raises(ValueError, match="semantic masks"):
        create_method("ifvd")({"logits": torch.zeros(1, 2, 2, 2), "feat": torch.zeros(1, 2, 2, 2)},
                              {"logits": torch.zeros(1, 2, 2, 2), "feat": torch.zeros(1, 2, 2, 2)},
                              DenseBatch(inputs=torch.zeros(1, 1, 2, 2)))


# ------------------------------------------------------------------------------ on the segmenter and real scenes


@pytest.fixture(scope="module")
def scenes():
    from distill.data.scenes import make_scenes

    return make_scenes("digits", "train", n_scenes=8, canvas=32, objects=(1, 2), scale=(0.6, 0.9), seed=0)


_SMALL_CIRKD = dict(pixel_memory_size=64, region_memory_size=8, pixel_contrast_size=16, region_contrast_size=4)


@pytest.mark.parametrize("name,kwargs", [
    ("skd_pixel", {}), ("skd_pairwise", {}), ("skd_holistic", {"critic_dim": 8}),
    ("knowledge_adaptation", {}), ("ifvd", {}), ("cirkd", _SMALL_CIRKD), ("graph_flow", {}),
    ("cwd", {"pairs": [("logits_map", "logits_map")]}), ("mgd", {"student_tap": "feat", "teacher_tap": "feat"}),
])
def test_methods_train_a_segmentation_student_on_scenes(scenes, name: str, kwargs: dict) -> None:
    from distill.models.segmentation import seg_student, seg_teacher

    torch.manual_seed(0)
    teacher, student = seg_teacher(), seg_student()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = next(iter(scenes.loader(4)))
    method = create_method(name, **kwargs)
    d = Distiller(student, teacher, losses={"seg_ce": 1.0, name: method})
    d.prepare(batch)
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=0.05)
    first = None
    for _ in range(4):
        out = d(batch)
        assert torch.isfinite(out.total)
        first = first if first is not None else float(out.parts[name])
        out.total.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        opt.step()
        opt.zero_grad()
        d.step_end()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    if name not in ("skd_holistic", "mgd", "cirkd"):  # adversarial / random masks / random draws: not monotone
        assert float(d(batch).parts[name]) < first


def test_autoencoder_stages_pretrain_then_freeze(scenes) -> None:
    from distill.models.segmentation import seg_student, seg_teacher

    torch.manual_seed(0)
    loader = scenes.loader(4)
    for method, stage in ((KnowledgeAdaptation(), "ka_autoencoder"), (GraphFlow(), "graph_flow_paraphraser")):
        d = Distiller(seg_student(), seg_teacher(), losses={"seg_ce": 1.0, method.name: method})
        d.prepare(next(iter(loader)))
        before = [p.detach().clone() for p in method.autoencoders.parameters()]
        stage_loss = method.stage_method(stage)
        batch = next(iter(loader))
        tv = d.teacher(batch)
        start = float(stage_loss({}, tv, batch))
        fit_hint_stage(d, loader, method=stage, epochs=3, lr=0.01, progress=False)
        assert float(stage_loss({}, d.teacher(batch), batch)) < start  # the reconstruction improved
        assert any(not torch.equal(a, b) for a, b in zip(before, method.autoencoders.parameters()))
        assert all(not p.requires_grad for p in method.autoencoders.parameters())  # frozen for distillation
        d.set_epoch(0)  # as fit does: the epoch start also drops the stage's last gradients
        out = d(batch)
        out.total.backward()
        assert all(p.grad is None for p in method.autoencoders.parameters())


# ------------------------------------------------------------------------------ methods combine their terms as documented


def test_method_weights_combine_terms() -> None:
    torch.manual_seed(1)
    s_feat, t_feat = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)
    s_logits, t_logits = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 8, 8))
    batch = DenseBatch(inputs=torch.zeros(2, 1, 8, 8), targets=y)
    sv = {"logits": s_logits, "feat": s_feat, "backbone_out.1": s_feat[:, :2]}
    tv = {"logits": t_logits, "feat": t_feat, "backbone_out.1": t_feat[:, :4]}

    ka = KnowledgeAdaptation(adaptation_weight=7.0, affinity_weight=3.0, p=1.5)
    ka.prepare(sv, tv, batch)
    z = ka.autoencoders[0].encoder(t_feat)
    a = ka.adapter(s_feat)
    expected = 7.0 * DF.ka_adaptation_loss(a, z, 1.5) + 3.0 * DF.ka_affinity_loss(a, z)
    assert ka(sv, tv, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    assert z.shape[1] == 3  # latent width: ceil(6 * 0.5)

    gf = GraphFlow(pairs=[("backbone_out.1", "backbone_out.1"), ("feat", "feat")], vertex_weight=0.3, edge_weight=5.0)
    gf.prepare(sv, tv, batch)
    enc = [gf.autoencoders[0].encoder(t_feat[:, :4]), gf.autoencoders[1].encoder(t_feat)]
    v, e = DF.graph_flow_losses([s_feat[:, :2], s_feat], enc)
    assert gf(sv, tv, batch).item() == pytest.approx((0.3 * v + 5.0 * e).item(), rel=1e-5)

    # CIRKD: with the whole banks drawn the memory terms do not depend on the draw's order
    c = CIRKD(num_classes=3, minibatch_weight=0.7, memory_pixel_weight=0.2, memory_region_weight=0.05, tau=0.2,
              kd_tau=1.5, pixel_memory_size=6, pixel_contrast_size=6, region_memory_size=3, region_contrast_size=3)
    c.prepare(sv, tv, batch)
    c.eval()  # no enqueue
    s_emb = F.normalize(c.projector(s_feat), dim=1).permute(0, 2, 3, 1).reshape(-1, 6)
    t_emb = F.normalize(t_feat, dim=1).permute(0, 2, 3, 1).reshape(-1, 6)
    expected = (0.7 * DF.cirkd_minibatch_pixel_loss(s_feat, t_feat, 0.2)
                + 0.2 * DF.cirkd_memory_loss(s_emb, t_emb, c.pixel_queue.reshape(-1, 6), 0.2, 1.5)
                + 0.05 * DF.cirkd_memory_loss(s_emb, t_emb, c.region_queue.reshape(-1, 6), 0.2, 1.5))
    assert c(sv, tv, batch).item() == pytest.approx(expected.item(), rel=1e-5)

    # SKD pixel resizes a smaller student map to the teacher's grid
    small = torch.randn(2, 3, 2, 2)
    m = create_method("skd_pixel", tau=2.0)
    up = F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False)
    assert m({"logits": small}, {"logits": t_logits}, batch).item() == pytest.approx(
        DF.seg_pixel_kd_loss(up, t_logits, 2.0).item(), rel=1e-6)


def test_cirkd_minibatch_pool_pools_both_maps() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    sv, tv = {"logits": torch.zeros(2, 2, 4, 4), "feat": s}, {"logits": torch.zeros(2, 2, 4, 4), "feat": t}
    batch = DenseBatch(inputs=torch.zeros(2, 1, 4, 4), targets=torch.zeros(2, 4, 4, dtype=torch.long))
    c = CIRKD(minibatch_pool=2, memory_pixel_weight=0.0, memory_region_weight=0.0, tau=0.5,
              pixel_memory_size=4, region_memory_size=2)
    c.prepare(sv, tv, batch)
    pooled = [x.reshape(2, x.shape[1], 2, 2, 2, 2).mean(dim=(3, 5)) for x in (s, t)]  # 2x2 block means
    expected = DF.cirkd_minibatch_pixel_loss(*pooled, 0.5)
    assert c(sv, tv, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_stage_methods_built_alone_own_their_method() -> None:
    ka = create_method("ka_autoencoder")
    assert isinstance(ka.owner, KnowledgeAdaptation) and ka.teacher_taps == ["feat"]
    gf = create_method("graph_flow_paraphraser")
    assert isinstance(gf.owner, GraphFlow) and gf.teacher_taps == ["backbone_out.1", "backbone_out.2", "feat"]
    with pytest.raises(TypeError, match="KnowledgeAdaptation"):
        create_method("ka_autoencoder", owner=GraphFlow())
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 4, 4)
    sv, tv = {"logits": s, "feat": s}, {"logits": t, "feat": t}
    batch = DenseBatch(inputs=torch.zeros(2, 1, 16, 16))
    ka.prepare(sv, tv, batch)  # sizes the owner's auto-encoder and unfreezes it for pre-training
    assert all(p.requires_grad for p in ka.owner.autoencoders.parameters())
    ae = ka.owner.autoencoders[0]
    assert ka(sv, tv, batch).item() == pytest.approx(float(((ae(t) - t) ** 2).mean().detach()), rel=1e-6)
