"""MixSKD: self-knowledge distillation from mixup, one :func:`distill.fit` run.

Each training batch holds B images and their mixup with a shuffled partner
(:class:`MixupLoader` yields a :class:`MixedBatch`: rows ``[x; x̃]``, the coefficient λ and the
pairing). The student carries auxiliary branches on intermediate taps (BYOT's exits, built from
the first batch) and a self-teacher on the concatenation of every branch's final feature map;
:class:`MixSKD` is the whole objective (:func:`~distill.functional.mixskd_parts` plus an
adversarial term), so the Distiller has no other loss and no teacher. The branches, the
self-teacher and the discriminators are dropped at inference: ``fit`` evaluates the student's own
output, and :func:`~distill.strategies.self_distill.evaluate_exits` each branch.

Paper: C. Yang, Z. An, H. Zhou, L. Cai, X. Zhi, J. Wu, Y. Xu, Q. Zhang, "MixSKD: Self-Knowledge
Distillation from Mixup for Image Recognition", ECCV 2022, arXiv 2208.05768; reference code
github.com/winycg/Self-KD-Lib (``main_mixskd_cifar.py``, ``models/resnet_mixskd.py``,
``methods/adversarial.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View, as_batch
from distill.methods._views import module_key, tap
from distill.methods.base import Paper
from distill.methods.self_distill import ExitsMethod, pool_feature
from distill.strategies.chain import _check_positive, _check_weight
from distill.strategies.registry import register_strategy
from distill.strategies.self_distill import SelfDistillResult, _fit_exits, _Wrapper

__all__ = ["ADVERSARIAL_MODES", "MixSKD", "MixedBatch", "MixupLoader", "fit_mixskd"]

PAPER = Paper("MixSKD: Self-Knowledge Distillation from Mixup for Image Recognition",
              "C. Yang, Z. An, H. Zhou, L. Cai, X. Zhi, J. Wu, Y. Xu, Q. Zhang", 2022, "2208.05768", "ECCV")

ADVERSARIAL_MODES = ("minimax", "joint")


@dataclass
class MixedBatch(Batch):
    """A batch of B images followed by their B mixups: ``inputs`` ``(2B, ...)`` = ``[x; x̃]`` with
    ``x̃ = lam·x + (1 − lam)·x[perm]``; ``targets`` (B,) and ``index`` (B,) describe the unmixed rows;
    ``perm`` (B,) pairs each row with its partner."""

    lam: float = 0.5
    perm: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MixedBatch:
        out = super().to(device, non_blocking)
        out.perm = self.perm.to(device, non_blocking=non_blocking)
        return out  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.perm.shape[0])


class MixupLoader(_Wrapper):
    """Wraps a loader: each batch ``(x, y)`` becomes a :class:`MixedBatch` ``[x; mixup(x)]``.

    One coefficient per batch, ``λ ~ Beta(alpha, alpha)``, and one random pairing ``perm``, both from
    torch's global generator (seeded by ``fit``), as the reference code draws them per batch.
    ``alpha = 0.4`` is the reference code's ``--mixup-alpha``. Under torchrun each rank mixes within
    its own part of the batch, with its own λ (a multi-process run is not the single-process one).
    """

    def __init__(self, loader: Iterable[Any], alpha: float = 0.4) -> None:
        super().__init__(loader)
        self.alpha = _check_positive("alpha", alpha)

    def __iter__(self) -> Iterator[MixedBatch]:
        beta = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))
        for raw in self.loader:
            b = as_batch(raw)
            if b.targets is None:
                raise ValueError("MixSKD needs labelled batches: a batch has no targets")
            n = int(b.inputs.shape[0])
            lam = float(beta.sample())
            perm = torch.randperm(n)
            mixed = DF.mixup(b.inputs, lam, perm)
            yield MixedBatch(torch.cat([b.inputs, mixed]), b.targets, b.index, lam=lam, perm=perm)


class _SelfTeacher(nn.Module):
    """MixSKD's self-teacher: the classifiers' final feature maps concatenated along channels, a
    1x1 conv back to C channels, global pooling and a linear classifier (the reference code's
    ``ResNet_Final_Auxiliary_Classifer``); for vectors (B, D) a linear map replaces the conv."""

    def __init__(self, example: Tensor, count: int, num_classes: int) -> None:
        super().__init__()
        c = int(example.shape[1])
        self.fuse = nn.Conv2d(c * count, c, 1, bias=False) if example.dim() == 4 else nn.Linear(c * count, c, bias=False)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return self.fc(pool_feature(self.fuse(torch.cat(list(maps), dim=1))))


def _discriminator(dim: int) -> nn.Module:
    # the reference code's discriminator: a 2-layer MLP (hidden 128) on the pooled feature map
    return nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 1))


class MixSKD(ExitsMethod):
    """MixSKD's objective on a :class:`MixedBatch`: every classifier, the self-teacher and the
    feature maps distil between the images' interpolation and the mixed images.

    Builds from the first batch (``prepare``): one auxiliary branch per tap of ``exits`` (BYOT's
    :class:`~distill.methods.self_distill.ExitHead`, its map brought to the size of the final
    feature map ``feature``), the self-teacher (concatenated maps → 1x1 conv → pool → linear) and
    one discriminator per classifier (pooled map → Linear(C, 128) → ReLU → Linear(128, 1)). Returns

    ``ce + mixup_weight·mixup_ce + feature_weight·feature + logit_weight·logit + adversarial_weight·adv``

    with the first four terms of :func:`~distill.functional.mixskd_parts` and
    ``adv = Σ_k`` :func:`~distill.functional.mixskd_discriminator_loss` of discriminator k on the
    interpolated map (real) and the mixed image's map (fake).

    Args:
        exits: tap paths of intermediate layers (an auxiliary branch each; the paper puts one after
            every stage but the last).
        feature: tap of the final feature map (the backbone's classifier's input map, e.g. ``"stage3"``,
            or ``"pool"`` for a model without maps).
        T: temperature of the logit distillation (3, the reference code's).
        mixup_weight, feature_weight, logit_weight, adversarial_weight: 1 each, as the reference code
            sums its terms.
        adversarial: ``"minimax"``: the discriminators minimise their loss while the network
            maximises it (a gradient-reversal layer in front of each discriminator, one backward), so
            the mixed images' maps are pushed to look interpolated, the adversarial game the paper
            describes. ``"joint"``: network and discriminators both minimise it, what the reference
            code does (its ``loss_gan`` is added to the network's loss with no reversal).
        predict: as BYOT's (``None``: the student's own output; an exit or ``"ensemble"``).

    Differences from the reference code: the auxiliary branches are BYOT-style bottlenecks on any
    tapped tensor rather than copies of the network's later stages; the discriminator has one logit
    (the code: two logits with one-hot BCE targets, the same game); the mixup cross-entropy is in
    the loss (the code computes it but leaves it out, which leaves its self-teacher untrained).
    """

    def __init__(self, exits: Sequence[str] = ("stage1", "stage2"), feature: str = "stage3", T: float = 3.0,
                 mixup_weight: float = 1.0, feature_weight: float = 1.0, logit_weight: float = 1.0,
                 adversarial_weight: float = 1.0, adversarial: str = "minimax", predict: str | None = None,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        if not isinstance(feature, str) or not feature:
            raise ValueError(f"MixSKD needs feature=<tap of the final feature map> (e.g. 'stage3'), got {feature!r}")
        # BYOT's hint and KL weights (alpha, lam) are not MixSKD's: the exits only provide the branches
        super().__init__(exits, feature, 0.0, 0.0, T, predict, weight, warmup_epochs)
        if feature in self.exits:
            raise ValueError(f"feature {feature!r} is the backbone's final map; it cannot also be an exit {self.exits}")
        self.mixup_weight = _check_weight("mixup_weight", mixup_weight)
        self.feature_weight = _check_weight("feature_weight", feature_weight)
        self.logit_weight = _check_weight("logit_weight", logit_weight)
        self.adversarial_weight = _check_weight("adversarial_weight", adversarial_weight)
        if adversarial not in ADVERSARIAL_MODES:
            raise ValueError(f"adversarial must be one of {ADVERSARIAL_MODES}, got {adversarial!r}")
        self.adversarial = adversarial
        self.self_teacher: _SelfTeacher | None = None
        self.discriminators = nn.ModuleList()
        self._last_parts: dict[str, float] = {}

    def _split(self, student_view: View, batch: Batch) -> tuple[int, float, Tensor]:
        if not isinstance(batch, MixedBatch):
            raise TypeError("MixSKD trains on batches of images and their mixups: wrap the training loader in "
                            f"MixupLoader (or use fit_mixskd), got a {type(batch).__name__}")
        n = len(batch)
        rows = int(tap(student_view, "logits", "student").shape[0])
        if rows != 2 * n:
            raise ValueError(f"a MixedBatch of {n} pairs needs {2 * n} student rows ([x; mixup(x)]), got {rows}")
        return n, batch.lam, batch.perm

    def _maps(self, student_view: View) -> list[Tensor]:
        """Every classifier's final feature map, branches first, the backbone's last: (2B, C, H, W) or (2B, D)."""
        final = tap(student_view, self.feature, "student")  # type: ignore[arg-type]
        maps = []
        for p in self.exits:
            head = self.heads[module_key(p)]
            x = tap(student_view, p, "student")
            m = head.bottleneck(x) if head.spatial else head.bottleneck(pool_feature(x))
            if m.dim() == 4 and m.shape[2:] != final.shape[2:]:
                m = F.adaptive_avg_pool2d(m, final.shape[2:])  # a stride that does not divide the size evenly
            maps.append(m)
        return [*maps, final if final.dim() == 4 else pool_feature(final)]

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        super().prepare(student_view, teacher_view, batch)
        if self.self_teacher is not None:
            return
        maps = self._maps(student_view)
        shapes = {tuple(m.shape[1:]) for m in maps}
        if len(shapes) != 1:
            raise ValueError(f"MixSKD's branches and the final map {self.feature!r} must agree in shape, got {shapes}")
        example = maps[-1]
        num_classes = int(tap(student_view, "logits", "student").shape[1])
        self.self_teacher = _SelfTeacher(example, len(maps), num_classes).to(example.device, example.dtype)
        dim = int(pool_feature(example).shape[1])
        self.discriminators.extend(_discriminator(dim).to(example.device, example.dtype) for _ in maps)

    def parts(self, student_view: View, batch: Batch) -> dict[str, Tensor]:
        """The unweighted terms ``ce``, ``mixup_ce``, ``feature``, ``logit``, ``adversarial``."""
        if self.self_teacher is None:
            raise RuntimeError("MixSKD.prepare() must run on an example batch first (Distiller.prepare or distill.fit)")
        n, lam, perm = self._split(student_view, batch)
        maps = self._maps(student_view)
        _, exit_logits = self.exit_outputs(student_view)
        logits = [*exit_logits, tap(student_view, "logits", "student")]
        orig_maps, mixed_maps = [m[:n] for m in maps], [m[n:] for m in maps]
        interp_maps = [DF.mixup(m, lam, perm) for m in orig_maps]
        out = DF.mixskd_parts([z[:n] for z in logits], [z[n:] for z in logits], orig_maps, mixed_maps,
                              self.self_teacher(interp_maps), self.self_teacher(mixed_maps),
                              batch.targets, lam, perm, self.T)  # type: ignore[arg-type]

        def score(disc: nn.Module, m: Tensor) -> Tensor:
            # minimax: a gradient-reversal layer makes the network maximise what the discriminators
            # minimise; joint (the reference code): both minimise it
            v = pool_feature(m)
            return disc(DF.grad_reverse(v, 1.0) if self.adversarial == "minimax" else v).squeeze(1)

        out["adversarial"] = sum(DF.mixskd_discriminator_loss(score(d, r), score(d, f))
                                 for d, r, f in zip(self.discriminators, interp_maps, mixed_maps))  # type: ignore[assignment]
        return out

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        p = self.parts(student_view, batch)
        if self.training:
            self._last_parts = {k: float(v.detach()) for k, v in p.items()}
        return p["ce"] + self.mixup_weight * p["mixup_ce"] + self.feature_weight * p["feature"] \
            + self.logit_weight * p["logit"] + self.adversarial_weight * p["adversarial"]

    def log_values(self) -> dict[str, float]:
        """The last training step's terms (``fit`` logs them as ``<loss>_<term>`` each epoch)."""
        return dict(self._last_parts)

    def extra_repr(self) -> str:
        return (f"exits={self.exits}, feature={self.feature!r}, T={self.T}, mixup={self.mixup_weight}, "
                f"feature_weight={self.feature_weight}, logit={self.logit_weight}, "
                f"adversarial={self.adversarial_weight} ({self.adversarial})")


@register_strategy("mixskd", "self", PAPER)
def fit_mixskd(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: Any = None,
    seed: int = 0,
    progress: bool = True,
    exits: Sequence[str] = ("stage1", "stage2"),
    feature: str = "stage3",
    alpha: float = 0.4,
    T: float = 3.0,
    mixup_weight: float = 1.0,
    feature_weight: float = 1.0,
    logit_weight: float = 1.0,
    adversarial_weight: float = 1.0,
    adversarial: str = "minimax",
    predict: str | None = None,
    **fit_kwargs: Any,
) -> SelfDistillResult:
    """MixSKD: self-distillation between images' interpolation and their mixup, with branches and a self-teacher.

    Every batch of ``train_loader`` is extended with its mixup (:class:`MixupLoader`,
    ``λ ~ Beta(alpha, alpha)``, 0.4: the reference code's); the student minimises :class:`MixSKD`
    (see there for the terms and arguments). Defaults are the reference code's (T = 3, every term
    weight 1); it trains CIFAR ResNets 200 epochs with SGD (Nesterov) lr 0.1, batch 64, decays at
    100 and 150 after a 5-epoch warm-up. Each step runs the student on 2B images.

    Returns: ``fit``'s result for the student's own classifier, the Distiller
    (``result.distiller.methods["mixskd"]`` holds the branches, self-teacher and discriminators) and,
    with a validation loader, each branch's accuracy (``exit_acc``).
    """
    method = MixSKD(exits=exits, feature=feature, T=T, mixup_weight=mixup_weight, feature_weight=feature_weight,
                    logit_weight=logit_weight, adversarial_weight=adversarial_weight, adversarial=adversarial,
                    predict=predict)
    loader = MixupLoader(train_loader, alpha)
    return _fit_exits("mixskd", method, student, loader, val_loader, teacher=teacher, epochs=epochs,
                      run_dir=run_dir, seed=seed, progress=progress, fit_kwargs=fit_kwargs)
