"""Self-distillation losses (BYOT, MSD, Zipf's LS, Tf-FD, DLB) and their methods.

Each loss against an explicit-loop computation in plain Python floats, the gradients each paper
stops (the deepest classifier's teaching role, stored predictions, salient channels, deeper
layers), the exits built on any model's taps, and the methods' errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.methods import BYOT, DLB, MSD, TfFD, ZipfLS, method_info
from distill.methods.self_distill import ExitHead, ExitPredictor
from distill.models import create
from distill.taps import TapError

SETTINGS = settings(max_examples=25, deadline=None)


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ------------------------------------------------------------------------ plain-float references


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ce(row: list[float], y: int) -> float:
    return -math.log(softmax(row)[y])


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def ref_byot(exits, deepest, y, fexits, fdeep, alpha, lam, T):
    z, yl = deepest.tolist(), y.tolist()
    total = (1 - alpha) * mean([ce(z[b], yl[b]) for b in range(len(yl))])
    for i, e in enumerate(exits):
        e = e.tolist()
        total += (1 - alpha) * mean([ce(e[b], yl[b]) for b in range(len(yl))])
        total += alpha * mean([kl(softmax(z[b], T), softmax(e[b], T)) for b in range(len(yl))])
        if lam:
            f, g = fexits[i].tolist(), fdeep.tolist()
            total += lam * mean([sum((a - c) ** 2 for a, c in zip(f[b], g[b])) for b in range(len(yl))])
    return total


def ref_msd(logits, y, alpha, T):
    zs, yl, n = [z.tolist() for z in logits], y.tolist(), len(logits)
    total = 0.0
    for i in range(n):
        total += (1 - alpha) * mean([ce(zs[i][b], yl[b]) for b in range(len(yl))])
        for j in range(n):
            if j != i:
                total += alpha / (n - 1) * mean([kl(softmax(zs[j][b], T), softmax(zs[i][b], T))
                                                 for b in range(len(yl))])
    return total


# ------------------------------------------------------------------------------------ BYOT / MSD


@pytest.mark.parametrize("lam", [0.0, 0.03])
def test_byot_loss_matches_explicit_sums(lam):
    exits, deepest, y = [rand(1, 4, 5), rand(2, 4, 5, scale=2)], rand(3, 4, 5), torch.tensor([0, 3, 4, 1])
    fexits, fdeep = [rand(4, 4, 6), rand(5, 4, 6)], rand(6, 4, 6)
    got = DF.byot_loss(exits, deepest, y, fexits, fdeep, alpha=0.3, lam=lam, T=3.0)
    assert float(got) == pytest.approx(ref_byot(exits, deepest, y, fexits, fdeep, 0.3, lam, 3.0), rel=1e-10)


def test_byot_deepest_learns_from_labels_only_and_its_feature_gets_no_gradient():
    exits = [rand(1, 3, 4).requires_grad_()]
    deepest, fdeep = rand(2, 3, 4).requires_grad_(), rand(3, 3, 5).requires_grad_()
    fexit = rand(4, 3, 5).requires_grad_()
    y = torch.tensor([1, 0, 3])
    DF.byot_loss(exits, deepest, y, [fexit], fdeep, alpha=0.3, lam=0.5, T=2.0).backward()
    # d/dz of (1 - a) * mean CE = (1 - a) (softmax - onehot) / B, nothing from the KL or the hint
    expected = 0.7 * (torch.softmax(deepest.detach(), 1) - F.one_hot(y, 4)) / 3
    assert torch.allclose(deepest.grad, expected)
    assert fdeep.grad is None or torch.count_nonzero(fdeep.grad) == 0
    assert torch.allclose(fexit.grad, 0.5 * 2 * (fexit.detach() - fdeep.detach()) / 3)
    assert exits[0].grad is not None and torch.count_nonzero(exits[0].grad) > 0


def test_soft_kl_has_no_t_squared_factor():
    s, t = rand(7, 2, 3), rand(8, 2, 3)
    ref = mean([kl(softmax(t.tolist()[b], 4.0), softmax(s.tolist()[b], 4.0)) for b in range(2)])
    assert float(DF.soft_kl(s, t, 4.0)) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("n", [2, 3])
def test_msd_loss_matches_explicit_sums(n):
    logits, y = [rand(10 + i, 3, 4, scale=1.5) for i in range(n)], torch.tensor([2, 0, 1])
    assert float(DF.msd_loss(logits, y, alpha=0.4, T=2.0)) == pytest.approx(ref_msd(logits, y, 0.4, 2.0), rel=1e-10)


def test_msd_each_classifier_gets_only_its_own_terms_gradient():
    logits = [rand(20 + i, 3, 4).requires_grad_() for i in range(3)]
    y = torch.tensor([0, 1, 3])
    DF.msd_loss(logits, y, alpha=0.5, T=3.0).backward()
    for i in range(3):
        z = logits[i].detach().clone().requires_grad_()
        own = 0.5 * F.cross_entropy(z, y) + sum(0.25 * DF.soft_kl(z, logits[j].detach(), 3.0) for j in range(3) if j != i)
        (g,) = torch.autograd.grad(own, z)
        assert torch.allclose(logits[i].grad, g)


def test_msd_and_byot_check_their_inputs():
    with pytest.raises(ValueError, match="at least 2 classifiers"):
        DF.msd_loss([rand(0, 2, 3)], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs exit_features"):
        DF.byot_loss([rand(0, 2, 3)], rand(1, 2, 3), torch.tensor([0, 1]), lam=0.1)
    with pytest.raises(ValueError, match="differ"):
        DF.byot_loss([rand(0, 2, 3)], rand(1, 2, 3), torch.tensor([0, 1]), [rand(2, 2, 4)], rand(3, 2, 5), lam=0.1)


def test_msd_feature_weight_decays_with_a_cosine():
    m = MSD(feature="pool", lam=0.2)
    # (1 + cos(pi e / 4)) / 2 for e = 0..3, worked out by hand: 1, 0.853553, 0.5, 0.146447
    for epoch, factor in [(0, 1.0), (1, 0.8535534), (2, 0.5), (3, 0.1464466)]:
        m.on_epoch_start(epoch, 4)
        assert m.lam == pytest.approx(0.2 * factor, rel=1e-6)
    fixed = MSD(feature="pool", lam=0.2, lam_decay="constant")
    fixed.on_epoch_start(3, 4)
    assert fixed.lam == 0.2
    with pytest.raises(ValueError, match="lam_decay must be 'cosine' or 'constant', got 'linear'"):
        MSD(lam_decay="linear")


# ------------------------------------------------------------------------------------ Zipf's LS


def test_zipf_ranks_by_hand_ties_share_the_smaller_rank():
    assert DF.zipf_ranks(torch.tensor([[4.0, 3, 3, 2, 1], [0.0, 0, 5, 0, 1]])).tolist() == [[1, 2, 2, 4, 5],
                                                                                          [3, 3, 1, 3, 2]]


@SETTINGS
@given(st.lists(st.lists(st.integers(-3, 3), min_size=6, max_size=6), min_size=1, max_size=4))
def test_zipf_ranks_count_the_strictly_larger_scores(rows):
    ranks = DF.zipf_ranks(torch.tensor(rows, dtype=torch.float32)).tolist()
    assert ranks == [[1 + sum(o > v for o in row) for v in row] for row in rows]


def test_dense_class_votes_count_each_locations_argmax():
    dense = torch.zeros(1, 3, 2, 2)
    dense[0, 0, 0, 0] = dense[0, 2, 0, 1] = dense[0, 2, 1, 0] = dense[0, 2, 1, 1] = 1.0
    assert DF.dense_class_votes(dense).tolist() == [[1.0, 0.0, 3.0]]


def test_zipf_targets_by_hand():
    # ranks [1, 2, 2, 4, 5], target 0: weights 1/2, 1/2, 1/4, 1/5 over the four other classes
    pi = DF.zipf_targets(torch.tensor([[1, 2, 2, 4, 5]]), torch.tensor([0]))
    w = [1 / 2, 1 / 2, 1 / 4, 1 / 5]
    assert pi[0].tolist() == pytest.approx([v / sum(w) for v in w])
    pi2 = DF.zipf_targets(torch.tensor([[1, 2, 3]]), torch.tensor([1]), power=2.0)
    assert pi2[0].tolist() == pytest.approx([1 / (1 + 1 / 9), (1 / 9) / (1 + 1 / 9)])


@pytest.mark.parametrize("correct_only", [False, True])
def test_zipf_ls_loss_matches_explicit_sums_and_ranks_carry_no_gradient(correct_only):
    logits, y = rand(30, 4, 5).requires_grad_(), torch.tensor([0, 2, 4, 1])
    ranks = DF.zipf_ranks(rand(31, 4, 5))
    loss = DF.zipf_ls_loss(logits, y, ranks, power=1.0, correct_only=correct_only)
    z, r = logits.tolist(), ranks.tolist()
    per = []
    for b in range(4):
        keep = [k for k in range(5) if k != y[b]]
        w = [1 / r[b][k] for k in keep]
        pi = [v / sum(w) for v in w]
        per.append(kl(pi, softmax([z[b][k] for k in keep])))
    if correct_only:
        mask = [int(max(range(5), key=lambda k: z[b][k]) == y[b]) for b in range(4)]
        ref = sum(p * m for p, m in zip(per, mask)) / max(1, sum(mask))
    else:
        ref = mean(per)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-10)
    loss.backward()
    # the target logit is left to the cross-entropy: no gradient from this term
    assert torch.all(logits.grad[torch.arange(4), y] == 0)


# ---------------------------------------------------------------------------------------- Tf-FD


def test_channel_salience_and_intra_loss_by_explicit_loops():
    f = rand(40, 2, 5, 2, 3).abs().requires_grad_()
    x = f.tolist()
    sal = []
    for c in range(5):
        acc = 0.0
        for b in range(2):
            norm = math.sqrt(sum(x[b][c][i][j] ** 2 for i in range(2) for j in range(3)))
            acc += sum(x[b][c][i][j] / norm for i in range(2) for j in range(3))
        sal.append(acc / (2 * 6))
    assert DF.channel_salience(f).tolist() == pytest.approx(sal)
    order = sorted(range(5), key=lambda c: -sal[c])  # odd C: the least salient channel sits out
    sq = [(x[b][order[2 + i]][h][w] - x[b][order[i]][h][w]) ** 2
          for b in range(2) for i in range(2) for h in range(2) for w in range(3)]
    loss = DF.tffd_intra_loss(f)
    assert float(loss.detach()) == pytest.approx(mean(sq), rel=1e-10)
    loss.backward()
    for c in order[:2] + order[4:]:  # teaching (salient) and idle channels receive no gradient
        assert torch.count_nonzero(f.grad[:, c]) == 0
    assert all(torch.count_nonzero(f.grad[:, c]) > 0 for c in order[2:4])
    assert float(DF.tffd_intra_loss(rand(0, 2, 1, 2, 2))) == 0.0


def test_inter_loss_pools_the_shallow_map_and_stops_the_deep_gradient():
    shallow, deep = rand(41, 2, 3, 4, 4).requires_grad_(), rand(42, 2, 2, 2, 2).requires_grad_()
    s, d = shallow.tolist(), deep.tolist()
    sq = []
    for b in range(2):
        for c in range(2):  # min(C_s, C_d) channels
            for i in range(2):
                for j in range(2):
                    block = [s[b][c][2 * i + u][2 * j + v] for u in range(2) for v in range(2)]
                    sq.append((mean(block) - d[b][c][i][j]) ** 2)
    loss = DF.tffd_inter_loss(shallow, deep)
    assert float(loss.detach()) == pytest.approx(mean(sq), rel=1e-10)
    loss.backward()
    assert deep.grad is None and torch.count_nonzero(shallow.grad[:, 2]) == 0
    with pytest.raises(ValueError, match="feature maps"):
        DF.tffd_inter_loss(rand(0, 2, 3), deep)


# ------------------------------------------------------------------------------------ the exits


def test_exit_heads_fit_maps_tokens_and_vectors():
    for example in (rand(0, 2, 8, 8, 8).float(), rand(1, 2, 5, 12).float(), rand(2, 2, 12).float()):
        feature, logits = ExitHead(example, out_dim=16, num_classes=7, stride=4)(example)
        assert feature.shape == (2, 16) and logits.shape == (2, 7) and bool((feature >= 0).all())


def _prepared(method, model, batch):
    d = distill.Distiller(model, None, {"m": method})
    d.prepare(batch)
    return d


def digits_batch(n: int = 6) -> Batch:
    return Batch(torch.randn(n, 1, 8, 8), torch.arange(n) % 10, torch.arange(n))


@pytest.mark.parametrize("cls", [BYOT, MSD])
def test_exit_methods_train_the_student_and_their_exits_only(cls):
    model, batch = create("cnn", widths=(4, 8, 8)), digits_batch()
    method = cls(exits=["stage1", "stage2"], feature="pool", lam=0.03)
    d = _prepared(method, model, batch)
    assert sorted(method.heads) == ["stage1", "stage2"]
    params = list(d.trainable_parameters())
    assert all(any(p is q for q in params) for p in method.parameters())
    out = d(batch)
    out.total.backward()
    assert all(p.grad is not None for p in method.parameters())
    assert model.stem[0].weight.grad is not None and model.fc.weight.grad is not None
    # the loss is the functional one on the exits' outputs
    feats, logits = method.exit_outputs(out.student)
    deep_f = out.student["pool"]
    ref = (DF.byot_loss(logits, out.student["logits"], batch.targets, feats, deep_f, 0.3, 0.03, 3.0) if cls is BYOT
           else DF.msd_loss([*logits, out.student["logits"]], batch.targets, feats, deep_f, 0.3, 0.03, 3.0))
    assert torch.allclose(out.total, ref)


def test_byot_exits_on_an_mlp_and_the_exit_and_ensemble_predictors():
    model, batch = create("mlp_digits_student"), digits_batch()
    method = BYOT(exits=["hidden1.pre"], feature="pool", predict="hidden1.pre")
    d = _prepared(method, model, batch)
    predictor = d.predictor()
    assert isinstance(predictor, ExitPredictor)
    d.eval()
    with torch.no_grad():
        view = d(batch).student
        assert torch.allclose(predictor(batch.inputs), method.exit_outputs(view)[1][0])
        method.predict = "ensemble"
        method._predictor_cache[1].mode = "ensemble"
        both = torch.stack([method.exit_outputs(view)[1][0], view["logits"]]).mean(0)
        assert torch.allclose(d.predictor()(batch.inputs), both)
    # the method's state (its exits) is saved and loaded with the Distiller
    assert any(k.startswith("m.heads.hidden1_pre") for k in d.trainable_state_dict()["methods"])


def test_exit_methods_refuse_bad_arguments_before_training():
    with pytest.raises(ValueError, match="non-empty list of tap paths"):
        BYOT(exits=[])
    with pytest.raises(ValueError, match="non-empty list"):
        BYOT(exits="stage1")
    with pytest.raises(ValueError, match="needs feature="):
        BYOT(feature=None, lam=0.1)
    with pytest.raises(ValueError, match="alpha must be"):
        MSD(alpha=1.5)
    with pytest.raises(ValueError, match="T must be"):
        BYOT(T=0)
    with pytest.raises(ValueError, match="predict must be"):
        BYOT(predict="stage9")
    with pytest.raises(TapError, match="stage9"):
        distill.Distiller(create("cnn", widths=(4, 8, 8)), None, {"byot": BYOT(exits=["stage9"])})
    method = BYOT()
    with pytest.raises(RuntimeError, match="prepare"):
        method.exit_outputs({"logits": torch.zeros(2, 3)})


def test_registry_entries_carry_papers_and_defaults():
    assert method_info("byot").defaults["alpha"] == 0.3 and method_info("byot").defaults["lam"] == 0.03
    assert method_info("dlb").defaults == {"T": 3.0, "weight": 1.0, "warmup_epochs": 0}
    assert method_info("zipf_ls").defaults["weight"] == 0.1 and method_info("zipf_ls").paper.arxiv == "2207.12980"
    assert {method_info(n).family for n in ("byot", "msd", "dlb", "zipf_ls", "tf_fd")} == {"self"}


# ------------------------------------------------------------------------------------------ DLB


def test_dlb_teaches_the_repeated_samples_with_the_last_steps_predictions():
    method = DLB(T=3.0)
    first = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [2.0, -1.0, 0.0]])
    loss0 = method({"logits": first.clone().requires_grad_()}, {}, Batch(torch.zeros(3), index=torch.tensor([7, 3, 5])))
    assert float(loss0.detach()) == 0.0
    second = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.3, -0.3, 0.9]], requires_grad=True)
    loss = method({"logits": second}, {}, Batch(torch.zeros(3), index=torch.tensor([5, 9, 7])))
    # rows 0 and 2 were in the last batch (samples 5 and 7): T² KL(p_last ‖ p_now), mean over them
    pairs = [(0, 2), (2, 0)]
    ref = mean([9 * kl(softmax(first[j].tolist(), 3), softmax(second[i].tolist(), 3)) for i, j in pairs])
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(second.grad[1]) == 0 and not method._last[1].requires_grad
    assert method.log_values() == {"paired": pytest.approx(2 / 6)}
    method.on_epoch_start(1)
    assert method._last is None and method.log_values() == {}
    method.eval()
    method({"logits": second.detach()}, {}, Batch(torch.zeros(3), index=torch.tensor([1, 2, 3])))
    assert method._last is None  # evaluation does not feed the store


def test_dlb_needs_sample_indices():
    with pytest.raises(ValueError, match="index"):
        DLB()({"logits": torch.zeros(2, 3)}, {}, Batch(torch.zeros(2, 1)))
    with pytest.raises(ValueError, match="T must be"):
        DLB(T=-1)


# ------------------------------------------------------------------------------------- Zipf's LS


def test_zipf_ls_ranks_by_dense_votes_of_the_students_own_classifier():
    model, batch = create("cnn", widths=(4, 8, 8)), digits_batch(4)
    method = ZipfLS(feature="stage3", upsample=2)
    d = _prepared(method, model, batch)
    d.eval()
    with torch.no_grad():
        view = d(batch).student
        fmap = F.interpolate(view["stage3"], scale_factor=2, mode="bilinear", align_corners=False)
        votes = torch.zeros(4, 10)
        for b in range(4):
            for i in range(fmap.shape[2]):
                for j in range(fmap.shape[3]):
                    votes[b, int(model.fc(fmap[b, :, i, j]).argmax())] += 1
        assert torch.equal(method.ranks(view), DF.zipf_ranks(votes))
        ref = DF.zipf_ls_loss(view["logits"], batch.targets, DF.zipf_ranks(votes))
        assert torch.allclose(method(view, {}, batch), ref)


def test_zipf_ls_without_a_map_ranks_by_the_logits_and_checks_its_inputs():
    method = ZipfLS()
    logits = rand(50, 3, 4).float()
    assert torch.equal(method.ranks({"logits": logits}), DF.zipf_ranks(logits))
    with pytest.raises(ValueError, match="upsample"):
        ZipfLS(upsample=0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) map"):
        _prepared(ZipfLS(feature="pool"), create("cnn", widths=(4, 8, 8)), digits_batch())
    with pytest.raises(ValueError, match="no nn.Linear"):
        _prepared(ZipfLS(feature="0"), nn.Sequential(nn.Conv2d(1, 10, 3), nn.Flatten(1)), digits_batch())
    with pytest.raises(RuntimeError, match="prepare"):
        distill.Distiller(create("cnn", widths=(4, 8, 8)), None, {"z": ZipfLS(feature="stage3")})(digits_batch())


# ---------------------------------------------------------------------------------------- Tf-FD


def test_tffd_method_is_the_weighted_mean_of_its_terms():
    model, batch = create("cnn", widths=(4, 8, 8)), digits_batch()
    method = TfFD(intra=0.5, inter=2.0)
    d = _prepared(method, model, batch)
    out = d(batch)
    maps = [out.student[p] for p in ("stage1", "stage2", "stage3")]
    intra = mean([float(DF.tffd_intra_loss(f).detach()) for f in maps])
    inter = mean([float(DF.tffd_inter_loss(maps[i], maps[j]).detach()) for i, j in ((0, 1), (0, 2), (1, 2))])
    assert float(out.total.detach()) == pytest.approx(0.5 * intra + 2.0 * inter, rel=1e-5)
    out.total.backward()
    assert model.stage1.body[0].weight.grad is not None
    with pytest.raises(ValueError, match="at least two tap paths"):
        TfFD(taps=["stage1"])
    with pytest.raises(ValueError, match="inter must be"):
        TfFD(inter=-1.0)


# ------------------------------------------------------------------------------------------ SLA


def test_sla_rotations_and_joint_targets_by_hand():
    x = torch.arange(2 * 9.0).view(2, 1, 3, 3)
    r = DF.sla_rotations(x)
    assert r.shape == (8, 1, 3, 3)
    assert torch.equal(r[4], x[1]) and torch.equal(r[1, 0], x[0, 0].flip(1).t())  # a quarter turn: transpose of a flip
    assert torch.equal(r[6, 0], x[1, 0].flip(0).flip(1))
    assert DF.sla_joint_targets(torch.tensor([2, 0]), 4).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="square"):
        DF.sla_rotations(torch.zeros(1, 1, 3, 4))


def test_sla_aggregate_and_loss_match_explicit_sums():
    b, m, k = 2, 4, 3
    joint = rand(60, b, m, k * m).requires_grad_()
    single, y = rand(61, b, k).requires_grad_(), torch.tensor([2, 0])
    jl = joint.tolist()
    agg = [[sum(jl[n][j][c * m + j] for j in range(m)) / m for c in range(k)] for n in range(b)]
    assert torch.allclose(DF.sla_aggregate(joint), torch.tensor(agg, dtype=torch.float64))
    T, beta = 2.0, 0.5
    sl = single.tolist()
    ref = mean([ce(jl[n][j], y[n] * m + j) for n in range(b) for j in range(m)])
    ref += beta * mean([ce(sl[n], int(y[n])) for n in range(b)])
    ref += T * T * mean([kl(softmax(agg[n], T), softmax(sl[n], T)) for n in range(b)])
    loss = DF.sla_sd_loss(joint, single, y, T, beta)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-10)
    loss.backward()
    # the aggregate only teaches: the joint head's gradient is that of its own CE
    j2 = joint.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(j2.view(b * m, k * m), DF.sla_joint_targets(y, m)), j2)
    assert torch.allclose(joint.grad, g)
    with pytest.raises(ValueError, match="do not match"):
        DF.sla_sd_loss(joint, rand(0, b, k + 1), y)


def test_sla_method_on_rotated_batches_and_its_aggregated_predictor():
    from distill.methods import SLA

    model, x, y = create("cnn", widths=(4, 8, 8)), torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 7])
    batch = Batch(DF.sla_rotations(x), y.repeat_interleave(4))
    method = SLA(predict="aggregated")
    d = _prepared(method, model, batch)
    out = d(batch)
    joint = method.head(out.student["pool"]).view(3, 4, -1)
    assert torch.allclose(out.total, DF.sla_sd_loss(joint, out.student["logits"].view(3, 4, -1)[:, 0], y))
    out.total.backward()
    assert method.head.weight.grad is not None and model.fc.weight.grad is not None
    d.eval()
    with torch.no_grad():
        view = d(batch).student
        expected = DF.sla_aggregate(method.head(view["pool"]).view(3, 4, -1))
        assert torch.allclose(d.predictor()(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        d(Batch(x, y))
    with pytest.raises(ValueError, match="labels"):
        d(Batch(DF.sla_rotations(x), y.repeat(4)))
    with pytest.raises(ValueError, match="predict must be"):
        SLA(predict="mean")
