"""Online-distillation loss terms that fit the Distiller's (student view, teacher view, batch) form.

* Rocket launching's two extra terms on a :class:`~distill.strategies.online.RocketNet` student:
  the booster's cross-entropy (read from a tap) and the gradient-blocked logit hint. With ``"ce"``
  on the light net's logits they make the paper's whole objective, so rocket launching is an
  ordinary :func:`distill.fit` run (:func:`distill.strategies.online.fit_rocket`).
* Codistillation's distillation term, reading the peers' stale logits from the teacher view
  (the exchange between processes is a teacher source of its own).

The math is in :mod:`distill.functional.online`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods._views import tap
from distill.methods.base import Method, Paper, register

ROCKET_PAPER = Paper(
    title="Rocket Launching: A Universal and Efficient Framework for Training Well-performing Light Net",
    authors="G. Zhou, Y. Fan, R. Cui, W. Bian, X. Zhu, K. Gai",
    year=2018,
    arxiv="1708.04106",
    venue="AAAI",
)


def _logits(view: View, side: str) -> Tensor:
    return tap(view, "logits", side)


def _labels(method: Method, batch: Batch) -> Tensor:
    if batch.targets is None:
        raise ValueError(f"method {method.name!r} needs class labels, but the batch has no targets")
    return batch.targets


def _check_tap_path(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"booster_tap must be a non-empty module path, got {path!r}")
    return path


@register("rocket_hint", "online", ROCKET_PAPER)
class RocketHint(Method):
    """Rocket launching's hint: ||l - z||^2 between light and booster logits, with the gradient block.

    ``l`` is the student's output (the light net), ``z`` the booster's logits tapped at
    ``booster_tap`` (a :class:`~distill.strategies.online.RocketNet` exposes them at
    ``"booster_logits"``). The loss is squared L2 summed over logits and averaged over the batch
    (:func:`~distill.functional.rocket_hint_loss`); weight it with λ (0.03, the reference code's
    ``--gamma``). With ``grad_block=True`` (the paper's) z is detached, so the hint updates the
    light net and, through it, the shared layers, never the booster's own layers; ``False`` is the
    ablation of the paper's Table 2.

    The model evaluated and deployed is the light net alone: :meth:`predictor` returns
    ``student.light_net()`` when the student has one.
    """

    needs_teacher = False

    def __init__(self, booster_tap: str = "booster_logits", grad_block: bool = True, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.booster_tap = _check_tap_path(booster_tap)
        self.grad_block = bool(grad_block)
        self.student_taps = [self.booster_tap]

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        booster = tap(student_view, self.booster_tap, "student")
        if self.grad_block:
            booster = booster.detach()
        return DF.rocket_hint_loss(_logits(student_view, "student"), booster)

    def predictor(self, student: nn.Module) -> nn.Module | None:
        light = getattr(student, "light_net", None)
        return light() if callable(light) else None

    def extra_repr(self) -> str:
        return f"booster_tap={self.booster_tap!r}, grad_block={self.grad_block}, weight={self.weight}"


@register("rocket_booster_ce", "online", ROCKET_PAPER)
class RocketBoosterCE(Method):
    """Cross-entropy of the booster net's logits (tapped at ``booster_tap``) on the labels.

    The booster is trained alongside the light net (the H(y, q(x)) term of rocket launching); use
    it with ``"ce"`` (the light net's cross-entropy) and ``"rocket_hint"``.
    """

    needs_teacher = False
    needs_targets = True

    def __init__(self, booster_tap: str = "booster_logits", weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.booster_tap = _check_tap_path(booster_tap)
        self.student_taps = [self.booster_tap]

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return DF.cross_entropy(tap(student_view, self.booster_tap, "student"), _labels(self, batch))

    def extra_repr(self) -> str:
        return f"booster_tap={self.booster_tap!r}, weight={self.weight}"


@register(
    "codistillation",
    "online",
    Paper(
        title="Large scale distributed neural network training through online distillation",
        authors="R. Anil, G. Pereyra, A. Passos, R. Ormandi, G. E. Dahl, G. E. Hinton",
        year=2018,
        arxiv="1804.03235",
        venue="ICLR",
    ),
)
class Codistillation(Method):
    """Codistillation: T^2 KL(mean of the peers' stale predictions || student), batchmean.

    The teacher view carries the peers' logits, computed with parameters exchanged every N steps
    (stale): ``"peer_logits"`` (P, B, K) when present, else ``"logits"`` (B, K) (one peer, or a
    source that already averaged). The predictions are averaged as probabilities
    (:func:`~distill.functional.codistillation_kl`). The Distiller's weight is the paper's ψ; pair
    with ``"ce"`` for the whole worker loss (:func:`~distill.functional.codistillation_loss`).

    Args:
        T: temperature (1, the paper's: it distils the plain predictions).
        burn_in_steps: optimizer steps before the term switches on; the paper lets the models
            train alone for a burn-in period first, since early predictions carry no knowledge.
            The count (a buffer, so it is checkpointed) advances in :meth:`on_step_end`.
    """

    needs_teacher = True

    def __init__(self, T: float = 1.0, burn_in_steps: int = 0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if T <= 0:
            raise ValueError(f"temperature must be > 0, got {T}")
        if isinstance(burn_in_steps, bool) or not isinstance(burn_in_steps, int) or burn_in_steps < 0:
            raise ValueError(f"burn_in_steps must be an integer >= 0, got {burn_in_steps!r}")
        self.T = float(T)
        self.burn_in_steps = burn_in_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        logits = _logits(student_view, "student")
        peers = teacher_view["peer_logits"] if "peer_logits" in teacher_view else _logits(teacher_view, "teacher")
        if int(self.steps) < self.burn_in_steps:
            return logits.sum() * 0.0  # keeps the graph (and the total's device/dtype) without a pull
        return DF.codistillation_kl(logits, peers.detach(), self.T)

    def on_step_end(self) -> None:
        if self.training:
            self.steps += 1

    def extra_repr(self) -> str:
        return f"T={self.T}, burn_in_steps={self.burn_in_steps}, weight={self.weight}"
