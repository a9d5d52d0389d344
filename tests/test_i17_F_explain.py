"""Issue 17 (F): global additive explanations (B-splines by ridge least squares) and YASENN (layer-wise
boosted trees partitioning activation sequences), checked against scipy / numpy and hand-built teachers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.interpolate import BSpline
from torch import nn

import distill.functional as DF
from distill.models import create
from distill.strategies.explain_additive import fit_additive_explanation
from distill.strategies.explain_yasenn import fit_yasenn, partition_codes

torch.set_num_threads(1)


@pytest.mark.parametrize("degree, interior", [(3, 4), (1, 2), (2, 0)])
def test_bspline_basis_matches_scipy(degree: int, interior: int) -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=40))
    knots = DF.clamped_knots(x, interior, degree)
    assert knots.shape == (interior + 2 * degree + 2,)
    ours = DF.bspline_basis(x, knots, degree)
    ref = BSpline.design_matrix(x.numpy(), knots.numpy(), degree).toarray()
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_subnormal=False), min_size=3, max_size=20), st.integers(0, 5))
def test_bspline_basis_is_a_partition_of_unity(values: list[float], interior: int) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    basis = DF.bspline_basis(x, DF.clamped_knots(x, interior, 3), 3)
    assert torch.allclose(basis.sum(1), torch.ones(len(values), dtype=torch.float64)) and bool((basis >= 0).all())


def test_ridge_fit_and_fidelity_match_numpy() -> None:
    rng = np.random.default_rng(1)
    a, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 2))
    lam = 0.7
    expected = np.linalg.solve(a.T @ a + lam * np.eye(5), a.T @ y)
    np.testing.assert_allclose(DF.ridge_fit(torch.from_numpy(a), torch.from_numpy(y), lam).numpy(), expected)
    np.testing.assert_allclose(DF.ridge_fit(torch.from_numpy(a), torch.from_numpy(y), 0.0).numpy(),
                               np.linalg.lstsq(a, y, rcond=None)[0], atol=1e-10)
    s, t = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[1.0], [3.0], [5.0]])
    fid = DF.fidelity(s, t)  # sse = 0 + 1 + 1 = 2; sst = 4 + 0 + 4 = 8
    assert fid["rmse"] == pytest.approx((2 / 3) ** 0.5) and fid["r2"] == pytest.approx(1 - 2 / 8)


class _Additive(nn.Module):
    """Logits [x0³ − 2·x1, 0.5·x1² + x2]: cubic polynomials per feature, inside the cubic spline space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0] ** 3 - 2 * x[:, 1], 0.5 * x[:, 1] ** 2 + x[:, 2]], 1)


class _Product(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0] * x[:, 1], -x[:, 0] * x[:, 1]], 1)


def _tabular(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1
    return x, (x[:, 0] > 0).long()


def test_additive_explanation_recovers_an_additive_teacher_and_not_a_product() -> None:
    (x, y), (xv, yv) = _tabular(), _tabular(80, seed=1)
    res = fit_additive_explanation("spline", (x, y), (xv, yv), teacher=_Additive(), interior_knots=3, ridge=1e-9)
    assert res.fidelity_train["r2"] > 1 - 1e-9 and res.fidelity_val["r2"] > 1 - 1e-3  # validation points beyond the training range are clamped
    shapes = res.model.shapes(x)  # (N, D, K): h_j equals feature j's polynomial minus its training mean
    want0 = x[:, 0] ** 3 - (x[:, 0] ** 3).mean()
    want1 = 0.5 * x[:, 1] ** 2 - (0.5 * x[:, 1] ** 2).mean()
    assert torch.allclose(shapes[:, 0, 0], want0, atol=1e-6) and torch.allclose(shapes[:, 1, 1], want1, atol=1e-6)
    assert torch.allclose(shapes[:, 2, 0], torch.zeros(len(x), dtype=torch.float64), atol=1e-6)
    # importance: the spread of each shape summed over outputs: x0 only in logit 0, x2 only (linearly) in logit 1
    assert res.importance[0] == pytest.approx(float((x[:, 0] ** 3).std()), rel=1e-5)
    assert res.importance[2] == pytest.approx(float(x[:, 2].std()), rel=1e-5)
    flat = fit_additive_explanation("spline", (x, y), (xv, yv), teacher=_Product(), interior_knots=3, ridge=1e-9)
    assert flat.fidelity_val["r2"] < 0.2  # x0·x1 has no additive part on a symmetric box
    with pytest.raises(ValueError, match="student must be one of"):
        fit_additive_explanation("gam", (x, y), teacher=_Additive())


def test_partition_codes_by_hand() -> None:
    layer1 = np.array([[1, 3], [1, 3], [2, 3], [1, 4]])
    layer2 = np.array([[5], [6], [5], [5]])
    ids, table = partition_codes([layer1, layer2])
    assert ids.tolist() == [0, 1, 2, 3] and table[(1, 3, 6)] == 1
    ids2, _ = partition_codes([np.array([[1, 3], [9, 9]]), np.array([[5], [5]])], table)
    assert ids2.tolist() == [0, -1] and len(table) == 4
    ids3, table3 = partition_codes([np.array([[1], [1], [2]]), np.array([[7], [7], [7]])])
    assert ids3.tolist() == [0, 0, 1] and len(table3) == 2


def test_yasenn_partitions_a_threshold_teacher_faithfully() -> None:
    teacher = create("mlp", num_classes=2, in_features=3, hidden=(4, 4)).double()
    with torch.no_grad():  # hidden1 = relu(±4·x0), hidden2 = hidden1 copied: class 1 exactly when x0 > 0
        for layer in (teacher.hidden1, teacher.hidden2):
            lin = next(m for m in layer.modules() if isinstance(m, nn.Linear))
            lin.weight.zero_(), lin.bias.zero_()
        first = next(m for m in teacher.hidden1.modules() if isinstance(m, nn.Linear))
        first.weight[0, 0], first.weight[1, 0] = 4.0, -4.0
        second = next(m for m in teacher.hidden2.modules() if isinstance(m, nn.Linear))
        second.weight[0, 0], second.weight[1, 1] = 1.0, 1.0
        teacher.fc.weight.zero_(), teacher.fc.bias.zero_()
        teacher.fc.weight[1, 0], teacher.fc.weight[0, 1] = 1.0, 1.0
    (x, y), (xv, yv) = _tabular(), _tabular(80, seed=1)
    for data in (x, xv):  # a gap around the teacher's threshold x0 = 0: the trees' split cannot fall inside it wrongly
        data[:, 0] = data[:, 0].sign() * (0.2 + 0.8 * data[:, 0].abs())
    res = fit_yasenn("gbdt", (x, y), (xv, yv), teacher=teacher, n_trees=1, depth=1)
    assert res.layers == ["hidden1", "hidden2"] and res.layer_agreement_val == [100.0, 100.0]
    assert res.num_partitions == 2 and res.partition_fidelity_train == 100.0 and res.partition_fidelity_val == 100.0
    assert res.val_coverage == 100.0 and res.teacher_acc == 100.0
    acc, rules = res.describe(int(res.ids[0]), ["a", "b", "c"], max_depth=1)
    assert acc == 100.0 and "a <=" in rules
    with pytest.raises(ValueError, match="unknown partition 7"):
        res.describe(7)


class _Steps(nn.Module):
    """Logits [2·[x0 > 0.3] − [x1 <= −0.2], 0.5·[x2 > 0]]: additive steps, which single-feature trees represent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([2.0 * (x[:, 0] > 0.3) - 1.0 * (x[:, 1] <= -0.2), 0.5 * (x[:, 2] > 0)], 1).double()


def test_tree_student_recovers_additive_steps() -> None:
    (x, y), (xv, yv) = _tabular(), _tabular(80, seed=1)
    res = fit_additive_explanation("trees", (x, y), (xv, yv), teacher=_Steps(), rounds=20, leaves=2, learning_rate=1.0)
    # backfitting converges to the steps (a finite sample's feature correlations leave a vanishing residual)
    assert res.fidelity_train["r2"] > 1 - 1e-9 and res.fidelity_val["r2"] > 0.97  # a cut lands between samples
    shapes = res.model.shapes(x)
    step0 = 2.0 * (x[:, 0] > 0.3).double()
    step1 = -1.0 * (x[:, 1] <= -0.2).double()
    assert torch.allclose(shapes[:, 0, 0], step0 - step0.mean(), atol=1e-6)
    assert torch.allclose(shapes[:, 1, 0], step1 - step1.mean(), atol=1e-6)
    assert torch.allclose(shapes[:, 0, 1], torch.zeros(len(x), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(res.model(x)[:, 1], _Steps()(x)[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match="leaves must be an integer >= 2"):
        fit_additive_explanation("trees", (x, y), teacher=_Steps(), leaves=1)
