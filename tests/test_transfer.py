"""Transfer sets, ensembles and unlabeled data: MUNGE (with RANDOM and NBE), model compression,
CMM, co-training and data distillation.

The pure functions against hand-worked numbers and explicit loops (MUNGE replayed draw by draw),
their invariants with hypothesis, what each strategy's student minimises on small inputs, where
gradients flow, short runs on digits, and the errors raised before any training.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _interrupt import Interrupted, interrupt_after
from _views import CNN_PAIRS
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.data.loader import InMemoryLoader
from distill.models import create
from distill.strategies import transfer as T
from distill.strategies.registry import list_strategies, strategy_info
from distill.teachers import EnsembleTeacher

SETTINGS = settings(max_examples=25, deadline=None)
INF = math.inf


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, InMemoryLoader]:
    tr = distill.data.get_dataset("digits")
    va = distill.data.get_dataset("digits", split="val")
    return tr.inputs, tr.targets, InMemoryLoader(va.inputs[:200], va.targets[:200], 200, shuffle=False)


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training or transfer-set generation fail the test: errors must come first."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the bad argument was reported")

    monkeypatch.setattr(T, "fit", boom)
    monkeypatch.setattr(T, "transfer_set", boom)
    monkeypatch.setattr(T, "multi_transform_probs", boom)


# ============================================================================ MUNGE


def test_munge_swap_by_hand() -> None:
    a, b = torch.tensor([0.0, 2.0, 1.0]), torch.tensor([1.0, 4.0, 3.0])
    swap = torch.tensor([True, False, True])
    noise_a, noise_b = torch.tensor([0.5, 9.0, 7.0]), torch.tensor([-1.0, 9.0, 7.0])
    nominal = torch.tensor([False, False, True])
    new_a, new_b = DF.munge_swap(a, b, swap, noise_a, noise_b, 2.0, nominal)
    # attribute 0: sd = |0 - 1| / 2 = 0.5; a' = 1 + 0.5 * 0.5, b' = 0 + 0.5 * (-1)
    # attribute 1: not chosen, unchanged; attribute 2: nominal, the values exchanged (noise unused)
    assert new_a.tolist() == [1.25, 2.0, 3.0]
    assert new_b.tolist() == [-0.5, 4.0, 1.0]
    exact_a, exact_b = DF.munge_swap(a, b, swap, noise_a, noise_b, INF)  # s = inf: an exact swap
    assert exact_a.tolist() == [1.0, 2.0, 3.0] and exact_b.tolist() == [0.0, 4.0, 1.0]


def test_munge_is_sequential_and_in_place_by_hand() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    original = x.clone()
    out = DF.munge(x, p=1.0, s=INF)
    # ranges 5 and 5. e=0: neighbour 1 -> swap: [1,0], [0,0], [5,5].
    # e=1 ([0,0]): neighbour 0 ([1,0], d^2 = 0.04) -> swap: [0,0], [1,0], [5,5].
    # e=2 ([5,5]): row 0 d^2 = 2, row 1 d^2 = 0.64 + 1 = 1.64 -> swap with row 1: [0,0], [5,5], [1,0].
    assert out.tolist() == [[0.0, 0.0], [5.0, 5.0], [1.0, 0.0]]
    assert torch.equal(x, original)
    assert torch.equal(DF.munge(x, p=0.0, multiplier=3), x.repeat(3, 1))


def _munge_reference(x: torch.Tensor, p: float, s: float, multiplier: int, nominal: set, seed: int) -> list:
    """MUNGE in plain Python floats, replaying the documented draws (rand (N, D), then randn (N, 2, D))."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    rows = x.tolist()
    span = [max(r[j] for r in rows) - min(r[j] for r in rows) for j in range(d)]
    out = []
    for _ in range(multiplier):
        t = [list(r) for r in rows]
        u = torch.rand(n, d, generator=g).tolist()
        z = torch.randn(n, 2, d, generator=g).tolist()
        for e in range(n):
            best, nb = INF, -1
            for f in range(n):
                if f == e:
                    continue
                dist = 0.0
                for j in range(d):
                    if j in nominal:
                        dist += float(t[e][j] != t[f][j])
                    elif span[j] > 0:
                        dist += ((t[e][j] - t[f][j]) / span[j]) ** 2
                if dist < best:
                    best, nb = dist, f
            for j in range(d):
                if u[e][j] >= p:
                    continue
                a, b = t[e][j], t[nb][j]
                if j in nominal:
                    t[e][j], t[nb][j] = b, a
                else:
                    sd = abs(a - b) / s
                    t[e][j], t[nb][j] = b + sd * z[e][0][j], a + sd * z[e][1][j]
        out.extend(t)
    return out


@pytest.mark.parametrize("p,s", [(0.5, 5.0), (0.8, 1.0), (1.0, 3.0)])
def test_munge_matches_a_loop_reference(p: float, s: float) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=g)
    x[:, 2] = torch.randint(0, 3, (9,), generator=g).float()  # a nominal attribute
    x[:, 3] = 1.5  # a constant attribute counts 0 in the distance
    out = DF.munge(x, p=p, s=s, multiplier=2, nominal=[2], seed=11)
    ref = _munge_reference(x, p, s, 2, {2}, 11)
    assert out.shape == (18, 4)
    assert out.flatten().tolist() == pytest.approx([v for row in ref for v in row], abs=1e-5)
    mask = torch.tensor([False, False, True, False])
    assert torch.equal(DF.munge(x, p=p, s=s, multiplier=2, nominal=mask, seed=11), out)


@SETTINGS
@given(st.integers(2, 9), st.integers(1, 4), st.floats(0, 1), st.integers(0, 1000))
def test_exact_swaps_permute_each_column(n: int, d: int, p: float, seed: int) -> None:
    """Swaps only exchange values between rows, so every pass keeps each column's multiset: nominal
    attributes always, continuous ones with s = inf."""
    x = torch.randint(0, 3, (n, d), generator=torch.Generator().manual_seed(seed)).float()
    for out in (DF.munge(x, p=p, s=INF, multiplier=2, seed=seed),
                DF.munge(x, p=p, s=1.0, multiplier=2, nominal=list(range(d)), seed=seed)):
        for k in range(2):
            passed = out[k * n:(k + 1) * n]
            assert torch.equal(passed.sort(0).values, x.sort(0).values)


def test_munge_is_seeded_and_leaves_global_state_alone() -> None:
    x = rand(0, 12, 3)
    state = torch.get_rng_state()
    a, b = DF.munge(x, seed=5), DF.munge(x, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, DF.munge(x, seed=6))
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a, x)  # p = 0.5 changes something


@pytest.mark.parametrize("kwargs,match", [
    ({"x": torch.zeros(4)}, r"\(N, D\)"),
    ({"x": torch.zeros(1, 3)}, "at least 2"),
    ({"x": torch.tensor([[0.0, math.nan], [1.0, 2.0]])}, "NaN"),
    ({"p": 1.5}, "p must be"),
    ({"s": 0.0}, "s must be"),
    ({"multiplier": 0}, "multiplier"),
    ({"nominal": [7]}, "nominal"),
    ({"nominal": torch.tensor([True])}, "nominal"),
])
def test_munge_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"x": rand(0, 4, 3), **kwargs}
    with pytest.raises(ValueError, match=match):
        DF.munge(args.pop("x"), **args)


# ============================================================================ RANDOM and NBE


def test_random_transfer_draws_each_attribute_from_its_own_values() -> None:
    x = rand(1, 6, 3)
    out = DF.random_transfer(x, 10, seed=4)
    rows = torch.randint(0, 6, (10, 3), generator=torch.Generator().manual_seed(4))
    for i in range(10):
        for j in range(3):
            assert out[i, j] == x[rows[i, j], j]
    with pytest.raises(ValueError, match="num_samples"):
        DF.random_transfer(x, 0)


def test_naive_bayes_mixture_em_step_against_loops() -> None:
    x = rand(2, 7, 2).double()
    one = DF.fit_naive_bayes_mixture(x, 2, iterations=0, seed=1)
    after = DF.fit_naive_bayes_mixture(x, 2, iterations=1, seed=1)
    w, mu, var = one.weights.tolist(), one.means.tolist(), one.variances.tolist()
    resp = []
    for n in range(7):
        joint = [w[c] * math.prod(math.exp(-(x[n, j].item() - mu[c][j]) ** 2 / (2 * var[c][j]))
                                  / math.sqrt(2 * math.pi * var[c][j]) for j in range(2)) for c in range(2)]
        resp.append([v / sum(joint) for v in joint])
    for c in range(2):
        mass = sum(r[c] for r in resp)
        assert after.weights[c].item() == pytest.approx(mass / 7)
        for j in range(2):
            m = sum(resp[n][c] * x[n, j].item() for n in range(7)) / mass
            v = sum(resp[n][c] * (x[n, j].item() - m) ** 2 for n in range(7)) / mass
            assert after.means[c, j].item() == pytest.approx(m)
            assert after.variances[c, j].item() == pytest.approx(max(v, 1e-3))


def test_naive_bayes_mixture_recovers_two_clusters_and_samples_them() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 2, generator=g) * 0.1 + 4, torch.randn(200, 2, generator=g) * 0.1 - 4])
    model = DF.fit_naive_bayes_mixture(x, 2, iterations=30, seed=0)
    order = model.means[:, 0].argsort()
    assert model.means[order].flatten().tolist() == pytest.approx([-4, -4, 4, 4], abs=0.05)
    assert model.weights.tolist() == pytest.approx([0.5, 0.5], abs=0.01)
    sample = DF.sample_naive_bayes_mixture(model, 2000, seed=1)
    assert sample.shape == (2000, 2)
    assert float((sample[:, 0] > 0).float().mean()) == pytest.approx(0.5, abs=0.05)
    assert float(sample[sample[:, 0] > 0].std(0).mean()) == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ValueError, match="exceeds"):
        DF.fit_naive_bayes_mixture(x[:3], 5)


@pytest.mark.parametrize("generator", T.GENERATORS)
def test_transfer_set_keeps_the_input_shape(generator: str) -> None:
    x = rand(0, 10, 1, 2, 2)
    out = T.transfer_set(x, generator, multiplier=3, components=3, seed=1)
    assert out.shape == (30, 1, 2, 2) and torch.isfinite(out).all()
    assert torch.equal(out, T.transfer_set(x, generator, multiplier=3, components=3, seed=1))
    with pytest.raises(ValueError, match="generator"):
        T.transfer_set(x, "smote")


# ============================================================================ model compression


def test_probability_regression_against_loops_and_gradient() -> None:
    s, t = rand(0, 3, 4).double().requires_grad_(True), rand(1, 3, 4).double()
    p = t.softmax(1)
    loss = DF.probability_regression_loss(s, p)
    expected = 0.0
    for b in range(3):
        e = [math.exp(v) for v in s[b].tolist()]
        expected += sum((e[k] / sum(e) - p[b, k].item()) ** 2 for k in range(4))
    assert loss.item() == pytest.approx(expected / 3)
    assert DF.probability_regression_loss(p.log(), p).item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        DF.probability_regression_loss(s, p[:, :3])


def test_mimic_minimises_squared_error_to_the_ensemble_mean_and_leaves_it_alone() -> None:
    torch.manual_seed(0)
    members = [create("cnn", widths=(4, 8, 8)), create("mlp_digits_student")]
    ensemble = EnsembleTeacher(members)
    student = create("cnn_digits_student")
    d = distill.Distiller(student, ensemble, {"mse": T.ProbabilityRegression()})
    before = [p.detach().clone() for m in members for p in m.parameters()]
    x = rand(3, 5, 1, 8, 8)
    out = d(Batch(x))
    with torch.no_grad():
        mean = sum(m(x).softmax(1) for m in members) / 2
        q = student(x).softmax(1)
    expected = sum(float((q[b, k] - mean[b, k]) ** 2) for b in range(5) for k in range(10)) / 5
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    out.total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for m in members for p in m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, [p for m in members for p in m.parameters()]))


@pytest.mark.parametrize("pair", sorted(CNN_PAIRS))
def test_model_compression_on_digits_lowers_the_loss(pair: str, digits: tuple) -> None:
    x, y, val = digits
    student, teacher = CNN_PAIRS[pair]()
    members = [teacher, create("mlp_digits_student")]
    before = [p.detach().clone() for m in members for p in m.parameters()]
    train = InMemoryLoader(x[:160], y[:160], 32, seed=0)
    result = T.fit_model_compression(student, train, val, teacher=members, epochs=4, multiplier=1,
                                     progress=False, lr=0.1)
    losses = [row["train_mse"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.num_train == 160 and result.num_generated == 160
    assert "val_teacher_acc" in result.history[-1]
    assert all(torch.equal(a, b) for a, b in zip(before, [p for m in members for p in m.parameters()]))


def test_model_compression_with_kd_and_without_the_training_inputs(digits: tuple) -> None:
    x, y, _ = digits
    seen: dict = {}

    def record(d: distill.Distiller, loader: InMemoryLoader, val: object, **kwargs: object) -> distill.train.FitResult:
        seen.update(methods=dict(d.methods), inputs=loader.inputs)
        return distill.train.FitResult()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "fit", record)
        result = T.fit_model_compression(create("mlp_digits_student"), (x[:20], y[:20]), teacher=create("cnn_digits_student"),
                                         epochs=1, generator="random", multiplier=2, include_train=False, loss="kd", T=2.0)
    assert seen["methods"]["kd"].T == 2.0
    assert seen["inputs"].shape == (40, 1, 8, 8) and result.num_train == 0
    for j in range(64):  # RANDOM: every pixel value comes from that pixel's training values
        column = x[:20].flatten(1)[:, j]
        assert all(bool((column == v).any()) for v in seen["inputs"].flatten(1)[:, j])


@pytest.mark.parametrize("kwargs,error,match", [
    ({"teacher": None}, ValueError, "needs teacher"),
    ({"generator": "smote"}, ValueError, "generator"),
    ({"loss": "ce"}, ValueError, "loss"),
    ({"p": 2.0}, ValueError, "swap probability"),
    ({"s": 0}, ValueError, "local-variance"),
    ({"multiplier": 0}, ValueError, "multiplier"),
    ({"resume": True}, ValueError, "resume=True needs run_dir"),
    ({"train": "loader"}, TypeError, "in memory"),
])
def test_model_compression_rejects_bad_arguments_before_work(kwargs: dict, error: type, match: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _no_training(monkeypatch)
    x = rand(0, 8, 1, 8, 8)
    train = DataLoader(TensorDataset(x, torch.zeros(8).long())) if kwargs.pop("train", None) else (x, None)
    args = {"teacher": [create("mlp_digits_student")], **kwargs}
    with pytest.raises(error, match=match):
        T.fit_model_compression(create("mlp_digits_student"), train, epochs=1, **args)


# ============================================================================ CMM


def test_plurality_vote_by_hand() -> None:
    # 3 members, 2 examples, 3 classes. Example 0: votes 2, 0, 2 -> class 2.
    # Example 1: votes 0, 1, 2 (a three-way tie) -> the highest mean probability, class 1.
    member = torch.tensor([
        [[0.0, 0.0, 5.0], [3.0, 0.0, 0.0]],
        [[5.0, 0.0, 0.0], [0.0, 6.0, 0.0]],
        [[0.0, 1.0, 4.0], [0.0, 0.0, 3.0]],
    ])
    assert DF.plurality_vote(member).tolist() == [2, 1]
    tie = torch.zeros(2, 1, 3)  # everything equal: the lowest index
    assert DF.plurality_vote(tie).tolist() == [0]


def test_cmm_trains_on_originals_plus_generated_examples_labelled_by_the_vote(digits: tuple) -> None:
    x, y, _ = digits
    torch.manual_seed(1)
    members = [create("mlp_digits_student") for _ in range(3)]
    seen: dict = {}

    def record(d: distill.Distiller, loader: InMemoryLoader, val: object, **kwargs: object) -> distill.train.FitResult:
        seen.update(d=d, loader=loader)
        return distill.train.FitResult()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "fit", record)
        result = T.fit_cmm(create("cnn_digits_student"), (x[:30], y[:30]), teacher=members, epochs=1, multiplier=2,
                           seed=3)
    loader = seen["loader"]
    assert result.num_train == 30 and result.num_generated == 60
    assert torch.equal(loader.inputs[:30], x[:30]) and torch.equal(loader.targets[:30], y[:30])
    generated = loader.inputs[30:]
    assert torch.equal(generated, T.transfer_set(x[:30], "munge", multiplier=2, seed=3))
    with torch.no_grad():
        votes = torch.stack([m(generated).argmax(1) for m in members])  # (3, 60)
        mean = sum(m(generated).softmax(1) for m in members) / 3
    for n in range(60):
        count = [int((votes[:, n] == k).sum()) for k in range(10)]
        best = max(count)
        tied = [k for k in range(10) if count[k] == best]
        expected = max(tied, key=lambda k: (float(mean[n, k]), -k))
        assert int(loader.targets[30 + n]) == expected
    # what the student minimises: cross-entropy on those labels
    batch = Batch(loader.inputs[:40], loader.targets[:40])
    out = seen["d"](batch)
    with torch.no_grad():
        logits = seen["d"].student(batch.inputs)
    manual = -sum(float(logits[b].log_softmax(0)[batch.targets[b]]) for b in range(40)) / 40
    assert out.total.item() == pytest.approx(manual, rel=1e-5)


def test_cmm_on_digits_lowers_the_loss_and_checks_its_arguments(digits: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, val = digits
    members = [create("mlp_digits_student"), create("cnn", widths=(4, 8, 8))]
    result = T.fit_cmm(create("mlp_digits_student"), InMemoryLoader(x[:120], y[:120], 32, seed=0), val,
                       teacher=members, epochs=4, multiplier=1, label_rule="mean", progress=False, lr=0.1)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match="label_rule"):
        T.fit_cmm(create("mlp_digits_student"), (x[:8], y[:8]), teacher=members, epochs=1, label_rule="max")
    with pytest.raises(ValueError, match="needs teacher"):
        T.fit_cmm(create("mlp_digits_student"), (x[:8], y[:8]), epochs=1)
    with pytest.raises(ValueError, match="labelled training data"):
        T.fit_cmm(create("mlp_digits_student"), (x[:8], None), teacher=members, epochs=1)


# ============================================================================ co-training


def test_cotrain_select_by_hand() -> None:
    probs = torch.tensor([
        [0.9, 0.1, 0.0],
        [0.8, 0.2, 0.0],
        [0.1, 0.7, 0.2],
        [0.5, 0.5, 0.0],
        [0.2, 0.7, 0.1],
    ])
    index, labels = DF.cotrain_select(probs, [1, 2, 0])
    # class 0: example 0 (0.9); class 1: examples 2 and 4 tie at 0.7 -> both, lower index first
    assert index.tolist() == [0, 2, 4] and labels.tolist() == [0, 1, 1]
    available = torch.tensor([False, True, True, True, True])
    index, labels = DF.cotrain_select(probs, [2, 1, 1], available)
    # class 0: 1 (0.8), 3 (0.5); class 1: 2 (0.7, lower index than 4); class 2: the last free one, 4
    assert index.tolist() == [1, 3, 2, 4] and labels.tolist() == [0, 0, 1, 2]
    index, _ = DF.cotrain_select(probs[:2], [5, 5, 5])  # the pool runs out
    assert sorted(index.tolist()) == [0, 1]
    with pytest.raises(ValueError, match="counts"):
        DF.cotrain_select(probs, [1, 1])


def test_half_views_by_hand_and_their_gradients() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert DF.half_view(x, "left")[0, 0].tolist() == [[0, 1, 0, 0], [4, 5, 0, 0], [8, 9, 0, 0], [12, 13, 0, 0]]
    assert DF.half_view(x, "bottom")[0, 0, :2].abs().sum() == 0 and torch.equal(DF.half_view(x, "bottom")[0, 0, 2:],
                                                                                 x[0, 0, 2:])
    assert torch.equal(DF.half_view(x, "left") + DF.half_view(x, "right"), x)
    model = T.ViewModel(create("cnn", widths=(4, 8, 8)), "right")
    image = rand(0, 2, 1, 8, 8).requires_grad_(True)
    model(image).sum().backward()
    assert image.grad[..., :4].abs().sum() == 0 and image.grad[..., 4:].abs().sum() > 0  # the view sees its half
    with pytest.raises(ValueError, match="which"):
        DF.half_view(x, "diagonal")


def test_each_view_classifier_minimises_cross_entropy_on_its_view() -> None:
    torch.manual_seed(0)
    base = create("cnn_digits_student")
    view = T.ViewModel(base, "top")
    x, y = rand(1, 6, 1, 8, 8), torch.arange(6)
    out = distill.Distiller(view, None, {"ce": 1.0})(Batch(x, y))
    masked = x.clone()
    masked[..., 4:, :] = 0
    with torch.no_grad():
        manual = F.cross_entropy(base(masked), y)
    assert out.total.item() == pytest.approx(manual.item(), rel=1e-6)
    product = T.ViewProduct(view, T.ViewModel(create("cnn_digits_student"), "bottom"))
    with torch.no_grad():
        joint = product(x).softmax(1)
        p1, p2 = view(x).softmax(1), product.second(x).softmax(1)
    torch.testing.assert_close(joint, p1 * p2 / (p1 * p2).sum(1, keepdim=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize("exchange", ["shared", "cross"])
def test_co_training_rounds_grow_the_labelled_sets(exchange: str, digits: tuple) -> None:
    x, y, _ = digits
    trained: list = []

    def record(d: distill.Distiller, loader: InMemoryLoader, val: object, **kwargs: object) -> distill.train.FitResult:
        trained.append((d.student, loader.inputs.shape[0], loader.targets.clone()))
        return distill.train.FitResult()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "fit", record)
        result = T.fit_co_training(lambda: create("mlp_digits_student"), (x[:20], y[:20]), unlabeled=x[20:120],
                                   epochs=1, rounds=2, pool_size=30, per_class=1, exchange=exchange, progress=False)
    # rounds + 1 trainings of each view; each round each classifier labels 1 example per class (10)
    assert len(trained) == 6 and trained[0][0] is result.models[0] and trained[1][0] is result.models[1]
    grow = 20 if exchange == "shared" else 10
    assert [n for _, n, _ in trained] == [20, 20, 20 + grow, 20 + grow, 20 + 2 * grow, 20 + 2 * grow]
    assert [row["added"] for row in result.history] == [20, 20, 0]
    assert [row["labeled"] for row in result.history] == [20, 40, 60]
    assert [row["pool"] for row in result.history] == [30, 30, 30]  # refilled with as many as were labelled
    index = result.added_index.tolist()
    assert len(index) == len(set(index)) == 40
    assert result.added_by.tolist() == ([0] * 10 + [1] * 10) * 2
    assert sorted(result.added_labels[:10].tolist()) == list(range(10))
    for i in (0, 1):  # the pseudo-labels are what each classifier trained on in the last round
        labels = trained[4 + i][2][20:].tolist()
        mine = [(a, b) for a, b, c in zip(index, result.added_labels.tolist(), result.added_by.tolist())
                if exchange == "shared" or c != i]
        assert labels == [b for _, b in mine]


def test_co_training_on_digits_lowers_the_loss_and_writes_its_run(digits: tuple, tmp_path: object) -> None:
    x, y, val = digits
    losses: list = []
    result = T.fit_co_training(create("cnn_digits_student"), InMemoryLoader(x[:60], y[:60], 20, seed=0), val,
                               unlabeled=x[60:200], epochs=4, rounds=1, progress=False, lr=0.1, run_dir=tmp_path,
                               on_epoch_end=lambda row: losses.append(row["train_loss"]))
    assert len(losses) == 16  # 2 trainings x 2 views x 4 epochs
    assert losses[3] < losses[0] and losses[7] < losses[4]
    assert {"val_student_acc", "val_view1_acc", "val_view2_acc"} <= set(result.history[-1])
    assert result.last_acc == result.history[-1]["val_student_acc"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert result.models[0].model is not result.models[1].model


@pytest.mark.parametrize("kwargs,error,match", [
    ({"teacher": "model"}, ValueError, "no teacher"),
    ({"unlabeled": None}, ValueError, "unlabeled"),
    ({"unlabeled": torch.zeros(5, 64)}, ValueError, "unlabeled"),
    ({"rounds": -1}, ValueError, "rounds"),
    ({"pool_size": 0}, ValueError, "pool_size"),
    ({"per_class": [1, 2]}, ValueError, "per_class"),
    ({"per_class": 0}, ValueError, "per_class"),
    ({"exchange": "both"}, ValueError, "exchange"),
    ({"views": ("left",)}, ValueError, "two views"),
    ({"views": ("left", "diagonal")}, ValueError, "which"),
    ({"views": ("left", 3)}, TypeError, "view"),
    ({"student": [nn.Linear(2, 2)]}, ValueError, "two models"),
    ({"resume": True}, ValueError, "co_training cannot resume"),
])
def test_co_training_rejects_bad_arguments_before_training(kwargs: dict, error: type, match: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _no_training(monkeypatch)
    x = rand(0, 8, 1, 8, 8)
    args = {"student": lambda: create("mlp_digits_student"), "unlabeled": rand(1, 5, 1, 8, 8), **kwargs}
    if args.get("teacher") == "model":
        args["teacher"] = create("mlp_digits_student")
    with pytest.raises(error, match=match):
        T.fit_co_training(args.pop("student"), (x, torch.arange(8)), epochs=1, progress=False, **args)


# ============================================================================ data distillation


def test_rescale_and_flip_by_hand() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # f(r, c) = 2r + c, so bilinear sampling is exact
    # x2 to 4x4: output pixel i samples (i + 0.5) / 2 - 0.5; the centre crop keeps i = 1, 2 -> 0.25, 0.75
    assert DF.rescale(x, 2.0)[0, 0].tolist() == [[0.75, 1.25], [1.75, 2.25]]
    big = torch.arange(16.0).view(1, 1, 4, 4)  # f(r, c) = 4r + c
    # x0.5 to 2x2 samples 0.5 and 2.5, then padded by 1 with the fill
    assert DF.rescale(big, 0.5, fill=-1.0)[0, 0].tolist() == [[-1, -1, -1, -1], [-1, 2.5, 4.5, -1],
                                                               [-1, 10.5, 12.5, -1], [-1, -1, -1, -1]]
    odd = DF.rescale(torch.ones(1, 1, 4, 4), 0.75)  # 3x3: the extra pixel of padding at the bottom / right
    assert odd[0, 0, 3].abs().sum() == 0 and odd[0, 0, :, 3].abs().sum() == 0 and odd[0, 0, 0, 0] == 1
    assert DF.rescale(big, 1.0) is big
    assert DF.hflip(big)[0, 0, 0].tolist() == [3, 2, 1, 0]
    assert torch.equal(DF.apply_transform(big, 2.0, True), DF.rescale(big, 2.0).flip(-1))
    assert DF.transform_grid((1.0, 0.5)) == [(1.0, False), (1.0, True), (0.5, False), (0.5, True)]
    assert DF.transform_grid((2,), flip=False) == [(2.0, False)]
    for bad in ((), (0.0,), (math.inf,), (True,)):
        with pytest.raises(ValueError, match="scale"):
            DF.transform_grid(bad)
    with pytest.raises(ValueError, match="scale"):
        DF.rescale(big, -1.0)


def test_mean_probabilities_and_pseudo_labels_by_hand() -> None:
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # softmaxes (1/2, 1/2) and (3/4, 1/4)
    probs = DF.mean_probabilities(logits)
    assert probs.flatten().tolist() == pytest.approx([0.625, 0.375])
    labels, scores, keep = DF.pseudo_labels(torch.tensor([[0.625, 0.375], [0.2, 0.8], [0.5, 0.5]]), 0.7)
    assert labels.tolist() == [0, 1, 0] and scores.tolist() == pytest.approx([0.625, 0.8, 0.5])
    assert keep.tolist() == [False, True, False]
    assert DF.pseudo_labels(probs)[2].tolist() == [True]
    with pytest.raises(ValueError, match="threshold"):
        DF.pseudo_labels(probs, 1.5)


def test_multi_transform_probs_average_every_transform() -> None:
    torch.manual_seed(0)
    model = create("cnn", widths=(4, 8, 8))
    x = rand(2, 3, 1, 8, 8)
    got = T.multi_transform_probs(model, x, scales=(1.0, 1.25), flip=True)
    model.eval()
    with torch.no_grad():
        zoom = F.interpolate(x, size=(10, 10), mode="bilinear", align_corners=False)[..., 1:9, 1:9]
        mirror = torch.arange(7, -1, -1)
        views = [x, x[..., mirror], zoom, zoom[..., mirror]]
        expected = sum(model(v).softmax(1) for v in views) / 4
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_mixed_loader_holds_a_fixed_share_of_labelled_examples() -> None:
    labeled = (torch.zeros(7, 1), torch.zeros(7, dtype=torch.long))
    pseudo = (torch.ones(20, 1), torch.ones(20, dtype=torch.long))
    loader = T.MixedLoader(labeled, pseudo, 5, labeled_fraction=0.6, seed=1)
    assert len(loader) == math.ceil(27 / 5)
    batches = list(loader)
    assert all(b.inputs.shape == (5, 1) and int((b.targets == 0).sum()) == 3 for b in batches)
    # each part walks a permutation: the 7 labelled ones all appear before any repeats
    loader.set_epoch(1)
    assert [b.targets.tolist() for b in loader] == [b.targets.tolist() for b in batches]
    with pytest.raises(ValueError, match="labeled_fraction"):
        T.MixedLoader(labeled, pseudo, 5, labeled_fraction=1.0)


def test_data_distillation_student_minimises_ce_on_labels_and_ensembled_pseudo_labels(digits: tuple) -> None:
    x, y, val = digits
    torch.manual_seed(0)
    teacher = create("cnn_digits_student")
    before = [p.detach().clone() for p in teacher.parameters()]
    seen: dict = {}
    real_fit = T.fit

    def spy(d: distill.Distiller, loader: object, *args: object, **kwargs: object) -> distill.train.FitResult:
        seen.update(d=d, loader=loader)
        return real_fit(d, loader, *args, **kwargs)

    unlabeled = x[40:100]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "fit", spy)
        result = T.fit_data_distillation(create("mlp_digits_student"), InMemoryLoader(x[:40], y[:40], 10, seed=0), val,
                                         unlabeled=unlabeled, teacher=teacher, epochs=3, threshold=0.11,
                                         scales=(1.0, 0.75), progress=False, lr=0.1)
    assert result.teacher_result is None
    expected = T.multi_transform_probs(teacher, unlabeled, scales=(1.0, 0.75), flip=True)
    assert torch.equal(result.pseudo_labels, expected.argmax(1))
    assert torch.equal(result.pseudo_keep, expected.max(1).values >= 0.11)
    loader = seen["loader"]
    assert torch.equal(loader.parts[1][0], unlabeled[result.pseudo_keep])
    assert torch.equal(loader.parts[1][1], result.pseudo_labels[result.pseudo_keep])
    assert loader.shares == (6, 4)
    batch = next(iter(loader))
    out = seen["d"](batch)
    with torch.no_grad():
        manual = F.cross_entropy(seen["d"].student(batch.inputs), batch.targets)
    assert out.total.item() == pytest.approx(manual.item(), rel=1e-6)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # the teacher is never trained


def test_data_distillation_trains_its_teacher_when_none_is_given(digits: tuple, tmp_path: object) -> None:
    x, y, val = digits
    result = T.fit_data_distillation(lambda: create("cnn_digits_student"), InMemoryLoader(x[:40], y[:40], 10, seed=0),
                                     val, unlabeled=x[40:80], epochs=3, teacher_epochs=2, progress=False, lr=0.1,
                                     run_dir=tmp_path)
    assert len(result.teacher_result.history) == 2 and len(result.history) == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert (tmp_path / "teacher" / "metrics.jsonl").is_file() and (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.parametrize("kwargs,match", [
    ({"unlabeled": None}, "unlabeled"),
    ({"unlabeled": torch.zeros(4, 1, 4, 4)}, "unlabeled"),
    ({"scales": (0.0,)}, "scale"),
    ({"threshold": 2.0}, "threshold"),
    ({"labeled_fraction": 1.0}, "labeled_fraction"),
    ({"teacher_epochs": 0}, "teacher_epochs"),
    ({"resume": True}, "resume=True needs run_dir"),
])
def test_data_distillation_rejects_bad_arguments_before_training(kwargs: dict, match: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _no_training(monkeypatch)
    x = rand(0, 8, 1, 8, 8)
    args = {"unlabeled": rand(1, 5, 1, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        T.fit_data_distillation(create("mlp_digits_student"), (x, torch.arange(8)), epochs=1, **args)


def test_data_distillation_says_when_no_pseudo_label_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    x = rand(0, 8, 1, 8, 8)
    monkeypatch.setattr(T, "fit", lambda *a, **k: pytest.fail("the student was trained"))
    with pytest.raises(ValueError, match="no pseudo-label"):
        T.fit_data_distillation(create("mlp_digits_student"), (x, torch.arange(8)), unlabeled=x, epochs=1,
                                teacher=create("mlp_digits_student"), threshold=1.0)


# ============================================================================ registry


def test_the_four_strategies_are_registered_with_their_papers() -> None:
    names = {i.name for i in list_strategies("ensemble")}
    assert {"model_compression", "cmm", "co_training", "data_distillation"} <= names
    assert strategy_info("model_compression").fn is T.fit_model_compression
    assert strategy_info("cmm").paper.year == 1997 and strategy_info("cmm").paper.authors == "P. Domingos"
    assert strategy_info("co_training").paper.venue == "COLT"
    assert strategy_info("data_distillation").paper.arxiv == "1712.04440"
    assert strategy_info("model_compression").summary.startswith("Model compression")


@pytest.mark.parametrize("strategy", ["model_compression", "data_distillation"])
def test_transfer_strategies_resume_to_the_same_student(strategy: str, tmp_path) -> None:
    """The transfer set (or the pseudo-labels) is a function of the seed, the data and the teacher: a
    run stopped in the student's second epoch and resumed rebuilds it and ends with the weights of the
    uninterrupted run."""
    data = distill.data.get_dataset("digits", split="train")
    x, y = data.inputs[:60], data.targets[:60]

    def run(run_dir, **kw):
        torch.manual_seed(0)
        student = create("mlp_digits_student")
        common = {"epochs": 3, "run_dir": run_dir, "progress": False, "lr": 0.05, **kw}
        if strategy == "model_compression":
            torch.manual_seed(1)
            teacher = create("mlp_digits_student")
            T.fit_model_compression(student, (x, y), teacher=teacher, multiplier=2, **common)
        else:
            T.fit_data_distillation(student, (x[:30], y[:30]), unlabeled=x[30:], teacher_epochs=2, threshold=0.0,
                                    scales=(1.0,), flip=False, **common)
        return student

    whole = run(tmp_path / "whole")
    with pytest.raises(Interrupted):  # after the student's 2nd epoch (data distillation: the teacher's 2 first)
        run(tmp_path / "cut", on_epoch_end=interrupt_after(2 if strategy == "model_compression" else 4))
    resumed = run(tmp_path / "cut", resume=True)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
