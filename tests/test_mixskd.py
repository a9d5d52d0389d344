"""MixSKD: mixup, the mixup cross-entropy, every term of the objective against explicit loops, the
gradient blocks (detached teachers of the logit terms, the discriminator's minimax game), the
mixing loader, short runs on digits with two model families, and argument errors before training.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import Distiller
from distill import functional as DF
from distill.batch import Batch
from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.models import create
from distill.strategies.mixskd import MixedBatch, MixSKD, MixupLoader, fit_mixskd
from distill.strategies.registry import strategy_info
from distill.strategies.self_distill import SelfDistillResult

SETTINGS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------------------- helpers


def log_softmax_row(z: list[float], T: float = 1.0) -> list[float]:
    m = max(v / T for v in z)
    s = math.log(sum(math.exp(v / T - m) for v in z))
    return [v / T - m - s for v in z]


def kl_by_hand(student: list[list[float]], teacher: list[list[float]], T: float) -> float:
    """T² · mean over rows of Σ_k p_k (log p_k − log q_k), p the teacher's, q the student's."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        lp, lq = log_softmax_row(t_row, T), log_softmax_row(s_row, T)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    return T * T * total / len(student)


def ce_by_hand(z: list[list[float]], y: list[int]) -> float:
    return -sum(log_softmax_row(row)[label] for row, label in zip(z, y)) / len(z)


def mix_rows(rows: list, lam: float, perm: list[int]) -> list:
    return [[lam * a + (1 - lam) * b for a, b in zip(rows[i], rows[perm[i]])] for i in range(len(rows))]


# ---------------------------------------------------------------------------------------- functional


def test_mixup_mixes_each_row_with_its_partner():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [-1.0, 0.0]])
    perm = torch.tensor([2, 0, 1])
    out = DF.mixup(x, 0.25, perm)
    assert torch.allclose(out[0], torch.tensor([0.25 * 1 + 0.75 * -1, 0.25 * 2 + 0.75 * 0]))
    assert torch.allclose(out[1], torch.tensor([0.25 * 3 + 0.75 * 1, 0.25 * 5 + 0.75 * 2]))
    with pytest.raises(ValueError, match="lam must be"):
        DF.mixup(x, 1.5, perm)
    with pytest.raises(ValueError, match="permutation"):
        DF.mixup(x, 0.5, torch.tensor([0, 1]))


def test_mixup_cross_entropy_weighs_both_labels():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y, perm, lam = torch.tensor([0, 2]), torch.tensor([1, 0]), 0.7
    rows = z.tolist()
    expected = lam * ce_by_hand(rows, [0, 2]) + (1 - lam) * ce_by_hand(rows, [2, 0])
    assert float(DF.mixup_cross_entropy(z, y, lam, perm)) == pytest.approx(expected, rel=1e-5)


def test_mixskd_parts_equal_explicit_loops():
    g = torch.Generator().manual_seed(0)
    b, c, lam, T = 3, 4, 0.6, 2.0
    perm = torch.tensor([1, 2, 0])
    y = torch.tensor([0, 3, 1])
    logits = [torch.randn(b, c, generator=g) for _ in range(2)]          # branch, backbone
    mixed = [torch.randn(b, c, generator=g) for _ in range(2)]
    feats = [torch.randn(b, 2, generator=g) for _ in range(2)]
    mixed_feats = [torch.randn(b, 2, generator=g) for _ in range(2)]
    s, s_hat = torch.randn(b, c, generator=g), torch.randn(b, c, generator=g)
    parts = DF.mixskd_parts(logits, mixed, feats, mixed_feats, s, s_hat, y, lam, perm, T)

    P, Y = perm.tolist(), y.tolist()
    Yp = [Y[p] for p in P]

    def mix_ce(z: torch.Tensor) -> float:
        return lam * ce_by_hand(z.tolist(), Y) + (1 - lam) * ce_by_hand(z.tolist(), Yp)

    assert float(parts["ce"]) == pytest.approx(sum(ce_by_hand(z.tolist(), Y) for z in logits), rel=1e-5)
    assert float(parts["mixup_ce"]) == pytest.approx(sum(mix_ce(z) for z in [*mixed, s, s_hat]), rel=1e-5)
    feature = 0.0
    for f, m in zip(feats, mixed_feats):
        interp = mix_rows(f.tolist(), lam, P)
        feature += sum((a - b_) ** 2 for r, q in zip(interp, m.tolist()) for a, b_ in zip(r, q)) / (b * 2)
    assert float(parts["feature"]) == pytest.approx(feature, rel=1e-5)
    zi = [mix_rows(z.tolist(), lam, P) for z in logits]
    zm = [z.tolist() for z in mixed]
    logit = (kl_by_hand(zi[0], zm[0], T) + kl_by_hand(zm[0], zi[0], T)      # the branch: both directions
             + kl_by_hand(zi[1], s_hat.tolist(), T) + kl_by_hand(zm[1], s.tolist(), T))  # backbone ← self-teacher
    assert float(parts["logit"]) == pytest.approx(logit, rel=1e-5)


def test_logit_terms_detach_their_teachers_and_the_feature_term_is_mutual():
    g = torch.Generator().manual_seed(1)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(True)

    logits, mixed = [leaf(4, 3), leaf(4, 3)], [leaf(4, 3), leaf(4, 3)]
    feats, mixed_feats = [leaf(4, 2, 2, 2), leaf(4, 2, 2, 2)], [leaf(4, 2, 2, 2), leaf(4, 2, 2, 2)]
    s, s_hat = leaf(4, 3), leaf(4, 3)
    parts = DF.mixskd_parts(logits, mixed, feats, mixed_feats, s, s_hat, torch.tensor([0, 1, 2, 0]), 0.3,
                            torch.tensor([3, 2, 1, 0]), 3.0)
    parts["logit"].backward(retain_graph=True)
    assert s.grad is None and s_hat.grad is None  # the self-teacher teaches the backbone, never learns from it
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in [*logits, *mixed])
    assert all(f.grad is None for f in [*feats, *mixed_feats])
    parts["feature"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in [*feats, *mixed_feats])


@SETTINGS
@given(st.floats(-4, 4), st.floats(-4, 4))
def test_discriminator_loss_is_the_binary_cross_entropy(r, f):
    expected = -math.log(1 / (1 + math.exp(-r))) - math.log(1 - 1 / (1 + math.exp(-f)))
    got = DF.mixskd_discriminator_loss(torch.tensor([r], dtype=torch.float64), torch.tensor([f], dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@SETTINGS
@given(st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_mixing_identical_pairs_changes_nothing(lam, seed):
    # a row mixed with itself is itself: the interpolation of a constant batch is the batch
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed)).double()
    assert torch.allclose(DF.mixup(x, lam, torch.arange(5)), x)


# ---------------------------------------------------------------------------------------- loader


def test_mixup_loader_appends_each_batch_mixed_with_a_partner():
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    base = InMemoryLoader(x, y, 4, shuffle=False, return_index=True)
    torch.manual_seed(0)
    batches = list(MixupLoader(base, alpha=0.4))
    assert len(batches) == len(MixupLoader(base)) == 2
    b = batches[1]
    assert isinstance(b, MixedBatch) and b.inputs.shape == (8, 1, 4, 4) and len(b) == 4
    assert torch.equal(b.inputs[:4], x[4:]) and torch.equal(b.targets, y[4:]) and b.index.tolist() == [4, 5, 6, 7]
    assert 0.0 <= b.lam <= 1.0 and sorted(b.perm.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(b.inputs[4:], b.lam * x[4:] + (1 - b.lam) * x[4:][b.perm])
    moved = b.to("cpu")
    assert isinstance(moved, MixedBatch) and moved.lam == b.lam and torch.equal(moved.perm, b.perm)


# ---------------------------------------------------------------------------------------- the method


def _mixed_batch(n: int = 6, seed: int = 0) -> MixedBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    perm = torch.randperm(n, generator=g)
    return MixedBatch(torch.cat([x, DF.mixup(x, 0.3, perm)]), torch.arange(n) % 10, lam=0.3, perm=perm)


def test_the_discriminators_play_against_the_network_in_minimax_mode():
    torch.manual_seed(0)
    model = create("cnn", widths=(4, 8, 8))
    method = MixSKD(adversarial="minimax")
    d = Distiller(model, None, {"mixskd": method})
    batch = _mixed_batch()
    d.prepare(batch)
    d.eval()  # BatchNorm in eval mode: both passes see the same network
    net_params = list(model.stage3.parameters())
    disc_params = list(method.discriminators.parameters())

    def grads() -> list[torch.Tensor]:
        out = d(batch)
        adv = method.parts(out.student, batch)["adversarial"]
        return list(torch.autograd.grad(adv, net_params + disc_params))

    minimax = grads()
    method.adversarial = "joint"
    joint = grads()
    k = len(net_params)
    # the discriminators minimise their loss either way; the network maximises it (minimax) or helps (joint)
    assert all(torch.allclose(a, b) for a, b in zip(minimax[k:], joint[k:]))
    assert all(torch.allclose(a, -b) for a, b in zip(minimax[:k], joint[:k]))
    assert any(a.abs().sum() > 0 for a in minimax[:k])


def test_the_method_trains_the_student_and_its_own_parts_only():
    torch.manual_seed(0)
    model = create("cnn_digits_student")
    method = MixSKD()
    d = Distiller(model, None, {"mixskd": method})
    batch = _mixed_batch()
    d.prepare(batch)
    out = d(batch)
    out.total.backward()
    owned = [*method.heads.parameters(), *method.self_teacher.parameters(), *method.discriminators.parameters()]
    assert all(p.grad is not None for p in owned)
    assert model.fc.weight.grad is not None and model.stage1.body[0].weight.grad is not None
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for p in owned)
    assert set(method.log_values()) == {"ce", "mixup_ce", "feature", "logit", "adversarial"}


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits():
    train, val = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    loader = InMemoryLoader(train.inputs[:320], train.targets[:320], 32, shuffle=True, seed=0, return_index=True)
    return loader, InMemoryLoader(val.inputs[:200], val.targets[:200], 200, shuffle=False)


CASES = {
    "cnn": (lambda: create("cnn_digits_student"), {}),
    "mlp": (lambda: create("mlp_digits_student"), {"exits": ["hidden1.pre"], "feature": "pool"}),
    "sequential": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 10)),
                   {"exits": ["1"], "feature": "3", "adversarial": "joint"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_short_run_on_digits_lowers_the_training_loss(digits, name):
    model, kwargs = CASES[name]
    torch.manual_seed(0)
    train, val = digits
    result = fit_mixskd(model(), train, val, epochs=4, progress=False, lr=0.02, schedule="constant", **kwargs)
    assert isinstance(result, SelfDistillResult)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    method = result.distiller.methods["mixskd"]
    assert set(result.exit_acc) == {*method.exits, "deepest", "ensemble"}
    assert result.exit_acc["deepest"] == pytest.approx(result.last_acc)
    assert "mixskd_adversarial" in result.history[-1]


def test_bad_arguments_fail_before_any_training(digits):
    train, _ = digits
    model = create("cnn_digits_student")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="teacher must be None"):
        fit_mixskd(model, train, epochs=1, teacher=create("cnn_digits_teacher"), progress=False)
    with pytest.raises(ValueError, match="alpha must be"):
        fit_mixskd(model, train, epochs=1, alpha=0.0, progress=False)
    with pytest.raises(ValueError, match="adversarial must be one of"):
        fit_mixskd(model, train, epochs=1, adversarial="gan", progress=False)
    with pytest.raises(ValueError, match="feature="):
        fit_mixskd(model, train, epochs=1, feature="", progress=False)
    with pytest.raises(ValueError, match="cannot also be an exit"):
        fit_mixskd(model, train, epochs=1, exits=["stage1", "stage3"], progress=False)
    with pytest.raises(ValueError, match="feature_weight must be"):
        fit_mixskd(model, train, epochs=1, feature_weight=-1.0, progress=False)
    with pytest.raises(ValueError, match="non-empty list"):
        fit_mixskd(model, train, epochs=1, exits=[], progress=False)
    with pytest.raises(ValueError, match="epochs must be"):
        fit_mixskd(model, train, epochs=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    d = Distiller(model, None, {"mixskd": MixSKD()})
    d.prepare(_mixed_batch())
    with pytest.raises(TypeError, match="MixupLoader"):
        d(Batch(torch.randn(4, 1, 8, 8), torch.arange(4)))


def test_registered_with_its_paper():
    info = strategy_info("mixskd")
    assert info.fn is fit_mixskd and info.family == "self" and info.paper.arxiv == "2208.05768"
