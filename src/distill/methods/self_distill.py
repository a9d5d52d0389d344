"""Self-distillation methods: the student is its own teacher (no teacher model).

* :class:`BYOT` and :class:`MSD`: auxiliary exits (bottleneck + pooled linear classifier) built on
  tapped intermediate tensors of *any* model from one example batch, taught by the deepest
  classifier (BYOT) or by every other classifier (MSD). Their :meth:`~ExitsMethod.predictor`
  lets the deepest exit, any shallow exit or the ensemble of all predict.
* :class:`DLB`: the predictions of the last mini-batch teach the samples it shares with this one.
* :class:`ZipfLS`: Zipf-distributed soft labels over the model's own ranking of the classes.
* :class:`TfFD`: salient channels teach the others; deeper layers teach shallower ones.
* :class:`SLA`: a joint (class, rotation) head whose aggregated prediction teaches the ordinary one.

Each ``forward`` returns the *unweighted* loss; the math lives in
:mod:`distill.functional.self_distill`. All are teacher-free: build the Distiller with
``teacher=None`` (or use the strategies of :mod:`distill.strategies.self_distill`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods._views import module_key, tap
from distill.methods.base import Method, Paper, register
from distill.methods.logits import _targets
from distill.taps import Taps, logits_of, resolve

__all__ = ["ExitHead", "ExitPredictor", "ExitsMethod", "SLAPredictor", "pool_feature"]


def _logits(view: View) -> Tensor:
    logits = tap(view, "logits", "student")
    if logits.dim() != 2:
        raise ValueError(f"self-distillation needs student logits (B, K), got shape {tuple(logits.shape)}")
    return logits


def _check_number(name: str, value: Any, low: float, high: float | None = None, *, open_low: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        span = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    return float(value)


def pool_feature(t: Tensor) -> Tensor:
    """A tapped tensor as one vector per sample: ``(B, C, H, W)`` and ``(B, N, D)`` tokens are
    averaged over locations / tokens, ``(B, D)`` is kept → ``(B, D)``."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() == 3:
        return t.mean(dim=1)
    if t.dim() == 2:
        return t
    raise ValueError(f"an exit needs a (B, C, H, W), (B, N, D) or (B, D) tensor, got shape {tuple(t.shape)}")


class ExitHead(nn.Module):
    """An auxiliary exit: bottleneck → global pool → feature ``(B, D)`` → linear classifier ``(B, K)``.

    For maps ``(B, C, H, W)`` the bottleneck is BYOT's: 1x1 conv to ``m = max(1, D // 4)``
    channels, a ``k x k`` conv of stride ``k`` (``k`` the downsampling factor towards the
    deepest feature when it is a map, else towards the smallest tapped map; a padded 3x3 conv
    when ``k = 1``), 1x1 conv to ``D``, each followed by BN and
    ReLU (the last ReLU only when ``final_relu``). For tokens ``(B, N, D_in)`` (averaged over N)
    and vectors ``(B, D_in)``: Linear to ``m``, ReLU, Linear to ``D`` (ReLU when ``final_relu``).

    ``forward(x) -> (feature (B, D), logits (B, K))``.
    """

    def __init__(self, example: Tensor, out_dim: int, num_classes: int, stride: int = 1,
                 final_relu: bool = True) -> None:
        super().__init__()
        mid = max(1, out_dim // 4)
        self.spatial = example.dim() == 4
        if self.spatial:
            c = int(example.shape[1])
            conv = (nn.Conv2d(mid, mid, 3, padding=1, bias=False) if stride == 1
                    else nn.Conv2d(mid, mid, stride, stride=stride, bias=False))
            layers: list[nn.Module] = [nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                       conv, nn.BatchNorm2d(mid), nn.ReLU(),
                                       nn.Conv2d(mid, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim)]
        else:
            d = int(pool_feature(example).shape[1])
            layers = [nn.Linear(d, mid), nn.ReLU(), nn.Linear(mid, out_dim)]
        if final_relu:
            layers.append(nn.ReLU())
        self.bottleneck = nn.Sequential(*layers)
        self.fc = nn.Linear(out_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = pool_feature(self.bottleneck(x) if self.spatial else self.bottleneck(pool_feature(x)))
        return feature, self.fc(feature)


def _cached_predictor(method: Any, student: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """The method's predictor for ``student``, built once (a new student gets a new one, and the old
    one's hooks are removed). The cache is a tuple, which keeps the predictor (holding the student)
    out of the method's module tree."""
    cache = method._predictor_cache
    if not cache or cache[0] is not student:
        if cache:
            cache[1].remove_hooks()
        method._predictor_cache = (student, build())
    return method._predictor_cache[1]


class ExitPredictor(nn.Module):
    """The student predicting with a shallow exit, or with the mean logits of all its classifiers.

    The student runs its whole forward (the exit's tap is read with a hook), so this measures an
    exit's accuracy; it does not save the deeper layers' compute as a real early exit would.
    """

    def __init__(self, student: nn.Module, paths: Sequence[str], heads: Sequence[ExitHead], mode: str) -> None:
        super().__init__()
        self.student, self.heads, self.paths, self.mode = student, nn.ModuleList(heads), list(paths), mode
        self._taps = Taps(student, self.paths, model_name="student")

    def forward(self, x: Tensor) -> Tensor:
        with self._taps.recording() as store:
            deepest = logits_of(self.student(x))
        exits = [head(store[p])[1] for p, head in zip(self.paths, self.heads)]
        if self.mode == "ensemble":
            return torch.stack([*exits, deepest]).mean(dim=0)
        return exits[self.paths.index(self.mode)]

    def remove_hooks(self) -> None:
        self._taps.remove()


class ExitsMethod(Method):
    """Auxiliary exits on tapped tensors of the student, built from one example batch: the base
    of :class:`BYOT` and :class:`MSD` (not registered itself; the subclasses are)."""

    needs_teacher = False
    needs_targets = True
    requires_prepare = True

    def __init__(self, exits: Sequence[str], feature: str | None, alpha: float, lam: float, T: float,
                 predict: str | None, weight: float, warmup_epochs: int) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if isinstance(exits, str) or not exits:
            raise ValueError(
                f"{type(self).__name__} needs exits: a non-empty list of tap paths of intermediate layers "
                f"(e.g. ['stage1', 'stage2']), got {exits!r}"
            )
        self.exits = [str(p) for p in exits]
        if len(set(self.exits)) != len(self.exits):
            raise ValueError(f"exits lists a tap twice: {self.exits}")
        self.feature = None if feature is None else str(feature)
        self.alpha = _check_number("alpha", alpha, 0.0, 1.0)
        self.lam = _check_number("lam", lam, 0.0)
        self.T = _check_number("T", T, 0.0, open_low=True)
        if self.lam > 0 and self.feature is None:
            raise ValueError(
                f"the feature hint (lam={lam}) needs feature=<tap of the deepest feature> (e.g. 'pool' or the "
                "last stage); or set lam=0"
            )
        if predict not in (None, "deepest", "ensemble", *self.exits):
            raise ValueError(f"predict must be None/'deepest', 'ensemble' or one of the exits {self.exits}, "
                             f"got {predict!r}")
        self.predict = None if predict == "deepest" else predict
        self.student_taps = [*self.exits, *([self.feature] if self.feature and self.feature not in self.exits else [])]
        self.heads = nn.ModuleDict()
        self._predictor_cache: tuple[nn.Module, ExitPredictor] | tuple[()] = ()

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if len(self.heads):
            return
        num_classes = int(_logits(student_view).shape[1])
        maps = {p: tap(student_view, p, "student") for p in self.student_taps}
        deepest = maps[self.feature] if self.feature else None
        if deepest is not None:
            out_dim = int(pool_feature(deepest).shape[1])
            final_relu = bool((deepest >= 0).all())  # match a post-ReLU feature, not a signed one
            ref_hw = deepest.shape[-2:] if deepest.dim() == 4 else None
        else:
            out_dim, final_relu, ref_hw = 0, True, None
        if ref_hw is None:  # downsample towards the smallest tapped map
            sizes = [m.shape[-2:] for m in maps.values() if m.dim() == 4]
            ref_hw = min(sizes, key=lambda s: s[0] * s[1]) if sizes else None
        for p in self.exits:
            x = maps[p]
            stride = 1
            if x.dim() == 4 and ref_hw is not None:
                stride = max(1, min(x.shape[2] // ref_hw[0], x.shape[3] // ref_hw[1]))
            dim = out_dim or int(pool_feature(x).shape[1])
            head = ExitHead(x, dim, num_classes, stride, final_relu).to(device=x.device, dtype=x.dtype)
            head.eval()  # a dry run checks the head fits its input without touching BatchNorm statistics
            head(x)
            head.train()
            self.heads[module_key(p)] = head

    def exit_outputs(self, student_view: View) -> tuple[list[Tensor], list[Tensor]]:
        """The shallow exits' ``(features (B, D), logits (B, K))``, in the order of ``exits``."""
        if not len(self.heads):
            raise RuntimeError(f"{type(self).__name__}.prepare() must run on an example batch first "
                               "(Distiller.prepare or distill.fit do it)")
        outs = [self.heads[module_key(p)](tap(student_view, p, "student")) for p in self.exits]
        return [f for f, _ in outs], [z for _, z in outs]

    def _deepest_feature(self, student_view: View) -> Tensor | None:
        return pool_feature(tap(student_view, self.feature, "student")) if self.feature else None

    def predictor(self, student: nn.Module) -> nn.Module | None:
        """``None`` (the student's own output) unless ``predict`` names an exit or ``"ensemble"``."""
        if self.predict is None or not len(self.heads):
            return None
        heads = [self.heads[module_key(p)] for p in self.exits]
        return _cached_predictor(self, student, lambda: ExitPredictor(student, self.exits, heads, self.predict))

    def extra_repr(self) -> str:
        return f"exits={self.exits}, feature={self.feature!r}, alpha={self.alpha}, lam={self.lam}, T={self.T}"


@register(
    "byot",
    "self",
    Paper(
        title="Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation",
        authors="L. Zhang, J. Song, A. Gao, J. Chen, C. Bao, K. Ma",
        year=2019,
        arxiv="1905.08094",
        venue="ICCV",
    ),
)
class BYOT(ExitsMethod):
    """Be Your Own Teacher: shallow exits learn from the labels, the deepest output and its feature.

    Exits are built on the tapped tensors ``exits`` (any model: feature maps, tokens or vectors)
    from one example batch; the deepest classifier is the student's own output, its feature the
    tap ``feature`` (pooled). The loss is the paper's whole objective,
    :func:`distill.functional.byot_loss` (the deepest classifier's (1 − α)·CE included, so use it
    *without* a separate ``"ce"`` loss)::

        Distiller(student, None, {"byot": BYOT(exits=["stage1", "stage2"], feature="pool")})

    Args:
        exits: tap paths of the intermediate layers that get an exit, shallow to deep.
        feature: tap of the deepest feature (e.g. ``"pool"``, the last stage); each exit's
            bottleneck maps to its width. Required when ``lam > 0``.
        alpha, lam, T: the weight of the KL (1 − α on each CE), of the feature hint, and the
            softmax temperature; defaults 0.3, 0.03, 3 are the authors' code's.
        predict: which classifier the trained model predicts with (``fit`` evaluates it): ``None``
            (the deepest, the student itself), an exit's tap path, or ``"ensemble"`` (mean logits
            of all classifiers).
    """

    def __init__(self, exits: Sequence[str] = ("stage1", "stage2"), feature: str | None = "pool",
                 alpha: float = 0.3, lam: float = 0.03, T: float = 3.0, predict: str | None = None,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(exits, feature, alpha, lam, T, predict, weight, warmup_epochs)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        features, logits = self.exit_outputs(student_view)
        return DF.byot_loss(logits, _logits(student_view), _targets(self, batch), features,
                            self._deepest_feature(student_view), self.alpha, self.lam, self.T)


@register(
    "msd",
    "self",
    Paper(
        title="MSD: Multi-Self-Distillation Learning via Multi-classifiers within Deep Neural Networks",
        authors="Y. Luan, H. Zhao, Z. Yang, Y. Dai",
        year=2019,
        arxiv="1911.09418",
    ),
)
class MSD(ExitsMethod):
    """Multi-self-distillation: the exits of :class:`BYOT`, every classifier taught by all others.

    The loss is :func:`distill.functional.msd_loss` (each classifier's (1 − α)·CE included; use it
    without a separate ``"ce"`` loss). Arguments as :class:`BYOT`; the feature hint (each exit's
    feature to the deepest one's) is off by default (``lam = 0``), so ``feature`` is only needed to
    size the exits or turn it on. With ``lam_decay="cosine"`` (the default) its weight falls over
    the run as ``λ_e = λ·(1 + cos(π e / E)) / 2``: a reading note of the paper describes this
    cosine decay of the feature weight (the paper's text and its value of λ were not readable
    here, so ``lam`` stays 0 unless set); ``"constant"`` keeps λ.
    """

    def __init__(self, exits: Sequence[str] = ("stage1", "stage2"), feature: str | None = None,
                 alpha: float = 0.3, lam: float = 0.0, T: float = 3.0, predict: str | None = None,
                 weight: float = 1.0, warmup_epochs: int = 0, lam_decay: str = "cosine") -> None:
        super().__init__(exits, feature, alpha, lam, T, predict, weight, warmup_epochs)
        if lam_decay not in ("cosine", "constant"):
            raise ValueError(f"lam_decay must be 'cosine' or 'constant', got {lam_decay!r}")
        self.lam_decay = lam_decay
        self.lam_max = self.lam

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        if self.lam_decay == "cosine" and total_epochs:
            self.lam = self.lam_max * (1.0 + math.cos(math.pi * epoch / total_epochs)) / 2.0

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        features, logits = self.exit_outputs(student_view)
        return DF.msd_loss([*logits, _logits(student_view)], _targets(self, batch), features,
                           self._deepest_feature(student_view), self.alpha, self.lam, self.T)


@register(
    "dlb",
    "self",
    Paper(
        title="Self-Distillation from the Last Mini-Batch for Consistency Regularization",
        authors="Y. Shen, L. Xu, Y. Yang, Y. Li, Y. Guo",
        year=2022,
        arxiv="2203.16172",
        venue="CVPR",
    ),
)
class DLB(Method):
    """Self-distillation from the last mini-batch: yesterday's predictions teach today's.

    Keeps the detached logits of the previous training step with the samples' indices; every
    sample of this batch that was in the previous one (matched by ``Batch.index``) is taught by
    its stored prediction with :func:`distill.functional.kd_loss`,
    :math:`T^2\\,\\mathrm{KL}(\\sigma(\\bar z^{t-1}/T) \\,\\|\\, \\sigma(z^t/T))`, averaged over those
    samples (0 when none). The paper makes every batch share half its samples with the previous
    one: train with :class:`~distill.strategies.self_distill.LastBatchLoader` (or
    :func:`~distill.strategies.self_distill.fit_dlb`), with ``losses={"ce": 1, "dlb": alpha}``.

    The store empties at each epoch start and is filled only in training mode. ``log_values``
    reports ``paired``: the fraction of training samples that had a stored prediction (≈ 0.5 with
    the pairing loader; ≈ 0 means the loader does not repeat samples and DLB does nothing).

    Args:
        T: temperature (3, the paper's); the method's ``weight`` is the paper's α (1).
    """

    needs_teacher = False

    def __init__(self, T: float = 3.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.T = _check_number("T", T, 0.0, open_low=True)
        self._last: tuple[Tensor, Tensor] | None = None
        self._seen = 0
        self._paired = 0

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self._last = None
        self._seen = self._paired = 0

    def log_values(self) -> dict[str, float]:
        return {"paired": self._paired / self._seen} if self._seen else {}

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if batch.index is None:
            raise ValueError(
                "DLB pairs each sample with its prediction of the last step by sample index, but the batch has "
                "no index: use a loader that yields indices (InMemoryLoader(..., return_index=True), "
                "IndexedTensorDataset)"
            )
        logits = _logits(student_view)
        index = batch.index.to(logits.device)
        loss = logits.sum() * 0.0
        matched = 0
        if self._last is not None:
            last_index, last_logits = self._last
            rows, cols = (index.view(-1, 1) == last_index.view(1, -1)).nonzero(as_tuple=True)
            if rows.numel():
                loss = DF.kd_loss(logits[rows], last_logits[cols], self.T)
                matched = int(rows.unique().numel())
        if self.training:
            self._last = (index.detach().clone(), logits.detach())
            self._seen += int(index.numel())
            self._paired += matched
        return loss


@register(
    "zipf_ls",
    "self",
    Paper(
        title="Efficient One Pass Self-distillation with Zipf's Label Smoothing",
        authors="J. Liang, L. Li, Z. Bing, B. Zhao, Y. Tang, B. Lin, H. Fan",
        year=2022,
        arxiv="2207.12980",
        venue="ECCV",
    ),
)
class ZipfLS(Method):
    """Zipf's label smoothing: soft labels ∝ rank^-power over the model's own ranking of the classes.

    The ranking comes from the dense prediction, as in the paper: the student's classifier applied
    at every location of the last feature map (tap ``feature``, bilinearly upsampled by
    ``upsample``), each location voting for its argmax class; classes are ranked by votes (ties
    share the smaller rank). Without ``feature`` (a model with no feature map, e.g. an MLP) the
    classes are ranked by the final logits instead, the reference code's non-dense mode. The
    ranking is computed without gradient. Loss: :func:`distill.functional.zipf_ls_loss`, used
    beside cross-entropy: ``losses={"ce": 1.0, "zipf_ls": 0.1}``.

    Args:
        feature: tap of the last feature map ``(B, C, H, W)``, or ``None`` to rank by the logits.
        classifier: module path of the student's classifier applied to each location (its input
            width must be C); default: the student's last ``nn.Linear``.
        power: the Zipf exponent (1, the reference code's).
        upsample: integer upsampling factor of the map before the dense prediction (2: the
            reference code's bilinear upsampling on CIFAR; 1 on ImageNet).
        correct_only: apply the loss only to correctly classified samples (the reference code's
            ``--mask``, off by default).
        weight: λ; 0.1 is the reference code's CIFAR-100 and ImageNet setting (1.0 on
            TinyImageNet and iNat).
    """

    needs_teacher = False
    needs_targets = True

    def __init__(self, feature: str | None = None, classifier: str | None = None, power: float = 1.0,
                 upsample: int = 2, correct_only: bool = False, weight: float = 0.1,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.power = _check_number("power", power, 0.0, open_low=True)
        if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
            raise ValueError(f"upsample must be a positive int, got {upsample!r}")
        self.feature = None if feature is None else str(feature)
        self.classifier_path = classifier
        self.upsample, self.correct_only = upsample, bool(correct_only)
        self.student_taps = [self.feature] if self.feature else []
        self._classifier: tuple[nn.Module, ...] = ()
        # the dense prediction reuses the student's classifier, found when the Distiller is prepared
        self.requires_prepare = self.feature is not None  # type: ignore[misc]

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        if self.feature is None:
            return
        if self.classifier_path is not None:
            module = resolve(student, self.classifier_path, model_name="student")
        else:
            linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("ZipfLS's dense prediction needs the student's classifier, but the student has no "
                                 "nn.Linear: pass classifier=<module path>, or feature=None to rank by the logits")
            module = linears[-1]
        self._classifier = (module,)  # by reference: it is the student's, trained and saved with it

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.feature is None:
            return
        fmap = tap(student_view, self.feature, "student")
        if fmap.dim() != 4:
            raise ValueError(f"ZipfLS feature {self.feature!r} must be a (B, C, H, W) map, got "
                             f"{tuple(fmap.shape)}; use feature=None to rank by the logits")
        dense = self._dense_logits(fmap)
        if dense.shape[1] != _logits(student_view).shape[1]:
            raise ValueError(f"the classifier maps the {self.feature!r} map to {dense.shape[1]} classes, "
                             f"the student has {_logits(student_view).shape[1]}")

    def _dense_logits(self, fmap: Tensor) -> Tensor:
        if not self._classifier:
            raise RuntimeError("ZipfLS with a feature map needs Distiller.prepare(example) first (it finds the "
                               "student's classifier)")
        if self.upsample > 1:
            fmap = F.interpolate(fmap, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        try:
            dense = self._classifier[0](fmap.permute(0, 2, 3, 1))  # (B, H, W, K)
        except RuntimeError as e:
            raise ValueError(f"the classifier cannot be applied to each location of the {self.feature!r} map "
                             f"{tuple(fmap.shape)}: {e}") from None
        return dense.permute(0, 3, 1, 2)

    def ranks(self, student_view: View) -> Tensor:
        """The model's own ranking of the classes ``(B, K)`` (1 = first), from its dense votes or logits."""
        with torch.no_grad():
            if self.feature is None:
                return DF.zipf_ranks(_logits(student_view).detach().float())
            votes = DF.dense_class_votes(self._dense_logits(tap(student_view, self.feature, "student").detach()))
            return DF.zipf_ranks(votes)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return DF.zipf_ls_loss(_logits(student_view), _targets(self, batch), self.ranks(student_view),
                               self.power, self.correct_only)


@register(
    "tf_fd",
    "self",
    Paper(
        title="Self-Regulated Feature Learning via Teacher-free Feature Distillation",
        authors="L. Li",
        year=2022,
        venue="ECCV",
    ),
)
class TfFD(Method):
    """Teacher-free feature distillation: salient channels and deeper layers teach the rest.

    For the tapped maps :math:`F_1..F_n` (shallow to deep):

    .. math:: L = w_{intra} \\frac{1}{n} \\sum_i L_{intra}(F_i)
                + w_{inter} \\frac{1}{\\binom{n}{2}} \\sum_{i<j} L_{inter}(F_i, F_j)

    with :func:`distill.functional.tffd_intra_loss` and :func:`~distill.functional.tffd_inter_loss`
    (the teaching side detached in both). Used beside cross-entropy.

    Args:
        taps: at least two ``(B, C, H, W)`` stage outputs, shallow to deep (the reference code uses
            the three stage outputs of a CIFAR ResNet).
        intra, inter: weights of the two terms: 4e-4 and 5e-3, the reference code's CIFAR-100
            script (``--lambda_intra 4e-4 --lambda_inter 5e-3``, on mean-squared errors). The
            published training scripts mix up the two names and weigh both terms with
            ``lambda_intra``; we keep one weight per term.
    """

    needs_teacher = False

    def __init__(self, taps: Sequence[str] = ("stage1", "stage2", "stage3"), intra: float = 4e-4,
                 inter: float = 5e-3, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if isinstance(taps, str) or len(taps) < 2:
            raise ValueError(f"Tf-FD needs at least two tap paths (shallow to deep), got {taps!r}")
        self.taps = [str(p) for p in taps]
        self.intra = _check_number("intra", intra, 0.0)
        self.inter = _check_number("inter", inter, 0.0)
        self.student_taps = list(self.taps)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        maps = [tap(student_view, p, "student") for p in self.taps]
        intra = torch.stack([DF.tffd_intra_loss(f) for f in maps]).mean()
        inter = torch.stack([DF.tffd_inter_loss(maps[i], maps[j])
                             for i in range(len(maps)) for j in range(i + 1, len(maps))]).mean()
        return self.intra * intra + self.inter * inter


class SLAPredictor(nn.Module):
    """SLA's aggregated inference: the student on the four rotations of each image, the joint head
    on its feature, :func:`~distill.functional.sla_aggregate` → logits ``(B, K)`` (four forwards
    per image; the single head is the cheap alternative it distils into)."""

    def __init__(self, student: nn.Module, feature: str, head: nn.Module) -> None:
        super().__init__()
        self.student, self.head, self.feature = student, head, feature
        self._taps = Taps(student, [feature], model_name="student")

    def forward(self, x: Tensor) -> Tensor:
        with self._taps.recording() as store:
            self.student(DF.sla_rotations(x))
        joint = self.head(pool_feature(store[self.feature]))
        return DF.sla_aggregate(joint.view(x.shape[0], 4, -1))

    def remove_hooks(self) -> None:
        self._taps.remove()


@register(
    "sla",
    "self",
    Paper(
        title="Self-supervised Label Augmentation via Input Transformations",
        authors="H. Lee, S. J. Hwang, J. Shin",
        year=2020,
        arxiv="1910.05872",
        venue="ICML",
    ),
)
class SLA(Method):
    """Self-supervised label augmentation with self-distillation (SLA+SD), rotations as transformations.

    The batch holds each image's four rotations, sample-major (row ``4b + j``: image b turned j
    quarter turns; :class:`~distill.strategies.self_distill.RotationLoader` builds such batches).
    A joint head (a linear layer built from the tap ``feature``, pooled, to ``4 K`` outputs) learns
    the (class, rotation) labels; the student's own output on the unrotated image is the single
    head, trained with CE and taught by the aggregated joint prediction:
    :func:`distill.functional.sla_sd_loss`, the whole objective (use it without ``"ce"``).

    Args:
        feature: tap of the penultimate feature the joint head reads (``"pool"`` in our zoo).
        T, beta: distillation temperature and the single head's CE weight (1 and 1, the
            reference code's).
        predict: ``"single"`` (the student itself, SLA+SD) or ``"aggregated"`` (SLA+AG: four
            rotated forwards and the joint head, :class:`SLAPredictor`).
    """

    needs_teacher = False
    needs_targets = True
    requires_prepare = True
    transforms = 4

    def __init__(self, feature: str = "pool", T: float = 1.0, beta: float = 1.0, predict: str = "single",
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.feature = str(feature)
        self.T = _check_number("T", T, 0.0, open_low=True)
        self.beta = _check_number("beta", beta, 0.0)
        if predict not in ("single", "aggregated"):
            raise ValueError(f"predict must be 'single' or 'aggregated', got {predict!r}")
        self.predict = predict
        self.student_taps = [self.feature]
        self.head: nn.Module | None = None
        self._predictor_cache: tuple[nn.Module, SLAPredictor] | tuple[()] = ()

    def _split(self, student_view: View, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(features (B, M, D), single logits (B, K), targets (B,)) from a batch of B*M rotated images."""
        logits, m = _logits(student_view), self.transforms
        n = logits.shape[0]
        if n % m:
            raise ValueError(f"SLA needs each image's {m} rotations in the batch (a multiple of {m} rows), got {n} "
                             "rows: train with RotationLoader (or fit_sla)")
        targets = _targets(self, batch).view(n // m, m)
        if not bool((targets == targets[:, :1]).all()):
            raise ValueError("SLA batches hold each image's rotations in consecutive rows with one label; the labels "
                             "of rows 4b..4b+3 differ: train with RotationLoader (or fit_sla)")
        feature = pool_feature(tap(student_view, self.feature, "student"))
        return feature.view(n // m, m, -1), logits.view(n // m, m, -1)[:, 0], targets[:, 0]

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.head is not None:
            return
        feature = pool_feature(tap(student_view, self.feature, "student"))
        k = int(_logits(student_view).shape[1])
        self.head = nn.Linear(feature.shape[1], k * self.transforms).to(device=feature.device, dtype=feature.dtype)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.head is None:
            raise RuntimeError("SLA.prepare() must run on an example batch first (Distiller.prepare or distill.fit)")
        feature, single, targets = self._split(student_view, batch)
        return DF.sla_sd_loss(self.head(feature), single, targets, self.T, self.beta)

    def predictor(self, student: nn.Module) -> nn.Module | None:
        """``None`` (the single head: the student itself) unless ``predict="aggregated"``."""
        if self.predict != "aggregated" or self.head is None:
            return None
        head = self.head
        return _cached_predictor(self, student, lambda: SLAPredictor(student, self.feature, head))
