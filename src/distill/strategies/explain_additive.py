"""Global additive explanations: a network distilled into a sum of per-feature shape functions.

Paper: S. Tan, R. Caruana, G. Hooker, P. Koch, A. Gordo, "Learning Global Additive Explanations for
Neural Nets Using Model Distillation", 2018, arXiv 1801.08640 (code: github.com/shftan/distilled_additive_explanations).

The student :math:`g(x) = \\beta_0 + \\sum_j h_j(x_j)` is fitted to the teacher's outputs (its logits) by
squared error; each shape function :math:`h_j` is the explanation of feature ``j`` (plotted against
``x_j``), and the fit's *fidelity* (RMSE, R² to the teacher's outputs on held-out data) says how much of
the teacher an additive explanation can tell. The paper's students are splines (its "SAS") and bagged
additive boosted trees (its "SAT"); both are here:

* ``"spline"``: cubic B-splines per feature with knots at the feature's quantiles, fitted by ridge least
  squares in closed form (:func:`distill.functional.ridge_fit`): :class:`AdditiveSplineModel`;
* ``"trees"``: cyclic gradient boosting of shallow single-feature regression trees (scikit-learn's
  ``DecisionTreeRegressor``, every output at once), averaged over bootstrap bags, then stored as one step
  function per feature: :class:`AdditiveStepModel`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.data.loader import in_memory_tensors
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.registry import register_strategy
from distill.strategies.transfer import _logits_over
from distill.train.loop import FitResult

__all__ = ["GLOBAL_ADDITIVE", "STUDENTS", "AdditiveExplanationResult", "AdditiveSplineModel", "AdditiveStepModel",
           "fit_additive_explanation"]

STUDENTS = ("spline", "trees")

GLOBAL_ADDITIVE = Paper("Learning Global Additive Explanations for Neural Nets Using Model Distillation",
                        "S. Tan, R. Caruana, G. Hooker, P. Koch, A. Gordo", 2018, "1801.08640", None)


class AdditiveSplineModel(nn.Module):
    """:math:`g(x) = \\beta_0 + \\sum_j h_j(x_j)`, each :math:`h_j` a B-spline of ``degree`` on ``knots[j]``.

    Args:
        knots: ``(D, M)`` one knot vector per feature (:func:`distill.functional.clamped_knots`).
        centre: ``(D, P)`` the training mean of each feature's basis (``P = M − degree − 1``), subtracted so
            that every shape function has mean 0 on the training data and ``β₀`` is the mean output.
        num_outputs: ``K``, the outputs explained (the teacher's logits).
    """

    def __init__(self, knots: Tensor, centre: Tensor, num_outputs: int, degree: int = 3) -> None:
        super().__init__()
        self.degree = degree
        self.register_buffer("knots", knots.double())
        self.register_buffer("centre", centre.double())
        d, p = centre.shape
        self.coef = nn.Parameter(torch.zeros(d, p, num_outputs, dtype=torch.float64))
        self.intercept = nn.Parameter(torch.zeros(num_outputs, dtype=torch.float64))

    def basis(self, x: Tensor) -> Tensor:
        """Centred basis ``(B, D, P)`` of the inputs ``(B, D)`` (or ``(B, ...)``, flattened)."""
        x = x.flatten(1).double()
        if x.shape[1] != self.knots.shape[0]:
            raise ValueError(f"the additive model explains {self.knots.shape[0]} features, got inputs with "
                             f"{x.shape[1]} (shape {tuple(x.shape)})")
        cols = [DF.bspline_basis(x[:, j], self.knots[j], self.degree) for j in range(x.shape[1])]
        return torch.stack(cols, 1) - self.centre

    def shapes(self, x: Tensor) -> Tensor:
        """Every shape function at the inputs: ``h_j(x_j)`` ``(B, D, K)``."""
        return torch.einsum("bdp,dpk->bdk", self.basis(x), self.coef)

    def forward(self, x: Tensor) -> Tensor:
        """Inputs ``(B, D)`` → the explained outputs ``(B, K)`` (float64)."""
        return self.intercept + self.shapes(x).sum(1)


class AdditiveStepModel(nn.Module):
    """:math:`g(x) = \\beta_0 + \\sum_j h_j(x_j)`, each :math:`h_j` a step function: with the sorted cuts
    :math:`c_1 < \\dots < c_m` of feature ``j``, ``values[j, i]`` on the ``i``-th of the intervals
    :math:`(-\\infty, c_1], (c_1, c_2], \\dots, (c_m, \\infty)` (a scikit-learn tree sends ``x <= t`` left).

    Args:
        edges: per feature, the sorted split thresholds (lists of length ``E_j``).
        values: per feature, ``(E_j + 1, K)`` the shape function's value on each interval.
        intercept: ``(K,)``.
    """

    def __init__(self, edges: list[Tensor], values: list[Tensor], intercept: Tensor) -> None:
        super().__init__()
        width = max(1, max(len(e) for e in edges))
        pad_e = torch.full((len(edges), width), float("inf"), dtype=torch.float64)
        pad_v = torch.zeros(len(edges), width + 1, intercept.numel(), dtype=torch.float64)
        for j, (e, v) in enumerate(zip(edges, values)):
            pad_e[j, :len(e)] = e
            pad_v[j, :len(v)] = v
        self.register_buffer("edges", pad_e)
        self.register_buffer("values", pad_v)
        self.register_buffer("intercept", intercept.double())

    def shapes(self, x: Tensor) -> Tensor:
        """Every shape function at the inputs ``(B, D)``: ``(B, D, K)``. A tree sends ``x <= t`` left, so the
        interval index is the number of edges strictly below ``x``."""
        x = x.flatten(1).double()
        if x.shape[1] != self.edges.shape[0]:
            raise ValueError(f"the additive model explains {self.edges.shape[0]} features, got inputs with "
                             f"{x.shape[1]} (shape {tuple(x.shape)})")
        idx = torch.searchsorted(self.edges, x.T.contiguous(), right=False)  # (D, B): edges < x
        return torch.stack([self.values[j, idx[j]] for j in range(x.shape[1])], 1)

    def forward(self, x: Tensor) -> Tensor:
        """Inputs ``(B, D)`` → the explained outputs ``(B, K)`` (float64)."""
        return self.intercept + self.shapes(x).sum(1)


def _boosted_steps(x: Tensor, target: Tensor, rounds: int, leaves: int, learning_rate: float, bags: int,
                   seed: int, progress: bool = False) -> AdditiveStepModel:
    """Bagged cyclic boosting of single-feature trees on ``x`` ``(N, D)`` → ``target`` ``(N, K)``, as step functions
    centred on the training data (mean 0 each), the intercept the mean target."""
    from sklearn.tree import DecisionTreeRegressor

    xn, zn = x.double().numpy(), (target - target.mean(0)).double().numpy()
    n, d = xn.shape
    rng = np.random.default_rng(seed)
    trees: list[list[Any]] = [[] for _ in range(d)]
    with StepProgress(progress, "additive trees", bags * rounds) as bar:
        for b in range(bags):
            rows = rng.integers(0, n, n) if bags > 1 else np.arange(n)
            residual = zn[rows].copy()
            for r in range(rounds):
                for j in range(d):
                    tree = DecisionTreeRegressor(max_leaf_nodes=leaves).fit(xn[rows, j:j + 1], residual)
                    residual -= learning_rate * tree.predict(xn[rows, j:j + 1]).reshape(residual.shape)
                    trees[j].append(tree)
                bar.advance(f"bag {b + 1}/{bags} round {r + 1}")
    edges, values = [], []
    for j in range(d):
        cuts = np.unique(np.concatenate([t.tree_.threshold[t.tree_.feature >= 0] for t in trees[j]] + [np.empty(0)]))
        # intervals (-inf, c_1], (c_1, c_2], ..., (c_m, inf) (a tree sends x <= t left), each stood for by a point
        # inside it (not a cut itself: scikit-learn compares in float32, where a cut may round across)
        reps = (np.concatenate([cuts[:1] - 1.0, (cuts[1:] + cuts[:-1]) / 2, cuts[-1:] + 1.0]) if len(cuts)
                else np.array([0.0]))
        h = sum(t.predict(reps[:, None]).reshape(len(reps), -1) for t in trees[j]) * learning_rate / bags
        h = h - (sum(t.predict(xn[:, j:j + 1]).reshape(n, -1) for t in trees[j]) * learning_rate / bags).mean(0)
        edges.append(torch.from_numpy(cuts))
        values.append(torch.from_numpy(np.asarray(h, dtype=np.float64).reshape(len(reps), -1)))
    return AdditiveStepModel(edges, values, target.mean(0))


@dataclass
class AdditiveExplanationResult(FitResult):
    """The fitted :class:`AdditiveSplineModel` (or :class:`AdditiveStepModel`) and its fidelity to the teacher.

    ``fidelity_train`` / ``fidelity_val``: ``{"rmse", "r2"}`` of the student's outputs against the teacher's
    logits; ``agreement``: % of validation samples where the argmaxes agree; ``last_acc``: the student's
    top-1 (%) on the validation labels (the teacher's is ``teacher_acc``). ``importance[j]``: the standard
    deviation of ``h_j`` over the training data, summed over the outputs.
    """

    model: AdditiveSplineModel | AdditiveStepModel | None = None
    fidelity_train: dict[str, float] = field(default_factory=dict)
    fidelity_val: dict[str, float] = field(default_factory=dict)
    agreement: float | None = None
    teacher_acc: float | None = None
    importance: list[float] = field(default_factory=list)


def _accuracy(logits: Tensor, y: Tensor | None) -> float | None:
    return None if y is None else 100.0 * float((logits.argmax(1) == y).double().mean())


@register_strategy("global_additive_explanation", "explanation", GLOBAL_ADDITIVE)
def fit_additive_explanation(
    student: Any,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int | None = None,
    interior_knots: int = 8,
    degree: int = 3,
    ridge: float = 1e-3,
    rounds: int = 100,
    leaves: int = 3,
    learning_rate: float = 0.1,
    bags: int = 1,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
) -> AdditiveExplanationResult:
    """Distil ``teacher`` into an additive spline model fitted to its logits on the training inputs.

    Args:
        student: ``"spline"`` (the paper's spline student) or ``"trees"`` (its bagged additive boosted trees).
        train_loader / val_loader: in-memory data (an ``InMemoryLoader``, ``TensorData`` or ``(x, y)``);
            tabular inputs ``(N, D)`` (any shape is flattened to ``D`` features).
        teacher: the trained network explained (run in eval mode).
        epochs: unused (the fit is closed-form); accepted for the strategy convention, must be ``None`` or 1.
        interior_knots, degree: each feature's cubic B-spline has ``interior_knots`` knots at its
            quantiles (ours: the paper's splines are penalised regression splines whose settings could not
            be read here).
        ridge: the L2 penalty λ of the spline least-squares fit (ours).
        rounds, leaves, learning_rate, bags: the tree student's boosting rounds (each visits every feature
            once), leaves per tree, shrinkage and bootstrap bags (ours; the paper used a proprietary
            implementation whose settings could not be read here).
        seed: the bags' bootstrap draws. progress: a bar over the tree student's rounds. run_dir: accepted
            for the convention; nothing is written.
    """
    if student not in STUDENTS:
        raise ValueError(f"student must be one of {STUDENTS}; got {student!r}")
    for name, v in (("rounds", rounds), ("leaves", leaves), ("bags", bags)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "leaves" else 1):
            raise ValueError(f"{name} must be an integer >= {2 if name == 'leaves' else 1}, got {v!r}")
    if not 0 < learning_rate <= 1:
        raise ValueError(f"learning_rate must be in (0, 1], got {learning_rate!r}")
    if epochs not in (None, 1):
        raise ValueError(f"the spline fit is closed-form: epochs must be None (or 1), got {epochs!r}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be the trained network to explain (an nn.Module), got {type(teacher).__name__}")
    if isinstance(interior_knots, bool) or not isinstance(interior_knots, int) or interior_knots < 0:
        raise ValueError(f"interior_knots must be an integer >= 0, got {interior_knots!r}")
    if isinstance(degree, bool) or not isinstance(degree, int) or not 0 <= degree <= 5:
        raise ValueError(f"degree must be an integer in [0, 5], got {degree!r}")
    x, y, _ = in_memory_tensors(train_loader, "global_additive_explanation")
    flat = x.flatten(1).double()
    target = _logits_over(teacher, x).double()
    if student == "trees":
        model: AdditiveSplineModel | AdditiveStepModel = _boosted_steps(flat, target, rounds, leaves, learning_rate,
                                                                        bags, seed, progress)
    else:
        knots = torch.stack([DF.clamped_knots(flat[:, j], interior_knots, degree) for j in range(flat.shape[1])])
        raw = torch.stack([DF.bspline_basis(flat[:, j], knots[j], degree) for j in range(flat.shape[1])], 1)
        model = AdditiveSplineModel(knots, raw.mean(0), target.shape[1], degree)
        design = model.basis(x).flatten(1)  # (N, D·P), centred: the intercept is the mean output, unpenalised
        coef = DF.ridge_fit(design, target - target.mean(0), ridge)
        with torch.no_grad():
            model.coef.copy_(coef.reshape(model.coef.shape))
            model.intercept.copy_(target.mean(0))
    with torch.no_grad():
        train_out = model(x)
        importance = model.shapes(x).std(0).sum(1).tolist()
    result = AdditiveExplanationResult(model=model, fidelity_train=DF.fidelity(train_out, target),
                                       importance=importance)
    if val_loader is not None:
        xv, yv, _ = in_memory_tensors(val_loader, "global_additive_explanation")
        tv = _logits_over(teacher, xv).double()
        with torch.no_grad():
            sv = model(xv)
        result.fidelity_val = DF.fidelity(sv, tv)
        result.agreement = 100.0 * float((sv.argmax(1) == tv.argmax(1)).double().mean())
        result.last_acc = result.best_acc = _accuracy(sv, yv)
        result.teacher_acc = _accuracy(tv, yv)
    result.history = [{"epoch": 0, **{f"train_{k}": v for k, v in result.fidelity_train.items()},
                       **{f"val_{k}": v for k, v in result.fidelity_val.items()},
                       "val_student_acc": result.last_acc, "val_teacher_acc": result.teacher_acc,
                       "val_agreement": result.agreement}]
    return result
