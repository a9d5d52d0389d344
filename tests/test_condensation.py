"""Knowledge Condensation Distillation (KCD): the value estimate, its online record, the
condensation rule (ranking, partition, summary, schedule), the ``kcd`` method and the
``fit_condensed`` strategy end to end on digits.
"""

from __future__ import annotations

import math

import pytest
import torch
from _views import CNN_PAIRS, cnn_views
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.data.loader import InMemoryLoader
from distill.methods import KCD, create_method, method_info
from distill.strategies.condense import CondensedLoader, fit_condensed

SETTINGS = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------------------- Eq. 7: the value


def test_value_is_prediction_entropy_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    logits[2] = torch.tensor([5.0, 5.0])  # a shift leaves the softmax, so the entropy, as it is
    p = 0.75  # softmax of (log 3, 0) = (3/4, 1/4)
    expected = [math.log(2.0), -(p * math.log(p) + (1 - p) * math.log(1 - p)), math.log(2.0)]
    assert DF.kcd_value(logits).tolist() == pytest.approx(expected, abs=1e-12)


def test_value_against_loops_and_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    for b in range(5):
        z = [float(v) for v in logits[b]]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        probs = [v / sum(e) for v in e]
        h = -sum(q * math.log(q) for q in probs)
        assert float(DF.kcd_value(logits)[b]) == pytest.approx(h, abs=1e-10)
    assert float(DF.kcd_value(torch.zeros(1, 7))[0]) == pytest.approx(math.log(7))  # uniform: the maximum
    assert float(DF.kcd_value(torch.tensor([[60.0, 0.0, 0.0]]))[0]) == pytest.approx(0.0, abs=1e-20)
    assert DF.kcd_value(torch.zeros(2, 3, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        DF.kcd_value(torch.zeros(3))


# ---------------------------------------------------------------------------- Eq. 12: online record


def test_online_record_matches_a_hand_worked_sequence() -> None:
    value, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    steps = [([0, 1], [1.0, 2.0]), ([0], [4.0]), ([0, 0, 2], [1.0, 3.0, 5.0])]
    for index, v in steps:
        value, count = DF.kcd_update_value(value, count, torch.tensor(index), torch.tensor(v, dtype=torch.float64))
    # sample 0: visits 1, 4, 1, 3 -> V^4 = (1 + 4 + 1 + 3) / 4; Eq. 12 by hand: 1 -> 2.5 -> 2 -> 2.25
    assert value.tolist() == pytest.approx([2.25, 2.0, 5.0])
    assert count.tolist() == [4, 1, 1]


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(0, 3)), min_size=1, max_size=25), st.integers(1, 6))
def test_online_record_is_eq12_applied_visit_by_visit(visits: list, batch: int) -> None:
    value, count = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    for k in range(0, len(visits), batch):
        chunk = visits[k:k + batch]
        value, count = DF.kcd_update_value(value, count, torch.tensor([i for i, _ in chunk]),
                                           torch.tensor([v for _, v in chunk], dtype=torch.float64))
    ref_v, ref_f = [0.0] * 5, [0] * 5
    for i, v in visits:  # Eq. 12, one visit at a time
        ref_f[i] += 1
        ref_v[i] = (ref_f[i] - 1) / ref_f[i] * ref_v[i] + v / ref_f[i]
    assert value.tolist() == pytest.approx(ref_v, abs=1e-9)
    assert count.tolist() == ref_f


def test_online_record_rejects_bad_input_and_leaves_inputs_alone() -> None:
    value, count = torch.zeros(3), torch.zeros(3, dtype=torch.long)
    DF.kcd_update_value(value, count, torch.tensor([1]), torch.tensor([2.0]))
    assert value.tolist() == [0.0, 0.0, 0.0] and count.tolist() == [0, 0, 0]
    with pytest.raises(IndexError, match="3 samples"):
        DF.kcd_update_value(value, count, torch.tensor([3]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        DF.kcd_update_value(value, count, torch.tensor([0, 1]), torch.tensor([1.0]))


# ---------------------------------------------------------------------------- Eqs. 13 and 8: ranking


def test_cost_aware_score_by_hand() -> None:
    value = torch.tensor([1.0, 1.0, 2.0, 0.0])
    count = torch.tensor([1, 8, 1, 0])
    assert DF.kcd_score(value, count, alpha=0.5).tolist() == pytest.approx([1.0, math.sqrt(8), 2.0, 0.0])
    assert DF.kcd_score(value, count, alpha=0.0).tolist() == pytest.approx([1.0, 1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="alpha"):
        DF.kcd_score(value, count, alpha=-1.0)


def test_ranking_breaks_ties_by_index() -> None:
    assert DF.kcd_ranking(torch.tensor([1.0, 3.0, 3.0, 2.0, 1.0])).tolist() == [1, 2, 3, 0, 4]
    assert DF.kcd_ranking(torch.zeros(6)).tolist() == list(range(6))
    with pytest.raises(ValueError, match="NaN"):
        DF.kcd_ranking(torch.tensor([1.0, float("nan")]))


def test_rank_likelihood_and_labels_by_hand() -> None:
    score = torch.tensor([0.1, 0.9, 0.5, 0.3])  # ranks 3, 0, 1, 2
    assert DF.kcd_rank_likelihood(score).tolist() == [0.25, 1.0, 0.75, 0.5]
    assert DF.kcd_value_labels(score, 0.75).tolist() == [False, True, True, False]
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 3, (8,), generator=g).float()  # many ties
    for n in range(1, 9):  # keeping the n best is Y = 1[p >= 1 - (n - 1) / N]
        labels = DF.kcd_value_labels(score, 1 - (n - 1) / 8)
        assert sorted(torch.nonzero(labels).flatten().tolist()) == sorted(DF.kcd_partition(score, n).kept.tolist())


# ---------------------------------------------------------------------------- VAKS: partition and summary


def test_partition_keeps_exactly_the_top_values() -> None:
    score = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.7, 0.3, 0.0, 0.8, 0.2, 0.6])
    # by decreasing score (ties by index): 1, 7, 3, 4, 9, 0, 5, 8, 2, 6
    p = DF.kcd_partition(score, 7)
    assert p.high.tolist() == [1, 7, 3, 4]  # K_1H
    assert p.low.tolist() == [9, 0, 5]  # K_1L: the last |K_0| = 3 kept
    assert p.dropped.tolist() == [8, 2, 6]  # K_0, paired in this order
    assert p.kept.tolist() == [1, 7, 3, 4, 9, 0, 5]
    small = DF.kcd_partition(score, 3)  # |K_0| = 7 > |K_1| = 3: K_1L is all of K_1, paired with K_0's best 3
    assert small.high.tolist() == [] and small.low.tolist() == [1, 7, 3] and small.dropped.tolist() == [4, 9, 0]
    everything = DF.kcd_partition(score, 10)
    assert everything.low.numel() == 0 and everything.dropped.numel() == 0
    for bad in (0, 11, 2.5):
        with pytest.raises(ValueError, match="num_keep"):
            DF.kcd_partition(score, bad)


def test_summary_strength_follows_eq15() -> None:
    eps = DF.kcd_summary_epsilon(4, eps_max=0.3, dtype=torch.float64)
    assert eps.tolist() == pytest.approx([0.075, 0.15, 0.225, 0.3])
    k1, k0 = 10, 4  # Eq. 15 at the 1-based ranks 7..10 of K_1L
    assert eps.tolist() == pytest.approx([0.3 / k0 * (x - k1) + 0.3 for x in range(k1 - k0 + 1, k1 + 1)])
    assert DF.kcd_summary_epsilon(0).numel() == 0
    with pytest.raises(ValueError, match="eps_max"):
        DF.kcd_summary_epsilon(3, eps_max=-0.1)


def test_summary_perturbs_low_with_dropped_by_hand() -> None:
    low = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    dropped = torch.tensor([[10.0, 20.0], [-2.0, 0.0]])
    eps = torch.tensor([0.1, 0.5])
    # 1 + 0.1 * 10, 2 + 0.1 * 20; 3 + 0.5 * -2, 4 + 0.5 * 0
    assert DF.kcd_summarize(low, dropped, eps).flatten().tolist() == pytest.approx([2.0, 4.0, 2.0, 4.0])
    # 0.9 * 1 + 0.1 * 10, 0.9 * 2 + 0.1 * 20; 0.5 * 3 + 0.5 * -2, 0.5 * 4 + 0
    convex = DF.kcd_summarize(low, dropped, eps, mode="convex")
    assert convex.flatten().tolist() == pytest.approx([1.9, 3.8, 0.5, 2.0])
    with pytest.raises(ValueError, match="summary mode"):
        DF.kcd_summarize(low, dropped, eps, mode="mixup")
    with pytest.raises(ValueError, match="one strength per pair"):
        DF.kcd_summarize(low, dropped, torch.tensor([0.1]))


# ---------------------------------------------------------------------------- the schedule


def test_schedule_shrinks_as_the_reference_code() -> None:
    assert DF.kcd_schedule(1000, 240, 40, 0.7) == [1000, 950, 900, 850, 800, 750]
    assert DF.kcd_schedule(100, 10, 3, 0.5) == [100, 84, 68, 52]  # step floor(50 / 3) = 16
    assert DF.kcd_schedule(100, 4, 2, 0.9) == [100, 95]  # 100 * 0.1 / 2 = 5, not 4.999...
    assert DF.kcd_schedule(10, 4, 1, 0.95) == [10, 9, 9, 9]  # step rounds to 0 -> 1; floor int(9.5) = 9
    assert DF.kcd_schedule(50, 6, 2, 1.0) == [50, 50, 50]
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="keep_ratio"):
            DF.kcd_schedule(10, 4, 2, bad)
    with pytest.raises(ValueError, match="condense_every"):
        DF.kcd_schedule(10, 4, 0, 0.5)


# ---------------------------------------------------------------------------- the kcd method


def test_kcd_method_is_kd_records_values_and_sends_gradient_to_the_student_only() -> None:
    student, teacher, batch = cnn_views(6)
    batch = Batch(batch.inputs, batch.targets, torch.tensor([4, 0, 2, 9, 4, 7]))
    kcd = create_method("kcd", T=2.0, num_samples=10)
    kcd.train()
    loss = kcd(student, teacher, batch)
    expected = DF.kd_loss(student["logits"].detach(), teacher["logits"].detach(), 2.0)
    assert float(loss.detach()) == pytest.approx(float(expected))
    loss.backward()
    assert student["logits"].grad is not None and student["logits"].grad.abs().sum() > 0
    assert teacher["logits"].grad is None
    h = DF.kcd_value(student["logits"].detach())
    assert kcd.count.tolist() == [1, 0, 1, 0, 2, 0, 0, 1, 0, 1]
    assert float(kcd.value[4]) == pytest.approx(float((h[0] + h[4]) / 2))
    assert float(kcd.value[9]) == pytest.approx(float(h[3]))
    assert kcd.log_values()["samples"] == 6.0
    kcd.eval()  # evaluation passes record nothing
    kcd(student, teacher, batch)
    assert int(kcd.count.sum()) == 6
    kcd.on_epoch_start(1)
    assert kcd.log_values()["samples"] == 0.0


def test_kcd_method_explains_missing_index_and_size() -> None:
    student, teacher, batch = cnn_views(4)
    with pytest.raises(ValueError, match="return_index=True"):
        KCD(num_samples=4)(student, teacher, batch)
    with pytest.raises(RuntimeError, match="training set's size"):
        KCD()(student, teacher, Batch(batch.inputs, batch.targets, torch.arange(4)))
    with pytest.raises(ValueError, match="temperature"):
        KCD(T=0.0)
    info = method_info("kcd")
    assert info.paper.arxiv == "2207.05409" and info.paper.year == 2022 and info.defaults["T"] == 4.0


@pytest.mark.parametrize("pair", sorted(CNN_PAIRS))
def test_kcd_in_plain_fit_records_every_sample(pair: str) -> None:
    torch.manual_seed(0)
    student, teacher = CNN_PAIRS[pair]()
    x, y = torch.randn(24, 1, 8, 8), torch.arange(24) % 10
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "kcd": 1.0})
    distill.fit(d, InMemoryLoader(x, y, 8, return_index=True), epochs=2, progress=False, eval_teacher=False)
    kcd = d.methods["kcd"]
    assert kcd.count.tolist() == [2] * 24  # fit bound the size from the loader's targets
    assert bool((kcd.value > 0).all()) and bool((kcd.value <= math.log(10) + 1e-5).all())
    d2 = distill.Distiller(*CNN_PAIRS[pair](), losses={"kcd": 1.0})
    with pytest.raises(ValueError, match="return_index"):
        distill.fit(d2, InMemoryLoader(x, y, 8), epochs=1, progress=False)


# ---------------------------------------------------------------------------- the condensing loader


def test_condensed_loader_keeps_the_best_and_summarises_the_border() -> None:
    n = 10
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + 1.0  # sample i holds the value i + 1
    y = torch.arange(n) % 3
    kcd = KCD(num_samples=n)
    kcd.value.copy_(torch.tensor([0.5, 0.9, 0.1, 0.7, 0.7, 0.3, 0.0, 0.8, 0.2, 0.6]))
    kcd.count.fill_(1)
    sizes = DF.kcd_schedule(n, 4, 2, 0.6)
    assert sizes == [10, 8]
    loader = CondensedLoader(x, y, kcd, sizes=sizes, condense_every=2, eps_max=0.3, batch_size=3, shuffle=True)
    loader.set_epoch(1)
    assert loader.num_samples == 10 and len(loader) == 4
    loader.set_epoch(2)  # stage 1: keep 1, 7, 3, 4, 9, 0 (K_1H) and 5, 8 (K_1L); K_0 = 2, 6
    assert loader.index.tolist() == [0, 1, 3, 4, 5, 7, 8, 9] and len(loader) == 3
    seen = {}
    for b in loader:
        for xi, yi, i in zip(b.inputs.flatten().tolist(), b.targets.tolist(), b.index.tolist()):
            seen[i] = xi
            assert yi == int(y[i])
    assert sorted(seen) == [0, 1, 3, 4, 5, 7, 8, 9]
    # K_1L (5, 8) paired with K_0 (2, 6) at strengths 0.15, 0.3 (additive, Eq. 14)
    assert seen[5] == pytest.approx(6.0 + 0.15 * 3.0) and seen[8] == pytest.approx(9.0 + 0.3 * 7.0)
    assert all(seen[i] == i + 1.0 for i in (0, 1, 3, 4, 7, 9))
    assert x.flatten().tolist() == [float(i + 1) for i in range(n)]  # the data are never modified
    assert [(s.start_epoch, s.num_samples, s.num_summarised) for s in loader.stages] == [(0, 10, 0), (2, 8, 2)]
    with pytest.raises(RuntimeError, match="only moves forward"):
        loader.set_epoch(0)


def test_condensed_loader_ranks_the_whole_data_so_a_removed_sample_can_return() -> None:
    kcd = KCD(num_samples=6)
    kcd.value.copy_(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))
    kcd.count.fill_(1)
    loader = CondensedLoader(torch.zeros(6, 2), None, kcd, sizes=[6, 4, 3], condense_every=1, batch_size=4)
    loader.set_epoch(1)
    assert loader.index.tolist() == [0, 1, 2, 3]
    kcd.value[5] = 10.0  # a removed sample whose (older) value now ranks first
    loader.set_epoch(2)
    assert loader.index.tolist() == [0, 1, 5]
    assert [s.num_samples for s in loader.stages] == [6, 4, 3]


# ---------------------------------------------------------------------------- fit_condensed end to end


def _digits(n: int = 240) -> tuple:
    train = distill.data.get_dataset("digits")
    val = distill.data.get_dataset("digits", split="val")
    return (train.inputs[:n], train.targets[:n]), val.loader(200, shuffle=False)


def test_fit_condensed_on_digits_trains_on_shrinking_sets() -> None:
    torch.manual_seed(0)
    train, val = _digits()
    student = distill.models.create("cnn_digits_student")
    teacher = distill.models.create("cnn", widths=(8, 16, 16))
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = [p.detach().clone() for p in student.parameters()]
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "kcd": 1.0})
    result = fit_condensed(d, train, val, epochs=6, condense_every=2, keep_ratio=0.5, batch_size=32,
                           schedule="constant", lr=0.1, progress=False)

    assert [s.num_samples for s in result.stages] == DF.kcd_schedule(240, 6, 2, 0.5) == [240, 200, 160]
    assert [s.start_epoch for s in result.stages] == [0, 2, 4]
    assert [row["kcd_samples"] for row in result.history] == [240, 240, 200, 200, 160, 160]
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.keep_index.shape == (160,) and result.keep_index.unique().numel() == 160
    assert "val_student_acc" in result.history[-1] and result.last_acc is not None
    kcd = d.methods["kcd"]
    assert int(kcd.count.sum()) == 2 * (240 + 200 + 160)  # every trained sample recorded, by its global index
    # gradient reached the student only: the teacher is bit-identical, the student moved
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))


def test_fit_condensed_accepts_tensordata_and_loaders() -> None:
    train = distill.data.get_dataset("digits")
    small = InMemoryLoader(train.inputs[:40], train.targets[:40], batch_size=20, return_index=False)
    d = distill.Distiller(distill.models.create("cnn_digits_student"), distill.models.create("cnn", widths=(4, 8, 8)),
                          losses={"kcd": 1.0})
    r = fit_condensed(d, small, epochs=2, condense_every=1, keep_ratio=0.5, progress=False, eval_teacher=False)
    assert [row["kcd_samples"] for row in r.history] == [40, 30]  # 40 * (1 - 0.5) / 2 removed per condensation


def test_fit_condensed_rejects_bad_settings_before_training() -> None:
    train, _ = _digits(32)
    student, teacher = CNN_PAIRS["digits"]()
    before = [p.detach().clone() for p in student.parameters()]
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "kcd": 1.0})
    bad = [
        ({"keep_ratio": 0.0}, ValueError, "keep_ratio"),
        ({"keep_ratio": 1.2}, ValueError, "keep_ratio"),
        ({"keep_ratio": True}, ValueError, "keep_ratio"),
        ({"condense_every": 4}, ValueError, "smaller than epochs"),
        ({"summary": "mixup"}, ValueError, "summary"),
        ({"summary": "convex", "eps_max": 1.5}, ValueError, "eps_max"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"resume": True}, ValueError, "cannot resume"),
        ({"drop_last": True, "batch_size": 30, "keep_ratio": 0.5}, ValueError, "smallest condensed set"),
    ]
    for kwargs, error, match in bad:
        args = {"epochs": 4, "condense_every": 2, **kwargs}
        with pytest.raises(error, match=match):
            fit_condensed(d, train, epochs=args.pop("epochs"), progress=False, **args)
    with pytest.raises(TypeError, match="in memory"):
        fit_condensed(d, DataLoader(TensorDataset(*train), batch_size=8), epochs=4, condense_every=2)
    plain = distill.Distiller(student, teacher, losses={"ce": 1.0, "kd": 1.0})
    with pytest.raises(ValueError, match="KCD loss"):
        fit_condensed(plain, train, epochs=4, condense_every=2)
    off = distill.Distiller(student, teacher, losses={"ce": 1.0, "kcd": (0.0, KCD())})
    with pytest.raises(ValueError, match="weight 0"):
        fit_condensed(off, train, epochs=4, condense_every=2)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
