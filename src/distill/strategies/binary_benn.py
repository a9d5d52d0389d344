"""BENN: an ensemble of binary networks, by bagging or boosting, optionally distilled from a teacher.

Zhu, Dong, Su, "Binary Ensemble Neural Network: More Bits per Network or More Networks per Bit?",
CVPR 2019, arXiv 1806.07550. Each member is the student's architecture binarised by
:func:`distill.models.binary.binarize` (binary weights and, by default, binary activations, first
and last layers full precision) and trained by :func:`distill.fit`; the math of boosting and of the
combination rules is in :mod:`distill.functional.binary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.data.loader import InMemoryLoader
from distill.distiller import Distiller
from distill.methods.base import Paper
from distill.methods.logits import KD, CrossEntropy
from distill.models.binary import binarize, binary_layers
from distill.progress import StepProgress
from distill.strategies.chain import build_model, check_model_spec, check_stage_resume
from distill.strategies.registry import register_strategy
from distill.train.evaluate import evaluate
from distill.train.loop import FitResult, fit, seed_everything

__all__ = ["BENN_PAPER", "BENNResult", "BinaryEnsemble", "benn"]

BENN_PAPER = Paper("Binary Ensemble Neural Network: More Bits per Network or More Networks per Bit?",
                   "S. Zhu, X. Dong, H. Su", 2019, "1806.07550", "CVPR 2019")
BENN_MODES = ("bagging", "boosting")


class BinaryEnsemble(nn.Module):
    """The BENN: members' logits ``(M, B, K)`` combined by :func:`~distill.functional.benn_combine`;
    ``forward`` returns ``log(scores)`` ``(B, K)`` (clamped at 1e-12), so its argmax is the ensemble's vote."""

    def __init__(self, members: list[nn.Module], rule: str = "soft", alphas: list[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.rule = rule
        self.alphas = None if alphas is None else [float(a) for a in alphas]

    def forward(self, x: Tensor) -> Tensor:
        z = torch.stack([m(x) for m in self.members])
        return DF.benn_combine(z, self.rule, self.alphas).clamp_min(1e-12).log()


@dataclass
class BENNResult(FitResult):
    """The ensemble's result (``history``: one row per ensemble size ``k``, ``val_student_acc`` its
    accuracy) with every member's :class:`FitResult`, the members, their votes and accuracies."""

    members: list[FitResult] = field(default_factory=list)
    models: list[nn.Module] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    member_accs: list[float] = field(default_factory=list)
    ensemble: BinaryEnsemble | None = None


def _tensors(loader: Any) -> tuple[Tensor, Tensor, int]:
    x, y = getattr(loader, "inputs", None), getattr(loader, "targets", None)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("benn: train_loader must hold its samples as tensors .inputs/.targets (an InMemoryLoader): "
                         f"bagging and boosting resample them; got {type(loader).__name__}")
    return x, y, int(getattr(loader, "batch_size", 64))


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def _accuracy(model: nn.Module, loader: Any) -> float:
    return evaluate(SimpleNamespace(student=model), loader, with_teacher=False)["student_acc"]


@register_strategy("benn", "ensemble", BENN_PAPER)
def benn(student: Any, train_loader: Any, val_loader: Any = None, *, epochs: int, teacher: Any = None,
         members: int = 5, mode: str = "bagging", rule: str = "soft", activations: bool = True,
         kd_weight: float = 0.0, ce_weight: float = 1.0, T: float = 4.0, run_dir: str | Path | None = None,
         seed: int = 0, progress: bool = True, **fit_kwargs: Any) -> BENNResult:
    """Train ``members`` binary networks by bagging or boosting and combine them (BENN).

    * ``mode="bagging"``: member ``k`` trains on a bootstrap sample of the training set (``N`` draws
      with replacement); members vote with equal weight.
    * ``mode="boosting"`` (multi-class AdaBoost, SAMME): sample weights start at ``1/N``; member ``k``
      trains on ``N`` draws with probabilities ``w`` (boosting by resampling), its weighted training
      error ``err_k = sum_i w_i 1[h_k(x_i) != y_i]`` gives its vote
      ``alpha_k = log((1 - err_k)/err_k) + log(K - 1)`` and the weights become
      ``w_i exp(alpha_k 1[h_k(x_i) != y_i])`` renormalised. A member no better than chance
      (``alpha_k <= 0``) keeps a zero vote and the weights are reset to uniform.
    * ``rule``: ``"hard"`` (votes of the members' argmax) or ``"soft"`` (average of their softmax),
      each weighted by the votes (equal for bagging).

    With ``teacher`` and ``kd_weight > 0`` each member minimises ``ce_weight · CE + kd_weight · T² KL``
    towards the full-precision teacher (the issue's option; not in the paper), else CE alone.

    Defaults: ``members=5`` (the paper reports ensembles of up to 6 and more members; 5 is ours), soft
    combination, binary weights and activations. The members' count, the SAMME vote and the
    resampling form of boosting are ours where the paper's text could not be read here (only its
    abstract and summary: bagging reduces variance, boosting bias and variance).

    Args:
        student: the architecture (factory, zoo name or zoo spec; each member is a fresh copy, binarised
            by :func:`~distill.models.binary.binarize` unless it already has binary layers).
        train_loader: an :class:`~distill.data.loader.InMemoryLoader` (its tensors are resampled).
        epochs: epochs per member; ``run_dir``: member ``k`` writes to ``run_dir/member<k>``; member ``k``
            is built and trained with seed ``seed + k``. ``**fit_kwargs`` go to every :func:`distill.fit`.

    Returns:
        :class:`BENNResult`; ``last_acc`` / ``best_acc`` are the full ensemble's validation accuracy.
    """
    check_model_spec(student, "student", fresh=True)
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"benn: members must be a positive int; got {members!r}")
    if mode not in BENN_MODES:
        raise ValueError(f"benn: mode must be one of {BENN_MODES}; got {mode!r}")
    if rule not in ("hard", "soft"):
        raise ValueError(f"benn: rule must be 'hard' or 'soft'; got {rule!r}")
    if kd_weight < 0 or ce_weight < 0 or ce_weight + kd_weight <= 0:
        raise ValueError(f"benn: ce_weight and kd_weight must be >= 0 with a positive sum; got {ce_weight}, {kd_weight}")
    if kd_weight > 0 and teacher is None:
        raise ValueError("benn: kd_weight > 0 needs a teacher")
    if not T > 0:
        raise ValueError(f"benn: T must be > 0; got {T!r}")
    check_stage_resume(fit_kwargs, "benn", run_dir)
    x, y, batch_size = _tensors(train_loader)
    n, k_classes = len(y), int(y.max()) + 1
    root = Path(run_dir) if run_dir is not None else None
    g = torch.Generator().manual_seed(seed)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    result = BENNResult()
    with StepProgress(progress, f"benn ({mode})", members) as bar:
        for k in range(members):
            if mode == "bagging":
                idx = torch.randint(n, (n,), generator=g)
            else:
                idx = torch.multinomial(weights, n, replacement=True, generator=g)
            seed_everything(seed + k)
            model = build_model(student, "student")
            if not binary_layers(model):  # a zoo binary model (binary_cnn) is used as it is
                model = binarize(model, activations=activations, inplace=True)
            losses: dict[str, Any] = {"ce": CrossEntropy(weight=ce_weight)} if ce_weight > 0 else {}
            if kd_weight > 0:
                losses["kd"] = KD(T=T, weight=kd_weight)
            loader = InMemoryLoader(x[idx], y[idx], batch_size, seed=seed + k)
            stage = fit(Distiller(model, teacher if kd_weight > 0 else None, losses), loader, val_loader,
                        epochs=epochs, run_dir=root / f"member{k}" if root else None, seed=seed + k,
                        progress=False, **fit_kwargs)
            alpha = 1.0
            if mode == "boosting":
                wrong = _logits(model, x).argmax(1).cpu() != y.cpu()
                err = float((weights * wrong.double()).sum())
                alpha = DF.benn_samme_alpha(err, k_classes)
                if alpha > 0:
                    weights = DF.benn_boost_weights(weights, wrong, alpha)
                else:
                    alpha, weights = 0.0, torch.full((n,), 1.0 / n, dtype=torch.float64)
            model.requires_grad_(True)
            result.members.append(stage)
            result.models.append(model)
            result.alphas.append(alpha)
            if val_loader is not None:
                result.member_accs.append(_accuracy(model, val_loader))
                votes = result.alphas if sum(result.alphas) > 0 else None
                acc = _accuracy(BinaryEnsemble(result.models, rule, votes), val_loader)
                result.history.append({"epoch": k + 1, "members": k + 1, "val_student_acc": acc,
                                       "val_member_acc": result.member_accs[-1], "alpha": alpha})
                bar.advance(f"k={k + 1} acc {acc:.1f}")
            else:
                bar.advance(f"k={k + 1}")
    result.ensemble = BinaryEnsemble(result.models, rule, result.alphas if sum(result.alphas) > 0 else None)
    if result.history:
        result.last_acc = result.history[-1]["val_student_acc"]
        best = max(result.history, key=lambda r: r["val_student_acc"])
        result.best_acc, result.best_epoch = best["val_student_acc"], best["epoch"]
    result.run_dir = root
    result.time_s = sum(s.time_s or 0.0 for s in result.members)
    return result
