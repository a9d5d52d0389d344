"""HSAKD: hierarchical self-supervision augmented knowledge distillation.

Teacher and student each carry auxiliary classifiers on intermediate layers that predict the
joint (class, rotation) label of a rotated image, a 4K-way "self-supervision augmented"
distribution. :class:`AuxiliaryNet` adds them to any model (a tap per layer, BYOT's
:class:`~distill.methods.self_distill.ExitHead` with 4K outputs, each output passed through an
``nn.Identity`` tap point ``aux.<i>``); the teacher's are trained first (:class:`HSAKDAuxCE`), then
:class:`HSAKD` distils the teacher's augmented distributions at every stage and its class
distribution on every rotated image into the student. Batches hold each image's four rotations,
sample-major (row ``4b + j``: image b turned j quarter turns;
:class:`~distill.strategies.self_distill.RotationLoader`).

Paper: C. Yang, Z. An, L. Cai, Y. Xu, "Hierarchical Self-supervised Augmented Knowledge
Distillation", IJCAI 2021, arXiv 2107.13715; reference code github.com/winycg/HSAKD
(``train_teacher_cifar.py``, ``train_student_cifar.py``, ``models/*.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods._views import tap
from distill.methods.base import Method, Paper, register
from distill.methods.logits import _targets
from distill.methods.self_distill import ExitHead, _check_number, pool_feature
from distill.taps import Taps, logits_of
from distill.teachers import freeze

__all__ = ["HSAKD", "AuxiliaryNet", "HSAKDAuxCE", "exit_heads", "hsakd_aux_loss", "hsakd_loss"]

PAPER = Paper("Hierarchical Self-supervised Augmented Knowledge Distillation", "C. Yang, Z. An, L. Cai, Y. Xu",
              2021, "2107.13715", "IJCAI")

TRANSFORMS = 4  # the four rotations, 0/90/180/270 degrees


def _check_rows(n: int, what: str) -> None:
    if n % TRANSFORMS:
        raise ValueError(f"HSAKD needs each image's {TRANSFORMS} rotations in consecutive rows, but {what} has {n} "
                         "rows: train with RotationLoader")


def hsakd_aux_loss(aux_logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    r"""The auxiliary classifiers' loss: cross-entropy against the joint (class, rotation) labels,

    .. math:: L = \textstyle\sum_l \frac{1}{4B} \sum_{b,j} \mathrm{CE}\big(q_l(t_j(x_b)),\; 4 y_b + j\big)

    ``aux_logits``: one (4B, 4K) tensor per auxiliary classifier, rows sample-major (row 4b + j:
    image b rotated j quarter turns); ``targets`` (4B,) the class of each row (repeated per image)
    → scalar. The teachers' auxiliary classifiers are trained with it.
    """
    if not aux_logits:
        raise ValueError("HSAKD needs at least one auxiliary classifier")
    _check_rows(int(targets.shape[0]), "the targets")
    joint = DF.sla_joint_targets(targets[0::TRANSFORMS], TRANSFORMS)
    return torch.stack([F.cross_entropy(q, joint) for q in aux_logits]).sum()


def hsakd_loss(student_logits: Tensor, teacher_logits: Tensor, student_aux: Sequence[Tensor],
               teacher_aux: Sequence[Tensor], targets: Tensor, T: float = 3.0) -> Tensor:
    r"""The student's HSAKD objective on a batch of rotated images:

    .. math::
        L = \mathrm{CE}\big(p^S(x), y\big)
            + \textstyle\sum_{l=1}^{L} \frac{T^2}{4B} \sum_{b,j} \mathrm{KL}\big(q^T_l(t_j(x_b))^{T} \,\|\, q^S_l(t_j(x_b))^{T}\big)
            + \frac{T^2}{4B} \sum_{b,j} \mathrm{KL}\big(p^T(t_j(x_b))^{T} \,\|\, p^S(t_j(x_b))^{T}\big)

    the task loss on the unrotated images (rows 0, 4, 8, ...), the teacher's self-supervision
    augmented distributions :math:`q_l` (over the 4K joint labels, at temperature T) distilled
    into the student's at every auxiliary classifier, and the teacher's class distribution
    :math:`p` distilled on every rotated image. The teacher's outputs are detached.

    Shapes: ``student_logits``, ``teacher_logits`` (4B, K); ``student_aux``, ``teacher_aux`` one
    (4B, 4K) tensor per stage each (the same count); ``targets`` (4B,) → scalar. Defaults: T = 3
    and every weight 1, the reference code's (``--kd_T 3``, ``loss_cls + loss_div``).
    """
    if len(student_aux) != len(teacher_aux) or not student_aux:
        raise ValueError(f"HSAKD pairs the auxiliary classifiers stage by stage: the student has {len(student_aux)}, "
                         f"the teacher {len(teacher_aux)}")
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    _check_rows(int(student_logits.shape[0]), "the student's output")
    loss = F.cross_entropy(student_logits[0::TRANSFORMS], targets[0::TRANSFORMS])
    for q_s, q_t in zip(student_aux, teacher_aux):
        if q_s.shape != q_t.shape:
            raise ValueError(f"student and teacher augmented distributions differ in shape: {tuple(q_s.shape)} vs "
                             f"{tuple(q_t.shape)}")
        loss = loss + DF.kd_loss(q_s, q_t.detach(), T)
    return loss + DF.kd_loss(student_logits, teacher_logits.detach(), T)


def exit_heads(maps: Sequence[Tensor], num_classes: int) -> list[ExitHead]:
    """One :class:`~distill.methods.self_distill.ExitHead` per tapped tensor, all ending at the last
    tensor's width and resolution (a ``k x k`` stride-``k`` conv brings a larger map down to it; the
    last gets a padded 3x3 conv), as the reference code's auxiliary branches all end at the final
    stage's size. Each head is dry-run in eval mode, so BatchNorm statistics stay untouched."""
    last = maps[-1]
    width = int(pool_feature(last).shape[1])
    heads = []
    for x in maps:
        stride = 1
        if x.dim() == 4 and last.dim() == 4:
            stride = max(1, min(x.shape[2] // last.shape[2], x.shape[3] // last.shape[3]))
        head = ExitHead(x, width, num_classes, stride).to(device=x.device, dtype=x.dtype)
        head.eval()
        head(x)
        head.train()
        heads.append(head)
    return heads


class AuxiliaryNet(nn.Module):
    """A model plus auxiliary classifiers of the joint (class, rotation) label on tapped layers.

    ``forward(x)`` returns the model's output unchanged; the auxiliary classifiers' logits
    (B, 4K), one per tap of ``exits``, pass through the ``nn.Identity`` tap points ``aux.0``,
    ``aux.1``, ... where :class:`HSAKD` and :class:`HSAKDAuxCE` read them (:attr:`aux_taps`).

    Args:
        model: any classifier (its output holds logits (B, K)).
        exits: tap paths of the layers the auxiliary classifiers read (the reference code: every
            stage's output, the last included).
        example: an example input batch (B, ...), to size the classifiers (one forward in eval mode).
        frozen_backbone: keep ``model`` frozen (eval mode, no gradient) and feed the classifiers
            detached features: the paper's teacher protocol (a trained backbone, classifiers trained
            on top). ``False`` trains them jointly, as for the student (or the reference code's
            "HSAKD*" teachers).
    """

    def __init__(self, model: nn.Module, exits: Sequence[str], example: Tensor, *,
                 frozen_backbone: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"AuxiliaryNet needs an nn.Module, got {type(model).__name__}")
        if isinstance(exits, str) or not exits:
            raise ValueError(f"exits must be a non-empty list of tap paths (e.g. ['stage1', 'stage2', 'stage3']), "
                             f"got {exits!r}")
        self.model = model
        self.exits = [str(p) for p in exits]
        self.frozen_backbone = bool(frozen_backbone)
        self._taps = Taps(model, self.exits, model_name="model")
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), self._taps.recording() as store:
                num_classes = int(logits_of(model(example)).shape[-1])
            self.heads = nn.ModuleList(exit_heads([store[p] for p in self.exits], TRANSFORMS * num_classes))
        finally:
            for m, mode in modes.items():
                m.training = mode
        self.aux = nn.ModuleList(nn.Identity() for _ in self.exits)
        if self.frozen_backbone:
            freeze(model)

    @property
    def aux_taps(self) -> list[str]:
        """The tap paths of the auxiliary classifiers' logits: ``["aux.0", "aux.1", ...]``."""
        return [f"aux.{i}" for i in range(len(self.exits))]

    def train(self, mode: bool = True) -> AuxiliaryNet:
        super().train(mode)
        if self.frozen_backbone:
            self.model.eval()  # a frozen backbone's BatchNorm statistics never change
        return self

    def forward(self, x: Tensor) -> Any:
        with self._taps.recording() as store:
            out = self.model(x)
        for p, head, point in zip(self.exits, self.heads, self.aux):
            feature = store[p].detach() if self.frozen_backbone else store[p]
            point(head(feature)[1])
        return out

    def remove_hooks(self) -> None:
        """Remove the hooks on ``model`` (it then runs as before being wrapped)."""
        self._taps.remove()


def _aux(view: View, paths: Sequence[str], side: str) -> list[Tensor]:
    return [tap(view, p, side) for p in paths]


def _branches(value: Any) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"branches must be a positive int (the number of auxiliary classifiers), got {value!r}")
    return [f"aux.{i}" for i in range(value)]


@register("hsakd", "features", PAPER)
class HSAKD(Method):
    """HSAKD: the teacher's self-supervision augmented distributions at every stage, and its class
    distribution on every rotated image, distilled into the student (:func:`hsakd_loss`, the whole
    objective: use it without ``"ce"``).

    Student and teacher are :class:`AuxiliaryNet` s with ``branches`` auxiliary classifiers each
    (the teacher's trained, e.g. by :func:`~distill.strategies.hsakd.fit_hsakd`); batches hold
    each image's four rotations (:class:`~distill.strategies.self_distill.RotationLoader`).

    Args:
        branches: the number of auxiliary classifiers (paired stage by stage).
        T: temperature (3, the reference code's ``--kd_T``).
    """

    needs_targets = True

    def __init__(self, branches: int = 3, T: float = 3.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.T = _check_number("T", T, 0.0, open_low=True)
        self.student_taps = _branches(branches)
        self.teacher_taps = list(self.student_taps)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return hsakd_loss(tap(student_view, "logits", "student"), tap(teacher_view, "logits", "teacher"),
                          _aux(student_view, self.student_taps, "student"),
                          _aux(teacher_view, self.teacher_taps, "teacher"), _targets(self, batch), self.T)

    def extra_repr(self) -> str:
        return f"branches={len(self.student_taps)}, T={self.T}, weight={self.weight}"


class HSAKDAuxCE(Method):
    """Trains an :class:`AuxiliaryNet`'s auxiliary classifiers on the joint labels
    (:func:`hsakd_aux_loss`); with ``backbone_ce`` also the model's own classifier on the unrotated
    images (the reference code's joint teacher training). Teacher-free: the net being trained is the
    Distiller's student."""

    needs_teacher = False
    needs_targets = True

    def __init__(self, branches: int = 3, backbone_ce: bool = False, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.student_taps = _branches(branches)
        self.backbone_ce = bool(backbone_ce)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        targets = _targets(self, batch)
        loss = hsakd_aux_loss(_aux(student_view, self.student_taps, "student"), targets)
        if self.backbone_ce:
            loss = loss + F.cross_entropy(tap(student_view, "logits", "student")[0::TRANSFORMS], targets[0::TRANSFORMS])
        return loss
