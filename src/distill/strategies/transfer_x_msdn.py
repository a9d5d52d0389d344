"""MSDN: mutual semantic distillation between two attention sub-nets for zero-shot learning.

Chen, Hong, Xie, Yang, Peng, Wang, Zhao, You, "MSDN: Mutually Semantic Distillation Network for Zero-Shot
Learning", CVPR 2022, arXiv 2203.03137. On a backbone's region features ``F`` ``(B, C, R)`` and learnable
attribute embeddings ``V`` ``(A, D)``:

* attribute→visual sub-net (AVA): each attribute attends over the regions,
  ``S = V W1 F`` ``(B, A, R)`` (attribute score per region), ``α = softmax_r(V W2 F)``, attribute scores
  ``ψ1 = Σ_r α ⊙ S`` ``(B, A)``;
* visual→attribute sub-net (VAA): each region attends over the attributes,
  ``S' = Fᵀ W1' Vᵀ`` ``(B, R, A)``, ``β = softmax_a(V W2' F)``, ``ψ2 = Σ_r β ⊙ S'ᵀ`` ``(B, A)``;
* each sub-net's class scores ``s_i = ψ_i zᵀ`` ``(B, K)`` against the classes' (L2-normalised) attribute
  vectors ``z`` ``(K, A)``; trained with cross-entropy on the seen labels plus λ_cal times the
  self-calibration term (:func:`~distill.functional.msdn_self_calibration`);
* mutual semantic distillation: :func:`~distill.functional.msdn_distill_loss` (JSD + the released code's
  score-gap term) between ``s_1`` and ``s_2``, weighted by λ_distill, both sub-nets learning from it;
* prediction: ``0.9 s_1 + 0.1 s_2``.

The paper's text beyond its abstract and introduction could not be read here: every formula and default
follows the authors' released code (``shiming-chen/MSDN``, ``core/MSDN.py``, ``MSDN_cub.py``,
``core/helper_MSDN_CUB.py``): λ_cal = 0.1, λ_distill = 0.001, fusion (0.9, 0.1), W1 ~ N(0, 1) and the
other projections zero-initialised, features L2-normalised over channels, cross-entropy over all classes
(their ``is_conservative=True``), RMSprop lr 1e-4, weight decay 1e-4, batch 50. Departures: the paper
uses frozen ResNet-101 features and GloVe attribute embeddings; here the backbone is trained with the
heads from scratch on small images and ``V`` is learnt from a random start (or given). The code's third
projection (attention over attributes, ``W_3``) is computed but unused in its scores and is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.papers import Paper
from distill.strategies.registry import as_model, register_strategy
from distill.strategies.transfer_x_common import own_loop_kwargs, train_in_memory
from distill.train import FitResult

__all__ = ["MSDN_PAPER", "MSDNNet", "MSDNResult", "fit_msdn", "small_region_backbone", "zero_shot_scores"]

MSDN_PAPER = Paper("MSDN: Mutually Semantic Distillation Network for Zero-Shot Learning",
                   "S. Chen, Z. Hong, G.-S. Xie, W. Yang, Q. Peng, K. Wang, J. Zhao, X. You", 2022, "2203.03137", "CVPR")


def small_region_backbone(in_channels: int = 1, width: int = 32) -> nn.Module:
    """Two conv blocks, 28x28 -> ``(B, width, 7, 7)`` region features (49 regions)."""
    return nn.Sequential(nn.Conv2d(in_channels, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(width // 2, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.MaxPool2d(2))


class MSDNNet(nn.Module):
    """A backbone and MSDN's two sub-nets. ``forward(x)`` ``(B, C_in, H, W)`` -> fused class scores ``(B, K)``;
    :meth:`sub_scores` returns both sub-nets' ``(B, K)`` scores.

    Args:
        backbone: images -> region features ``(B, C, h, w)``.
        attributes: the classes' attribute vectors ``(K, A)`` (every class, seen and unseen).
        channels: C, the backbone's output channels.
        dim: D, the attribute embeddings' width; ``attribute_embeddings`` ``(A, D)`` to start from given ones.
        fusion: weights of the two sub-nets' scores at prediction.
    """

    def __init__(self, backbone: nn.Module, attributes: Tensor, channels: int, dim: int = 32,
                 attribute_embeddings: Tensor | None = None, fusion: Sequence[float] = (0.9, 0.1)) -> None:
        super().__init__()
        if attributes.dim() != 2 or attributes.shape[0] < 2:
            raise ValueError(f"attributes must be (K, A) with K >= 2 classes; got {tuple(attributes.shape)}")
        a = attributes.shape[1]
        self.backbone = backbone
        self.register_buffer("att", F.normalize(attributes.float(), dim=1))
        v = attribute_embeddings.float().clone() if attribute_embeddings is not None else torch.randn(a, dim)
        if v.shape[0] != a:
            raise ValueError(f"attribute_embeddings must be ({a}, D); got {tuple(v.shape)}")
        self.V = nn.Parameter(v)
        d = v.shape[1]
        self.W1 = nn.Parameter(torch.randn(d, channels))
        self.W2 = nn.Parameter(torch.zeros(d, channels))
        self.W1v = nn.Parameter(torch.zeros(channels, d))
        self.W2v = nn.Parameter(torch.zeros(d, channels))
        if len(fusion) != 2:
            raise ValueError(f"fusion must be two weights; got {fusion!r}")
        self.fusion = tuple(float(f) for f in fusion)

    def sub_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The AVA and VAA sub-nets' class scores, each ``(B, K)``."""
        f = self.backbone(x)
        f = F.normalize(f.flatten(2), dim=1)  # (B, C, R), unit norm over channels
        s = torch.einsum("iv,vf,bfr->bir", self.V, self.W1, f)  # (B, A, R) attribute score per region
        alpha = torch.einsum("iv,vf,bfr->bir", self.V, self.W2, f).softmax(-1)  # attention over regions
        psi1 = (alpha * s).sum(-1)  # (B, A)
        s2 = torch.einsum("bfr,fv,iv->bri", f, self.W1v, self.V)  # (B, R, A)
        beta = torch.einsum("iv,vf,bfr->bir", self.V, self.W2v, f).softmax(1)  # attention over attributes
        psi2 = torch.einsum("bir,bri->bi", beta, s2)  # (B, A)
        return psi1 @ self.att.T, psi2 @ self.att.T

    def forward(self, x: Tensor) -> Tensor:
        s1, s2 = self.sub_scores(x)
        return self.fusion[0] * s1 + self.fusion[1] * s2


def _per_class_accuracy(pred: Tensor, y: Tensor) -> float:
    classes = y.unique()
    return float(torch.stack([(pred[y == c] == c).float().mean() for c in classes]).mean()) * 100


@torch.no_grad()
def zero_shot_scores(model: nn.Module, seen_x: Tensor, seen_y: Tensor, unseen_x: Tensor, unseen_y: Tensor,
                     unseen: Sequence[int], batch_size: int = 512) -> dict[str, float]:
    """ZSL and GZSL scores (per-class mean accuracy, %), the protocol of Xian et al. the paper follows.

    ``zsl``: unseen test images classified among the unseen classes only; ``seen`` (S) and ``unseen``
    (U): test images of each kind classified among *all* classes (GZSL); ``h``: 2SU / (S + U).
    ``seen_x``/``unseen_x`` ``(N, C, H, W)``, labels ``(N,)`` in the full class numbering.
    """
    was = model.training
    model.eval()
    try:
        def scores(x: Tensor) -> Tensor:
            return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])

        u = torch.as_tensor(list(unseen))
        su, ss = scores(unseen_x), scores(seen_x)
        zsl = u[su[:, u].argmax(1)]
        s_acc, u_acc = _per_class_accuracy(ss.argmax(1), seen_y), _per_class_accuracy(su.argmax(1), unseen_y)
    finally:
        model.train(was)
    h = 0.0 if s_acc + u_acc == 0 else 2 * s_acc * u_acc / (s_acc + u_acc)
    return {"zsl": _per_class_accuracy(zsl, unseen_y), "seen": s_acc, "unseen": u_acc, "h": h}


@dataclass
class MSDNResult(FitResult):
    """:class:`~distill.train.FitResult` (accuracy = GZSL harmonic mean H) plus the last ZSL/GZSL scores."""

    scores: dict[str, float] | None = None
    model: nn.Module | None = None


@register_strategy("msdn", "transfer", MSDN_PAPER)
def fit_msdn(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: tuple[Tensor, Tensor],
    val_loader: Any = None,
    *,
    attributes: Tensor,
    unseen: Sequence[int],
    channels: int,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    lambda_cal: float = 0.1,
    lambda_distill: float = 0.001,
    fusion: Sequence[float] = (0.9, 0.1),
    dim: int = 32,
    attribute_embeddings: Tensor | None = None,
    batch_size: int = 50,
    **fit_kwargs: Any,
) -> MSDNResult:
    """MSDN: two attention sub-nets over region features, each teaching the other, for zero-shot learning.

    Chen et al., CVPR 2022, arXiv 2203.03137 (see the module docstring for the formulas and where each
    default comes from).

    Args:
        student: the image backbone ``(B, C_in, H, W) -> (B, channels, h, w)`` (or a factory).
        train_loader: seen-class training data ``(x (N, C_in, H, W), y (N,))``, labels in the full numbering.
        val_loader: ``(seen_x, seen_y, unseen_x, unseen_y)`` test images for per-epoch ZSL/GZSL scores.
        attributes: ``(K, A)`` attribute vectors of every class; unseen: the unseen classes' indices.
        lambda_cal: weight of each sub-net's self-calibration term. lambda_distill: weight of the mutual
            semantic distillation (0 turns MSDN into two independent sub-nets: the ablation).
        fusion, dim, attribute_embeddings: see :class:`MSDNNet`.
        batch_size, fit_kwargs: the loop's batch size and optimizer (default RMSprop, lr 1e-4, weight decay
            1e-4, the authors' code; constant learning rate).

    Returns: an :class:`MSDNResult` whose accuracy is the GZSL harmonic mean H and whose ``scores`` hold
    the last epoch's ``zsl``, ``seen``, ``unseen`` and ``h``.
    """
    opt = {"optimizer": "rmsprop", "lr": 1e-4, "weight_decay": 1e-4, **own_loop_kwargs(fit_kwargs, "msdn")}
    x, y = train_loader
    u = torch.as_tensor(list(unseen), dtype=torch.long)
    k = attributes.shape[0] if isinstance(attributes, Tensor) and attributes.dim() == 2 else None
    if k is None or u.numel() == 0 or int(u.min()) < 0 or int(u.max()) >= k:
        raise ValueError(f"attributes must be (K, A) and unseen a non-empty list of class indices in [0, K); got "
                         f"{getattr(attributes, 'shape', attributes)} and {list(unseen)}")
    if bool(torch.isin(y, u).any()):
        raise ValueError("the training data holds images of unseen classes: zero-shot training sees seen classes only")
    for name, value in (("lambda_cal", lambda_cal), ("lambda_distill", lambda_distill)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    model = MSDNNet(as_model(student, "msdn"), attributes, channels, dim, attribute_embeddings, fusion)

    def loss_fn(scores: tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        s1, s2 = scores
        total = torch.zeros(())
        for s in (s1, s2):
            total = total + F.cross_entropy(s, targets) + lambda_cal * DF.msdn_self_calibration(s, u)
        return total + lambda_distill * DF.msdn_distill_loss(s1, s2)

    last: dict[str, float] = {}

    def score(m: nn.Module) -> float | None:
        if val_loader is None:
            return None
        last.update(zero_shot_scores(m, *val_loader, unseen=list(unseen)))
        return last["h"]

    result = train_in_memory(model, x, y, loss_fn, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                             what="msdn", evaluate_fn=score, forward=model.sub_scores, run_dir=run_dir, **opt)
    return MSDNResult(**vars(result), scores=dict(last) if last else None, model=model)
