"""Issue 17 (G): DDL (Huang et al., ECCV 2020, arXiv 2002.03662) and the identity-verification data module,
against numbers worked out in numpy and plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import functional as DF
from distill.batch import Batch
from distill.data.face_verification import cluster_identities, degrade, verification_metrics, verification_pairs
from distill.methods import create_method


def np_hist(v, centers, sigma):
    h = np.array([sum(math.exp(-((x - c) ** 2) / (2 * sigma * sigma)) for x in v) for c in centers])
    return h / h.sum()


def np_kl(p, q):
    return float(sum((a + 1e-9) * (math.log(a + 1e-9) - math.log(b + 1e-9)) for a, b in zip(p, q)))


def np_pairs(e, ids):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    pos, neg = [], []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            if ids[i] == ids[j]:
                pos.append(float(e[i] @ e[j]))
        others = [float(e[i] @ e[j]) for j in range(len(e)) if ids[j] != ids[i]]
        if others:
            neg.append(max(others))
    return pos, neg


def np_ddl(sp, sn, tp, tn, wp, wn, wo, centers, sigma):
    kl = wp * np_kl(np_hist(tp, centers, sigma), np_hist(sp, centers, sigma)) + wn * np_kl(
        np_hist(tn, centers, sigma), np_hist(sn, centers, sigma))
    order = sum(np.mean(n) - np.mean(p) for n in (tn, sn) for p in (tp, sp))
    return kl + wo * order


def test_soft_histogram_matches_a_hand_kernel():
    # values 0.2, 0.7; centres 0, 0.5, 1; sigma 0.3: unnormalised bins exp(-d^2 / 0.18) summed over values
    h = DF.soft_histogram(torch.tensor([0.2, 0.7], dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 0.3)
    raw = [math.exp(-0.04 / 0.18) + math.exp(-0.49 / 0.18), math.exp(-0.09 / 0.18) + math.exp(-0.04 / 0.18),
           math.exp(-0.64 / 0.18) + math.exp(-0.09 / 0.18)]
    assert h.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)


def test_pair_similarities_take_every_positive_and_each_hardest_negative():
    e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.2]], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 2])
    pos, neg = DF.ddl_pair_similarities(e * torch.tensor([[2.0], [1.0], [3.0], [1.0], [0.5]], dtype=torch.float64), ids)
    # positives: (0,1) -> 0.8, (2,3) -> 0.8; hardest negatives: 0 -> 0.6 (with 3), 1 -> max(0.6, 0.96) = 0.96, ...
    assert sorted(pos.tolist()) == pytest.approx([0.8, 0.8])
    ref_pos, ref_neg = np_pairs(e.numpy(), ids.tolist())
    assert neg.tolist() == pytest.approx(ref_neg)
    assert neg[1].item() == pytest.approx(0.96)
    with pytest.raises(ValueError, match="positive pair"):
        DF.ddl_pair_similarities(e[:3], torch.tensor([0, 1, 2]))


def test_ddl_loss_against_numpy_with_non_default_weights():
    g = torch.Generator().manual_seed(0)
    sp, sn = torch.rand(5, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64) * 0.5
    tp, tn = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) * 0.5
    centers = torch.linspace(0, 1, 11, dtype=torch.float64)
    got = DF.ddl_loss(sp, sn, tp, tn, pos_kl_weight=0.7, neg_kl_weight=0.3, order_weight=1.3, centers=centers,
                      sigma=0.15)
    ref = np_ddl(sp.numpy(), sn.numpy(), tp.numpy(), tn.numpy(), 0.7, 0.3, 1.3, centers.numpy(), 0.15)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_ddl_method_reads_taps_and_targets_and_matches_numpy_on_the_default_bins():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(8, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.tensor([3, 3, 1, 1, 1, 4, 4, 2])
    m = create_method("ddl", pos_kl_weight=0.4, neg_kl_weight=0.05, order_weight=0.8, sigma=0.2)
    loss = m({"pool": s, "logits": s}, {"pool": t}, Batch(torch.zeros(8, 1), ids))
    sp, sn = np_pairs(s.detach().numpy(), ids.tolist())
    tp, tn = np_pairs(t.detach().numpy(), ids.tolist())
    ref = np_ddl(sp, sn, tp, tn, 0.4, 0.05, 0.8, np.arange(0, 1.0, 0.001)[:1000], 0.2)
    assert loss.item() == pytest.approx(ref, rel=1e-8)
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None  # the teacher's tap gets no gradient


@settings(max_examples=20, deadline=None)
@given(st.floats(0.2, 5.0), st.integers(0, 1000))
def test_ddl_is_invariant_to_the_scale_of_the_embeddings(scale, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = Batch(torch.zeros(6, 1), torch.tensor([0, 0, 1, 1, 2, 2]))
    m = create_method("ddl", order_weight=0.3)
    assert m({"pool": s * scale}, {"pool": t}, b).item() == pytest.approx(m({"pool": s}, {"pool": t}, b).item(), rel=1e-9)


def test_ddl_kl_vanishes_when_the_student_matches_the_teacher():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = Batch(torch.zeros(6, 1), torch.tensor([0, 0, 1, 1, 2, 2]))
    loss = create_method("ddl", order_weight=0.0)({"pool": e}, {"pool": e.clone()}, b)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_verification_metrics_by_hand():
    sim = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.1, 0.25, 0.75, 0.05])
    same = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    m = verification_metrics(sim, same, fars=(0.2,), folds=2)
    # negatives 0.6, 0.1, 0.25, 0.75, 0.05: the 0.8 quantile (linear) is 0.6 + 0.2 * 0.15 = 0.63; positives above it: 0.9, 0.8
    assert m["tar@far=0.2"] == pytest.approx(200 / 3)
    # fold 0 = pairs 0,2,4,6; fold 1 = 1,3,5,7; each fold's threshold is the best midpoint on the other fold
    accs = []
    for k in range(2):
        test = np.arange(8) % 2 == k
        s, y = sim.numpy().astype(np.float64), same.numpy()
        u = sorted(set(s[~test].tolist()))
        cands = [u[0] - 1] + [(a + b) / 2 for a, b in zip(u, u[1:])] + [u[-1] + 1]
        best = cands[int(np.argmax([((s[~test] >= c) == y[~test]).mean() for c in cands]))]
        accs.append(((s[test] >= best) == y[test]).mean())
    assert m["accuracy"] == pytest.approx(100 * np.mean(accs))
    # by hand: fold 0's threshold (from fold 1) is 0.7 -> 0.9, 0.1 right, 0.3 rejected, 0.75 accepted: 2 of 4;
    # fold 1's (from fold 0) is 0.2, the first midpoint with 3 of 4 there -> 0.8, 0.05 right, 0.6, 0.25 accepted
    assert m["accuracy"] == pytest.approx(50.0)
    assert verification_metrics(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0], dtype=torch.bool),
                                folds=2)["accuracy"] == 100.0


def test_pairs_identities_and_degradation():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    i, j, same = verification_pairs(ids, 40, seed=3)
    assert same.sum() == 20 and (i != j).all()
    assert ((ids[i] == ids[j]) == same).all()
    x = torch.rand(40, 1, 8, 8)
    y = torch.arange(40) % 2
    got = cluster_identities(x, y, per_class=3)
    assert set((got // 3).tolist()) == {0, 1} and ((got // 3) == y).all()
    d = degrade(x, factor=4, noise=0.0)
    assert torch.allclose(d[:, :, :4, :4], x[:, :, :4, :4].mean((2, 3), keepdim=True).expand(-1, -1, 4, 4))
    with pytest.raises(ValueError, match="num_pairs"):
        verification_pairs(ids, 3)


# ------------------------------------------------------------------ neuron selection (Luo et al., AAAI 2016)


def test_selection_scores_are_mean_absolute_attribute_correlations_and_neuron_correlations():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(50, 4, generator=g, dtype=torch.float64)
    a = (torch.rand(50, 3, generator=g) > 0.5).double()
    d, c = DF.neuron_selection_scores(f, a)
    full = np.corrcoef(np.concatenate([f.numpy(), a.numpy()], 1), rowvar=False)
    assert d.numpy() == pytest.approx(np.abs(full[:4, 4:]).mean(1), rel=1e-10)
    ref_c = np.abs(full[:4, :4])
    np.fill_diagonal(ref_c, 0.0)
    assert c.numpy() == pytest.approx(ref_c, rel=1e-10, abs=1e-12)


def test_selection_drops_a_redundant_copy_when_the_pairwise_term_is_on():
    g = torch.Generator().manual_seed(5)
    attr = (torch.rand(200, 1, generator=g) > 0.5).double()
    informative = attr[:, 0] + 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
    weaker = attr[:, 0] + 1.0 * torch.randn(200, generator=g, dtype=torch.float64)
    f = torch.stack([informative, informative.clone(), weaker, torch.randn(200, generator=g, dtype=torch.float64)], 1)
    assert sorted(DF.select_neurons(f, attr, 2, pairwise_weight=0.0).tolist()) == [0, 1]  # the two best, a copy
    picked = DF.select_neurons(f, attr, 2, pairwise_weight=1.0)
    # the greedy minimisation written as a loop: gain d_i - (2 lambda / k) sum over chosen c_ij
    d, c = DF.neuron_selection_scores(f, attr)
    chosen = []
    for _ in range(2):
        gains = {i: d[i].item() - 2 * 1.0 / 2 * sum(c[i, j].item() for j in chosen) for i in range(4) if i not in chosen}
        chosen.append(max(gains, key=lambda i: (gains[i], -i)))
    assert picked.tolist() == chosen == [0, 2]  # the copy (1) gives way to the weaker, uncorrelated neuron (2)
    assert DF.select_neurons(f, attr, 2, pairwise_weight=6.0).tolist() == [0, 3]  # strongly penalised: the noise one
    with pytest.raises(ValueError, match="k must be"):
        DF.select_neurons(f, attr, 5)


def test_neuron_regression_by_hand_and_through_the_method():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[9.0, 1.0, 0.0], [9.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    # selected neurons [2, 1]: targets (0, 1) and (1, 1); squared errors 1 + 1 = 2 and 1 + 4 = 5; 0.5 * mean = 1.75
    assert DF.neuron_regression_loss(s, t, torch.tensor([2, 1])).item() == pytest.approx(1.75)
    m = create_method("neuron_selection", indices=[2, 1])
    b = Batch(torch.zeros(2, 1))
    m.prepare({"pool": s}, {"pool": t}, b)
    loss = m({"pool": s}, {"pool": t}, b)
    assert isinstance(m.adapter, torch.nn.Identity) and loss.item() == pytest.approx(1.75)
    loss.backward()
    assert t.grad is None and s.grad is not None
    wide = create_method("neuron_selection", indices=[0])
    wide.prepare({"pool": s}, {"pool": t}, b)
    assert isinstance(wide.adapter, torch.nn.Linear) and wide.adapter.out_features == 1
    with pytest.raises(ValueError, match="out of range"):
        create_method("neuron_selection", indices=[7]).prepare({"pool": s}, {"pool": t}, b)
