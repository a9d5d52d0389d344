"""Issue 17 (C): cross-lingual distillation, MSDN and KDDAug: their math on numbers worked out here
(numpy and plain loops), their data builders, and their strategies on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import functional as DF
from distill.data.transfer_x import (
    FASHION_ATTRIBUTES,
    FASHION_UNSEEN,
    build_vocab,
    cipher_translate,
    encode,
    long_tailed_indices,
    package_topics,
    words,
)
from distill.strategies.registry import strategy_info
from distill.strategies.transfer_x_crosslingual import fit_cross_lingual_distill
from distill.strategies.transfer_x_kddaug import augmented_set, compose_pairs, fit_kddaug
from distill.strategies.transfer_x_msdn import MSDNNet, fit_msdn, zero_shot_scores

torch.set_num_threads(1)


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------------------------
# the math
# --------------------------------------------------------------------------------------------


def test_cross_lingual_kd_loss_is_the_soft_cross_entropy_at_T_without_T_squared():
    s = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    t = np.array([[2.0, 0.0, -1.0], [-1.0, 1.0, 4.0]])
    T = 2.5
    want = -(_np_softmax(t / T) * np.log(_np_softmax(s / T))).sum(1).mean()
    got = DF.cross_lingual_kd_loss(torch.tensor(s), torch.tensor(t), temperature=T)
    assert got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        DF.cross_lingual_kd_loss(torch.tensor(s), torch.tensor(t), temperature=0)


def test_msdn_jsd_by_hand_and_score_gap_by_loop():
    a = np.array([[0.5, 1.5, -1.0], [2.0, 0.0, 0.0]])
    b = np.array([[0.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    p, q = _np_softmax(a), _np_softmax(b)
    m = (p + q) / 2
    jsd = ((p * np.log(p / m)).sum(1) / 2 + (q * np.log(q / m)).sum(1) / 2).mean()
    assert DF.msdn_jsd(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(jsd, rel=1e-5)
    gap = 0.0
    for row_a, row_b in zip(a, b):
        d = row_a - row_b
        norm = math.sqrt(sum(v * v for v in d))
        gap += sum(v * v / norm * abs(v) for v in d) if norm > 0 else 0.0
    gap /= len(a)
    assert DF.msdn_score_gap(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(gap, rel=1e-5)
    assert DF.msdn_distill_loss(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(jsd + gap, rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-6, 6), min_size=8, max_size=8), st.lists(st.floats(-6, 6), min_size=8, max_size=8))
def test_msdn_jsd_is_symmetric_bounded_and_zero_on_equal_scores(u, v):
    a, b = torch.tensor(u, dtype=torch.float64).view(2, 4), torch.tensor(v, dtype=torch.float64).view(2, 4)
    j = DF.msdn_jsd(a, b).item()
    assert j == pytest.approx(DF.msdn_jsd(b, a).item(), abs=1e-7)
    assert -1e-7 <= j <= math.log(2) + 1e-7
    assert DF.msdn_jsd(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert DF.msdn_score_gap(a, a + 3.0).item() == pytest.approx(2 * 4 * 27 / math.sqrt(4 * 9) / 2, rel=1e-6)


def test_msdn_self_calibration_by_hand():
    s = np.array([[1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = _np_softmax(s)
    want = -math.log((p[:, [1, 3]].sum(1)).mean())
    got = DF.msdn_self_calibration(torch.tensor(s), torch.tensor([1, 3]))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_kddaug_weights_favour_the_teacher_farther_from_the_bias():
    prior = np.array([0.7, 0.2, 0.1])
    p_id = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    p_ood = np.array([[0.2, 0.4, 0.4], [0.1, 0.1, 0.8]])
    xe_id = -(prior * np.log(p_id)).sum(1)
    xe_ood = -(prior * np.log(p_ood)).sum(1)
    w_id, w_ood = xe_id / (xe_id + xe_ood), xe_ood / (xe_id + xe_ood)
    # the released code's form: s = 1 / XE, w_id = s_ood / (s_id + s_ood)
    s_id, s_ood = 1 / xe_id, 1 / xe_ood
    assert np.allclose(w_id, s_ood / (s_id + s_ood))
    got_id, got_ood = DF.kddaug_teacher_weights(torch.tensor(p_id), torch.tensor(p_ood), torch.tensor(prior))
    assert np.allclose(got_id.numpy(), w_id, rtol=1e-5) and np.allclose(got_ood.numpy(), w_ood, rtol=1e-5)
    assert got_ood[0] > got_id[0]  # sample 0: the ID teacher is the one close to the prior
    soft = DF.kddaug_soft_labels(torch.tensor(p_id), torch.tensor(p_ood), torch.tensor(prior))
    assert np.allclose(soft.numpy(), w_id[:, None] * p_id + w_ood[:, None] * p_ood, rtol=1e-5)
    with pytest.raises(ValueError, match="probabilities"):
        DF.kddaug_teacher_weights(torch.tensor(p_id) * 2, torch.tensor(p_ood), torch.tensor(prior))


def test_logit_adjusted_cross_entropy_by_hand():
    z = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = np.array([2, 0])
    prior = np.array([0.6, 0.3, 0.1])
    tau = 1.5
    adj = _np_softmax(z + tau * np.log(prior))
    want = -np.log(adj[np.arange(2), y]).mean()
    got = DF.logit_adjusted_cross_entropy(torch.tensor(z), torch.tensor(y), torch.tensor(prior), tau=tau)
    assert got.item() == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------------------------
# the data
# --------------------------------------------------------------------------------------------


def test_cipher_translation_is_deterministic_disjoint_and_reordered():
    text = "Return the value of the key. Raise KeyError when the key is missing!"
    a, b = cipher_translate(text, drop_rate=0.0, synonym_rate=0.0), cipher_translate(text, drop_rate=0.0,
                                                                                     synonym_rate=0.0)
    assert a == b
    src, tgt = words(text), a.replace(" . ", " ").split()
    assert len(src) == len(tgt) and not set(src) & set(tgt)
    first = cipher_translate("return the value", drop_rate=0.0, synonym_rate=0.0).split()
    assert first[::-1] == [cipher_translate(w, drop_rate=0.0, synonym_rate=0.0) for w in ("return", "the", "value")]
    dropped = cipher_translate(" ".join(["word"] * 200), drop_rate=0.5).split()
    assert 60 < len(dropped) < 140
    vocab = build_vocab([a, a])
    ids = encode([a], vocab, max_len=5)
    assert ids.shape == (1, 5) and (ids > 1).all()


def test_package_topics_and_long_tail():
    labels, names = package_topics(["json", "os", "json", "re", "os", "json"], 2)
    assert names == ["json", "os"] and labels == [0, 1, 0, -1, 1, 0]
    y = torch.arange(4).repeat_interleave(50)
    idx = long_tailed_indices(y, max_per_class=40, imbalance=8, seed=0, order=[2, 0, 1, 3])
    counts = torch.bincount(y[idx], minlength=4).tolist()
    assert counts == [round(40 * 8 ** (-1 / 3)), round(40 * 8 ** (-2 / 3)), 40, 5]


def test_fashion_attributes_make_each_unseen_class_learnable_and_distinct():
    a = FASHION_ATTRIBUTES
    seen = [c for c in range(10) if c not in FASHION_UNSEEN]
    assert a.shape == (10, 14) and len({tuple(r.tolist()) for r in a}) == 10
    for u in FASHION_UNSEEN:  # every attribute of an unseen class is carried by some seen class
        assert (a[seen][:, a[u] > 0].sum(0) > 0).all()


# --------------------------------------------------------------------------------------------
# the strategies
# --------------------------------------------------------------------------------------------


class _Bag(nn.Module):
    def __init__(self, vocab: int, k: int) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, 16)
        self.pool = nn.Identity()
        self.fc = nn.Linear(16, k)

    def forward(self, ids):
        return self.fc(self.pool(self.emb(ids)))


def _parallel(n=96, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    src = y[:, None] * 4 + torch.randint(0, 4, (n, 6), generator=g)  # class-specific source words
    tgt = 20 + (src * 7) % 12  # a one-to-one "translation" of each word
    return src, tgt, y


def test_cross_lingual_student_learns_the_teachers_labels_through_the_parallel_corpus():
    src, tgt, y = _parallel()
    torch.manual_seed(0)
    teacher = _Bag(12, 3)
    res = fit_cross_lingual_distill(lambda: _Bag(40, 3), (src, tgt), [(tgt, y)], teacher_model=teacher,
                                    source_labelled=(src, y), epochs=12, progress=False, lr=0.05, batch_size=16,
                                    temperature=2.0)
    teacher_acc = (res.teacher_logits.argmax(1) == y).float().mean().item() * 100
    assert teacher_acc > 90 and res.last_acc > 90 and res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    adv = fit_cross_lingual_distill(lambda: _Bag(40, 3), (src, tgt), None, teacher=teacher, epochs=1,
                                    adversarial=True, target_unlabelled=tgt[:10], grl_lambda=0.5,
                                    discriminator_hidden=8, discriminator_steps=2, progress=False, batch_size=32)
    assert "domain_loss" in adv.history[0]
    with pytest.raises(ValueError, match="pair row by row"):
        fit_cross_lingual_distill(_Bag(40, 3), (src, tgt[:5]), teacher=teacher, epochs=1, progress=False)
    with pytest.raises(ValueError, match="target_unlabelled"):
        fit_cross_lingual_distill(_Bag(40, 3), (src, tgt), teacher=teacher, epochs=1, adversarial=True,
                                  progress=False)
    assert strategy_info("cross_lingual_distill").paper.arxiv == "1705.02073"


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def test_msdn_sub_nets_follow_their_formulas():
    torch.manual_seed(0)
    att = torch.rand(5, 4)
    net = MSDNNet(_conv(), att, channels=6, dim=3)
    for p in (net.W2, net.W1v, net.W2v):
        nn.init.normal_(p)
    x = torch.randn(2, 1, 4, 4)
    s1, s2 = net.sub_scores(x)
    f = net.backbone(x).flatten(2)
    f = f / f.norm(dim=1, keepdim=True)
    z = att / att.norm(dim=1, keepdim=True)
    V, W1, W2, W1v, W2v = (t.detach() for t in (net.V, net.W1, net.W2, net.W1v, net.W2v))
    for b in range(2):
        F_b = f[b]  # (C, R)
        S = V @ W1 @ F_b  # (A, R)
        alpha = torch.softmax(V @ W2 @ F_b, dim=1)
        psi1 = (alpha * S).sum(1)
        S2 = (F_b.T @ W1v @ V.T).T  # (A, R)
        beta = torch.softmax(V @ W2v @ F_b, dim=0)
        psi2 = (beta * S2).sum(1)
        assert torch.allclose(s1[b], psi1 @ z.T, atol=1e-5) and torch.allclose(s2[b], psi2 @ z.T, atol=1e-5)
    assert torch.allclose(net(x), 0.9 * s1 + 0.1 * s2, atol=1e-6)


def test_msdn_trains_on_seen_classes_and_scores_zsl_and_gzsl():
    torch.manual_seed(0)
    att = FASHION_ATTRIBUTES
    seen = torch.tensor([c for c in range(10) if c not in FASHION_UNSEEN])
    y = seen.repeat(4)
    x = torch.randn(len(y), 1, 8, 8) + y.view(-1, 1, 1, 1) * 0.1
    ux, uy = torch.randn(6, 1, 8, 8), torch.tensor(FASHION_UNSEEN).repeat(2)
    res = fit_msdn(_conv, (x, y), (x, y, ux, uy), attributes=att, unseen=FASHION_UNSEEN, channels=6, epochs=2,
                   progress=False, lambda_distill=0.5, batch_size=14)
    assert set(res.scores) == {"zsl", "seen", "unseen", "h"} and res.last_acc == res.scores["h"]
    scores = zero_shot_scores(res.model, x, y, ux, uy, FASHION_UNSEEN)
    assert scores == pytest.approx(res.scores)
    with pytest.raises(ValueError, match="unseen classes"):
        fit_msdn(_conv, (ux, uy), None, attributes=att, unseen=FASHION_UNSEEN, channels=6, epochs=1, progress=False)


def test_msdn_distillation_term_changes_training():
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 4, 5]).repeat(3)
    x = torch.randn(len(y), 1, 8, 8)

    def run(weight):
        torch.manual_seed(1)
        r = fit_msdn(_conv, (x, y), None, attributes=FASHION_ATTRIBUTES, unseen=FASHION_UNSEEN, channels=6,
                     epochs=4, progress=False, lambda_distill=weight, batch_size=12, lr=0.01, optimizer="adam")
        return r.model.sub_scores(x)

    (a0, b0), (a1, b1) = run(0.0), run(5.0)
    assert DF.msdn_jsd(a1, b1) < DF.msdn_jsd(a0, b0)


class _Fixed(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_kddaug_composed_samples_get_the_weighted_teachers_labels():
    torch.manual_seed(0)
    x, y = torch.randn(10, 1, 2, 2), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    mixed, heur = compose_pairs(x, y, 3, 7, alpha=0.5, seed=3)
    assert mixed.shape == (7, 1, 2, 2) and torch.allclose(heur.sum(1), torch.ones(7))
    assert ((heur > 0).sum(1) <= 2).all()
    t_id, t_ood = _Fixed(torch.randn(4, 3)), _Fixed(torch.randn(4, 3))
    prior = torch.tensor([0.6, 0.2, 0.2])
    xa, soft = augmented_set(x, y, t_id, t_ood, num_classes=3, prior=prior, n=7, alpha=0.5, seed=3)
    assert torch.equal(xa, mixed)
    with torch.no_grad():
        p_id, p_ood = t_id(xa).softmax(1).numpy(), t_ood(xa).softmax(1).numpy()
    xe_id, xe_ood = -(prior.numpy() * np.log(p_id)).sum(1), -(prior.numpy() * np.log(p_ood)).sum(1)
    want = (xe_id[:, None] * p_id + xe_ood[:, None] * p_ood) / (xe_id + xe_ood)[:, None]
    assert np.allclose(soft.numpy(), want, rtol=1e-5)
    _, h = augmented_set(x, y, t_id, t_ood, num_classes=3, prior=prior, labels="heuristic", n=7, alpha=0.5, seed=3)
    assert torch.equal(h, heur)


def test_kddaug_trains_teachers_and_student():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 2, 2)
    y = (x.flatten(1)[:, 0] > 0.5).long() + (x.flatten(1)[:, 1] > 1.0).long()
    res = fit_kddaug(lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (x, y), [(x, y)], epochs=2,
                     teacher_epochs=1, progress=False, batch_size=8, lr=0.05)
    assert res.num_augmented == 40 and res.last_acc is not None and res.id_teacher_acc is not None
    with pytest.raises(ValueError, match="labels"):
        fit_kddaug(nn.Linear(4, 3), (x, y), epochs=1, labels="mixup", progress=False)
    with pytest.raises(ValueError, match="resume"):
        fit_kddaug(nn.Linear(4, 3), (x, y), epochs=1, progress=False, resume=True)
    assert strategy_info("kddaug").paper.arxiv == "2207.08739" and strategy_info("msdn").paper.arxiv == "2203.03137"


def test_given_teachers_are_left_unchanged():
    torch.manual_seed(0)
    x = torch.randn(24, 1, 2, 2)
    y = torch.arange(3).repeat(8)

    def bn_net():
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))

    t_id, t_ood = bn_net().train(), bn_net().train()
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in (t_id, t_ood)]
    fit_kddaug(bn_net, (x, y), None, teacher=t_id, ood_teacher=t_ood, epochs=1, progress=False, batch_size=8)
    for t, b in zip((t_id, t_ood), before):
        assert all(torch.equal(v, b[k]) for k, v in t.state_dict().items())
    src, tgt, yy = _parallel(n=32)
    teacher = _Bag(12, 3)
    b = {k: v.clone() for k, v in teacher.state_dict().items()}
    fit_cross_lingual_distill(lambda: _Bag(40, 3), (src, tgt), None, teacher=teacher, epochs=1, progress=False,
                              adversarial=True, target_unlabelled=tgt, discriminator_hidden=4, batch_size=16)
    assert all(torch.equal(v, b[k]) for k, v in teacher.state_dict().items())


def test_kddaug_student_learns_original_labels_and_the_composed_samples_soft_labels(monkeypatch):
    import distill.strategies.transfer_x_kddaug as mod

    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 2, 2), torch.tensor([0] * 8 + [1] * 2 + [2] * 2)
    t_id, t_ood = _Fixed(torch.randn(4, 3)), _Fixed(torch.randn(4, 3))
    seen = {}
    real = mod.train_in_memory

    def spy(model, inputs, targets, loss_fn, **kw):
        seen.update(inputs=inputs, targets=targets, loss_fn=loss_fn)
        return real(model, inputs, targets, loss_fn, **kw)

    monkeypatch.setattr(mod, "train_in_memory", spy)
    fit_kddaug(lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (x, y), None, teacher=t_id, ood_teacher=t_ood,
               epochs=1, progress=False, batch_size=4, augment_ratio=0.5, mix_alpha=0.7, seed=5)
    prior = torch.tensor([8 / 12, 2 / 12, 2 / 12])
    xa, soft = augmented_set(x, y, t_id, t_ood, num_classes=3, prior=prior, n=6, alpha=0.7, seed=5)
    assert torch.equal(seen["inputs"], torch.cat([x, xa]))
    assert torch.allclose(seen["targets"], torch.cat([nn.functional.one_hot(y, 3).float(), soft]), atol=1e-6)
    z, q = torch.randn(5, 3), torch.softmax(torch.randn(5, 3), 1)
    assert seen["loss_fn"](z, q).item() == pytest.approx(-(q * torch.log_softmax(z, 1)).sum(1).mean().item(), rel=1e-6)


def test_msdn_objective_is_both_sub_nets_ce_and_calibration_plus_weighted_distillation(monkeypatch):
    import distill.strategies.transfer_x_msdn as mod

    seen = {}
    real = mod.train_in_memory

    def spy(model, inputs, targets, loss_fn, **kw):
        seen["loss_fn"] = loss_fn
        return real(model, inputs, targets, loss_fn, **kw)

    monkeypatch.setattr(mod, "train_in_memory", spy)
    y = torch.tensor([0, 1, 4, 5])
    fit_msdn(_conv, (torch.randn(4, 1, 4, 4), y), None, attributes=FASHION_ATTRIBUTES, unseen=FASHION_UNSEEN,
             channels=6, epochs=1, progress=False, lambda_cal=0.3, lambda_distill=0.7)
    s1, s2 = torch.randn(4, 10), torch.randn(4, 10)
    p1, p2 = s1.softmax(1), s2.softmax(1)
    u = list(FASHION_UNSEEN)

    def part(s, p):
        return nn.functional.cross_entropy(s, y) - 0.3 * torch.log(p[:, u].sum(1).mean())

    m = (p1 + p2) / 2
    jsd = ((p1 * (p1 / m).log()).sum(1) / 2 + (p2 * (p2 / m).log()).sum(1) / 2).mean()
    d = s1 - s2
    gap = (d.abs() ** 3 / d.norm(dim=1, keepdim=True)).sum(1).mean()
    want = part(s1, p1) + part(s2, p2) + 0.7 * (jsd + gap)
    assert seen["loss_fn"]((s1, s2), y).item() == pytest.approx(want.item(), rel=1e-5)
