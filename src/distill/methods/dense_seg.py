"""Semantic-segmentation distillation: Structured KD (pixel, pair-wise, holistic), Knowledge
Adaptation, IFVD, CIRKD and Graph Flow (issue 14).

Each ``forward`` returns the *unweighted* loss; the math is in
:mod:`distill.functional.dense_seg`. Maps are read from the views by tap path; ``"logits"`` is
the model's own output (for :class:`~distill.models.segmentation.SegNet` the ``(B, K, H/4, W/4)``
scores), anything else a tap (``"feat"``, ``"backbone_out.1"``...). Teacher tensors are detached
here. Trainable parts (adaptation units, auto-encoders, the holistic critic, CIRKD's projection
head and memory banks) are built by :meth:`prepare` from one example batch, before the optimizer
is made. Methods that read labels (IFVD, CIRKD) take the semantic masks ``batch.targets``
``(B, H, W)`` (255 = ignored) and resize them to the feature map by nearest neighbour.

The auto-encoders of Knowledge Adaptation and Graph Flow are pre-trained on the teacher's
features first (the papers' first stage), with the stage each method offers::

    ka = KnowledgeAdaptation()
    d = Distiller(student, teacher, {"seg_ce": 1.0, "knowledge_adaptation": ka})
    fit_hint_stage(d, loader, method="ka_autoencoder", epochs=2)   # trains the auto-encoder only
    fit(d, loader, ...)                                            # the auto-encoder is frozen now
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import check_batch, tap as _tap, tap_pairs as _pairs
from distill.methods.base import Method, Paper, register

SKD_PAPER = Paper(
    title="Structured Knowledge Distillation for Semantic Segmentation",
    authors="Y. Liu, K. Chen, C. Liu, Z. Qin, Z. Luo, J. Wang",
    year=2019,
    arxiv="1903.04197",
    venue="CVPR",
)
KA_PAPER = Paper(
    title="Knowledge Adaptation for Efficient Semantic Segmentation",
    authors="T. He, C. Shen, Z. Tian, D. Gong, C. Sun, Y. Yan",
    year=2019,
    arxiv="1903.04688",
    venue="CVPR",
)
IFVD_PAPER = Paper(
    title="Intra-class Feature Variation Distillation for Semantic Segmentation",
    authors="Y. Wang, W. Zhou, T. Jiang, X. Bai, Y. Xu",
    year=2020,
    arxiv=None,  # no arXiv version found; "2003.05503" (the issue's) is another paper
    venue="ECCV",
)
CIRKD_PAPER = Paper(
    title="Cross-Image Relational Knowledge Distillation for Semantic Segmentation",
    authors="C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang",
    year=2022,
    arxiv="2204.06986",
    venue="CVPR",
)
GRAPH_FLOW_PAPER = Paper(
    title="Graph Flow: Cross-layer Graph Flow Distillation for Dual Efficient Medical Image Segmentation",
    authors="W. Zou, X. Qi, W. Zhou, M. Sun, Z. Sun, C. Shan",
    year=2022,
    arxiv="2203.08667",
    venue="IEEE TMI",
)


def _tap_list(path: str) -> list[str]:
    """The tap to install for ``path``: none for ``"logits"`` (the model's own output)."""
    return [] if path == "logits" else [path]


def _map(view: View, path: str, side: str, what: str) -> Tensor:
    x = _tap(view, path, side)
    if x.dim() != 4:
        raise ShapeMismatchError(f"{what} needs a (B, C, H, W) map at {side}:{path}, got {tuple(x.shape)}")
    return x


def _resize_to(x: Tensor, like: Tensor) -> Tensor:
    """``x`` bilinearly resized to ``like``'s H x W (itself when they agree)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=tuple(like.shape[-2:]), mode="bilinear", align_corners=False)


def _labels(batch: Batch, like: Tensor, what: str) -> Tensor:
    """The batch's semantic masks resized (nearest) to ``like``'s H x W: ``(B, h, w)`` long."""
    if batch.targets is None or batch.targets.dim() != 3:
        got = None if batch.targets is None else tuple(batch.targets.shape)
        raise ValueError(f"{what} needs semantic masks (B, H, W) as batch.targets, got {got}")
    if batch.targets.shape[0] != like.shape[0]:
        raise ShapeMismatchError(f"{what}: masks {tuple(batch.targets.shape)} vs maps {tuple(like.shape)}")
    return DF.seg_resize_labels(batch.targets, tuple(like.shape[-2:]))


def _num_classes(given: int | None, teacher_view: View, what: str) -> int:
    if given is not None:
        return int(given)
    logits = teacher_view.get("logits")
    if isinstance(logits, Tensor) and logits.dim() == 4:
        return int(logits.shape[1])
    raise ValueError(f"{what}: pass num_classes (the teacher's logits are not a (B, K, H, W) map to read it from)")


# ============================================================================================
# Structured KD: pixel-wise and pair-wise
# ============================================================================================


@register("skd_pixel", "segmentation", SKD_PAPER)
class SKDPixel(Method):
    """SKD pixel-wise distillation: τ²/(B·H·W) Σ KL(p^T_i ‖ p^S_i) over every pixel's class distribution.

    Reads the student's and the teacher's score maps (default ``"logits"``, ``(B, K, h, w)``);
    a student map of another resolution is resized bilinearly to the teacher's first.

    Defaults: weight 10 = the authors' ``--lambda-pi 10.0`` (irfanICMLL/structure_knowledge_distillation
    ``utils/train_options.py``), τ = 1 (the paper has no temperature). The paper's text could not
    be read here (abstract only); formula and normalisation: :func:`distill.functional.seg_pixel_kd_loss`.
    """

    def __init__(self, student_tap: str = "logits", teacher_tap: str = "logits", tau: float = 1.0,
                 weight: float = 10.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.student_tap, self.teacher_tap, self.tau = str(student_tap), str(teacher_tap), float(tau)
        self.student_taps, self.teacher_taps = _tap_list(self.student_tap), _tap_list(self.teacher_tap)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s = _map(student_view, self.student_tap, "student", "skd_pixel")
        t = _map(teacher_view, self.teacher_tap, "teacher", "skd_pixel").detach()
        check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        if s.shape[1] != t.shape[1]:
            raise ShapeMismatchError(f"skd_pixel compares class distributions: the student has {s.shape[1]} classes, "
                                     f"the teacher {t.shape[1]}")
        return DF.seg_pixel_kd_loss(_resize_to(s, t), t, self.tau)

    def extra_repr(self) -> str:
        return f"{self.student_tap} -> {self.teacher_tap}, tau={self.tau}, weight={self.weight}"


@register("skd_pairwise", "segmentation", SKD_PAPER)
class SKDPairwise(Method):
    """SKD pair-wise distillation: 1/N² Σ_ij (a^S_ij − a^T_ij)² of node cosine similarities, nodes = max-pooled patches.

    Reads a feature map of each model (default ``"feat"``, the last one before the classifier;
    channels may differ, no adapter is needed); a student map of another resolution is resized
    bilinearly to the teacher's. ``pool_scale`` s: windows of ⌊H·s⌋ x ⌊W·s⌋ (0.5 → 2 x 2 nodes).

    Defaults: weight 1 = ``--lambda-pa 1.0``, s = 0.5 = ``--pool-scale 0.5`` of the authors' code
    (the paper's text could not be read here). Formula: :func:`distill.functional.skd_pairwise_loss`.
    """

    def __init__(self, student_tap: str = "feat", teacher_tap: str = "feat", pool_scale: float = 0.5,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not 0.0 < pool_scale <= 1.0:
            raise ValueError(f"pool_scale must be in (0, 1], got {pool_scale}")
        self.student_tap, self.teacher_tap, self.pool_scale = str(student_tap), str(teacher_tap), float(pool_scale)
        self.student_taps, self.teacher_taps = _tap_list(self.student_tap), _tap_list(self.teacher_tap)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s = _map(student_view, self.student_tap, "student", "skd_pairwise")
        t = _map(teacher_view, self.teacher_tap, "teacher", "skd_pairwise").detach()
        check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        return DF.skd_pairwise_loss(_resize_to(s, t), t, self.pool_scale)

    def extra_repr(self) -> str:
        return f"{self.student_tap} -> {self.teacher_tap}, pool_scale={self.pool_scale}, weight={self.weight}"


# ============================================================================================
# Structured KD: holistic (Wasserstein critic owned by the method)
# ============================================================================================


class _SelfAttention(nn.Module):
    """SAGAN's self-attention block (Zhang et al. 2019, arXiv 1805.08318): x + γ·softmax(QᵀK)-weighted V, γ from 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // 8)
        self.query, self.key = nn.Conv2d(channels, inner, 1), nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, c')
        k = self.key(x).flatten(2)  # (B, c', N)
        attn = torch.softmax(torch.bmm(q, k), dim=-1)  # (B, N, N)
        v = self.value(x).flatten(2)  # (B, C, N)
        return x + self.gamma * torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)


class SKDCritic(nn.Module):
    """The holistic term's Wasserstein critic: spectrally normalised 4x4 stride-2 convs with LeakyReLU(0.1),
    a self-attention block, and a last conv that covers the remaining map → one score per image.

    The shape of SKD's discriminator (the authors' ``networks/sagan_models.py``: SAGAN-style, spectral
    norm, two self-attention blocks, ``--adv-conv-dim 64``), scaled down: convs halve the map until it is
    at most 4 x 4 (at least one), widths ``dim, 2·dim, ...`` (at most 8·dim), one attention block after
    the second conv (or the first when there is one). ``forward(x)``: ``(B, in_channels, h, w) → (B,)``.
    """

    def __init__(self, in_channels: int, size: tuple[int, int], dim: int = 32) -> None:
        super().__init__()
        h, w = int(size[0]), int(size[1])
        layers: list[nn.Module] = []
        c_in, c_out = in_channels, dim
        n = 0
        while n == 0 or (h > 4 and w > 4):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.1)]
            h, w = h // 2, w // 2
            n += 1
            if n == 2:
                layers.append(_SelfAttention(c_out))
            c_in, c_out = c_out, min(c_out * 2, 8 * dim)
        if n == 1:
            layers.append(_SelfAttention(c_in))
        if h < 1 or w < 1:
            raise ShapeMismatchError(f"the critic needs maps of at least 2 x 2, got {tuple(size)}")
        self.body = nn.Sequential(*layers)
        self.last = nn.Conv2d(c_in, 1, (h, w))

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.body(x)).flatten(1).mean(dim=1)


@register("skd_holistic", "segmentation", SKD_PAPER)
class SKDHolistic(Method):
    """SKD holistic distillation: a Wasserstein critic tells the teacher's segmentation maps from the student's.

    The critic D (:class:`SKDCritic`, owned by this method, built by :meth:`prepare`) scores a map
    ``softmax(z)`` ``(B, K, h, w)``, with the input image average-pooled to ``h x w`` concatenated when
    ``condition_on_image`` (the paper's conditional GAN). The student minimises −E[D(S)] (WGAN), the
    critic E[D(S)] − E[D(T)] + λ_gp·GP (WGAN-GP, λ_gp = 10).

    **How the critic trains (one backward, no hidden optimizer).** ``forward`` returns

    .. math:: L = c\\,\\big(\\bar D(\\mathrm{GRL}_{1/c}(S)) - \\bar D(T) + \\lambda_{gp} GP\\big)

    where GRL is a gradient-reversal layer (:func:`distill.functional.grad_reverse`) of strength 1/c
    on the student's map and ``c = critic_scale``. The critic's parameters receive c·∇(critic loss);
    the student receives exactly ∇(−E[D(S)]) (the reversal turns the critic's descent direction into
    the student's). The Distiller's optimizer steps both: under SGD the critic's step is the
    student's learning rate times ``weight · critic_scale``; the authors train D with its own SGD at
    lr 4e-4 beside the student's 1e-2, so ``critic_scale=0.04`` reproduces that ratio (Adam
    normalises a gradient's scale away: there ``critic_scale`` changes little). One critic step per
    student step (the authors alternate one each too). The value logged for this loss is the
    critic's objective (minus the Wasserstein estimate, plus the penalty), not the student's.
    The GP's interpolation weights come from a ``torch.Generator`` seeded with ``seed``.

    Defaults: weight λ_d = 0.1 (``--lambda-d 0.1``, applied by the authors to both the student's
    and the critic's adversarial terms), λ_gp = 10 (``--lambda-gp 10.0``): the authors' code; the
    paper's text could not be read here. Departures: the authors feed raw scores through a
    BatchNorm into an unconditioned critic; we feed class probabilities (bounded, no BatchNorm,
    which WGAN-GP advises against in a critic) and condition on the image by default.
    """

    requires_prepare = True  # the critic is sized from the example maps

    def __init__(self, student_tap: str = "logits", teacher_tap: str = "logits", condition_on_image: bool = True,
                 gp_weight: float = 10.0, critic_scale: float = 1.0, critic_dim: int = 32, seed: int = 0,
                 weight: float = 0.1, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if gp_weight < 0:
            raise ValueError(f"gp_weight must be >= 0, got {gp_weight}")
        if critic_scale <= 0:
            raise ValueError(f"critic_scale must be > 0, got {critic_scale}")
        if critic_dim < 1:
            raise ValueError(f"critic_dim must be >= 1, got {critic_dim}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.condition_on_image = bool(condition_on_image)
        self.gp_weight, self.critic_scale, self.critic_dim = float(gp_weight), float(critic_scale), int(critic_dim)
        self.seed = int(seed)
        self.student_taps, self.teacher_taps = _tap_list(self.student_tap), _tap_list(self.teacher_tap)
        self.critic: SKDCritic | None = None
        self.generator = torch.Generator().manual_seed(self.seed)

    def _maps(self, student_view: View, teacher_view: View, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
        s = _map(student_view, self.student_tap, "student", "skd_holistic")
        t = _map(teacher_view, self.teacher_tap, "teacher", "skd_holistic").detach()
        check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        if s.shape[1] != t.shape[1]:
            raise ShapeMismatchError(f"skd_holistic: the student has {s.shape[1]} classes, the teacher {t.shape[1]}")
        cond = None
        if self.condition_on_image:
            x = batch.inputs
            if x.dim() != 4 or x.shape[0] != t.shape[0]:
                raise ShapeMismatchError(f"skd_holistic conditions on images (B, C, H, W), got inputs {tuple(x.shape)}"
                                         " (condition_on_image=False for other inputs)")
            cond = F.adaptive_avg_pool2d(x.to(t.dtype), tuple(t.shape[-2:]))
        return torch.softmax(_resize_to(s, t), dim=1), torch.softmax(t, dim=1), cond

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.critic is not None:
            return
        s, t, cond = self._maps(student_view, teacher_view, batch)
        c = t.shape[1] + (0 if cond is None else cond.shape[1])
        self.critic = SKDCritic(c, tuple(t.shape[-2:]), self.critic_dim).to(device=t.device, dtype=t.dtype)

    def score(self, maps: Tensor, cond: Tensor | None) -> Tensor:
        """The critic's scores ``(B,)`` of class-probability maps ``(B, K, h, w)`` (and the condition)."""
        if self.critic is None:
            raise RuntimeError("SKDHolistic.prepare() must be called on an example batch before the first forward")
        return self.critic(maps if cond is None else torch.cat([maps, cond], dim=1))

    def draw_alpha(self, batch_size: int, device: torch.device) -> Tensor:
        """The GP's interpolation weights ``(B,)`` ~ U(0, 1) from the method's generator."""
        return torch.rand(batch_size, generator=self.generator).to(device)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t, cond = self._maps(student_view, teacher_view, batch)
        fake = self.score(DF.grad_reverse(s, 1.0 / self.critic_scale), cond)
        real = self.score(t, cond)
        gp = DF.wgan_gradient_penalty(lambda m: self.score(m, cond), t, s, self.draw_alpha(t.shape[0], t.device)) \
            if self.gp_weight > 0 else s.sum() * 0.0
        return self.critic_scale * (DF.wgan_critic_loss(real, fake) + self.gp_weight * gp)

    def extra_repr(self) -> str:
        return (f"{self.student_tap} -> {self.teacher_tap}, condition_on_image={self.condition_on_image}, "
                f"gp_weight={self.gp_weight}, critic_scale={self.critic_scale}, weight={self.weight}")


# ============================================================================================
# Auto-encoders shared by Knowledge Adaptation and Graph Flow, and their pre-training stage
# ============================================================================================


class ConvAutoencoder(nn.Module):
    """A feature auto-encoder: encoder 3x3 conv (C→C) → LeakyReLU(0.1) → 3x3 conv (C→C') → LeakyReLU(0.1);
    decoder 3x3 conv (C'→C) → LeakyReLU(0.1) → 3x3 conv (C→C). Resolution is kept.

    The layout of Graph Flow's paraphraser (WrinkleXuan/Graph-FLow ``networks/feature_projection.py``,
    three convs each way there); Knowledge Adaptation's auto-encoder is described only in its paper's
    text, which could not be read here, so this one serves it too.
    """

    def __init__(self, channels: int, latent_channels: int) -> None:
        super().__init__()
        if channels < 1 or latent_channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels} and {latent_channels}")
        self.channels, self.latent_channels = int(channels), int(latent_channels)
        self.encoder = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.1),
                                     nn.Conv2d(channels, latent_channels, 3, padding=1), nn.LeakyReLU(0.1))
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, channels, 3, padding=1), nn.LeakyReLU(0.1),
                                     nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class _AutoencoderOwner(Method):
    """A method with frozen, pre-trainable teacher-side auto-encoders (one per teacher tap)."""

    autoencoders: nn.ModuleList | None

    def ae_teacher_taps(self) -> list[str]:
        raise NotImplementedError

    def freeze_autoencoders(self, frozen: bool = True) -> None:
        """``requires_grad = not frozen`` on the auto-encoders (no-op before they exist); freezing drops
        gradients left over from pre-training."""
        if self.autoencoders is not None:
            self.autoencoders.requires_grad_(not frozen)
            if frozen:
                for p in self.autoencoders.parameters():
                    p.grad = None

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self.freeze_autoencoders()  # the pre-training stage unfroze them

    def encode(self, i: int, teacher_map: Tensor) -> Tensor:
        """The frozen encoder ``i`` on a (detached) teacher map, under ``no_grad``."""
        if self.autoencoders is None:
            raise RuntimeError(f"{type(self).__name__}.prepare() must be called on an example batch first")
        with torch.no_grad():
            return self.autoencoders[i].encoder(teacher_map)


class _AutoencoderStage(Method):
    """The owner's first stage: mean squared reconstruction error of each auto-encoder on its teacher map.

    Trains only the auto-encoders (the loss reads no student tensor). It reads the owner's student
    taps too, so that a stage built alone can size the owner's parts. While it trains (its
    :meth:`prepare` and each epoch start) the auto-encoders require grad; the owner freezes them.
    """

    owner_cls: type[_AutoencoderOwner]
    requires_prepare = True

    def __init__(self, owner: _AutoencoderOwner | None = None, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if owner is not None and not isinstance(owner, self.owner_cls):
            raise TypeError(f"{type(self).__name__} pre-trains a {self.owner_cls.__name__}'s auto-encoders, got "
                            f"{type(owner).__name__}")
        self.owner = owner if owner is not None else self.owner_cls()
        self.student_taps = list(self.owner.student_taps)
        self.teacher_taps = list(self.owner.teacher_taps)

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        self.owner.prepare(student_view, teacher_view, batch)
        self.owner.freeze_autoencoders(False)

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self.owner.freeze_autoencoders(False)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        aes = self.owner.autoencoders
        if aes is None:
            raise RuntimeError(f"{type(self).__name__}.prepare() must be called on an example batch first")
        losses = [DF.feature_reconstruction_loss(ae(t), t) for ae, t in
                  zip(aes, (_tap(teacher_view, p, "teacher").detach() for p in self.owner.ae_teacher_taps()))]
        return torch.stack(losses).sum()


# ============================================================================================
# Knowledge Adaptation
# ============================================================================================


@register("knowledge_adaptation", "segmentation", KA_PAPER)
class KnowledgeAdaptation(_AutoencoderOwner):
    """Knowledge Adaptation: match the student's adapted feature to the teacher's auto-encoded (latent)
    feature, normalised, plus the affinity (position-to-position cosine) distillation.

    .. math:: L = \\alpha\\, L_{adapt}(C_f(F^S), E(F^T)) + \\beta\\, L_{aff}(C_f(F^S), E(F^T))

    E is the encoder of a :class:`ConvAutoencoder` on the teacher's ``teacher_tap`` (latent width
    ⌈C_t·``latent_ratio``⌉), pre-trained by the ``"ka_autoencoder"`` stage
    (``fit_hint_stage(d, loader, method="ka_autoencoder", ...)``) and frozen here; C_f the student's
    adaptation unit (3x3 conv → ReLU → 3x3 conv, C_s → latent width), trained with the student.
    The adapted map is resized bilinearly to the latent's grid when they differ. Without the
    stage the encoder is a fixed random projection (it still trains, but that is not the paper).

    Sources (He, Shen, Tian, Gong, Sun, Yan, CVPR 2019, arXiv 1903.04688): only the abstract could be
    read ("feature similarity in a transferred latent domain formulated by utilizing a pre-trained
    autoencoder", "an affinity distillation module ... non-local interactions across the whole
    image"). Issue 14 searched again on 2026-12-07: the stored ar5iv page and a copy of the CVF
    paper (fdocuments.in) give the abstract and introduction only (the copy's contents name 3.1
    "Knowledge Translation and Adaptation" and 3.2 "Affinity Distillation Module", unread),
    third-party summaries add nothing quantitative, and no authors' code is known. So α = 50, β = 1, p = 2 and latent_ratio = 0.5
    are our reading, unverified; the auto-encoder and adaptation-unit layouts are ours. Formulas:
    :func:`distill.functional.ka_adaptation_loss`, :func:`distill.functional.ka_affinity_loss`.
    """

    requires_prepare = True
    stages = ("ka_autoencoder",)

    def __init__(self, student_tap: str = "feat", teacher_tap: str = "feat", latent_ratio: float = 0.5,
                 adaptation_weight: float = 50.0, affinity_weight: float = 1.0, p: float = 2.0,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not 0.0 < latent_ratio <= 1.0:
            raise ValueError(f"latent_ratio must be in (0, 1], got {latent_ratio}")
        if adaptation_weight < 0 or affinity_weight < 0:
            raise ValueError(f"adaptation_weight and affinity_weight must be >= 0, got {adaptation_weight}, "
                             f"{affinity_weight}")
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.latent_ratio, self.p = float(latent_ratio), float(p)
        self.adaptation_weight, self.affinity_weight = float(adaptation_weight), float(affinity_weight)
        self.student_taps, self.teacher_taps = _tap_list(self.student_tap), _tap_list(self.teacher_tap)
        self.autoencoders = None
        self.adapter: nn.Module | None = None

    def ae_teacher_taps(self) -> list[str]:
        return [self.teacher_tap]

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _map(student_view, self.student_tap, "student", "knowledge_adaptation")
        t = _map(teacher_view, self.teacher_tap, "teacher", "knowledge_adaptation").detach()
        check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.autoencoders is None:
            s, t = self._pair(student_view, teacher_view)
            latent = max(1, math.ceil(t.shape[1] * self.latent_ratio))
            self.autoencoders = nn.ModuleList([ConvAutoencoder(t.shape[1], latent)]).to(device=t.device, dtype=t.dtype)
            self.adapter = nn.Sequential(nn.Conv2d(s.shape[1], latent, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(latent, latent, 3, padding=1)).to(device=s.device, dtype=s.dtype)
        self.freeze_autoencoders()

    def stage_method(self, name: str) -> Method:
        """``"ka_autoencoder"``: the auto-encoder's pre-training loss, sharing this method's auto-encoder."""
        if name != "ka_autoencoder":
            return super().stage_method(name)
        return KAAutoencoder(owner=self)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.adapter is None:
            raise RuntimeError("KnowledgeAdaptation.prepare() must be called on an example batch first")
        s, t = self._pair(student_view, teacher_view)
        z = self.encode(0, t)
        a = _resize_to(self.adapter(s), z)
        return (self.adaptation_weight * DF.ka_adaptation_loss(a, z, self.p)
                + self.affinity_weight * DF.ka_affinity_loss(a, z))

    def extra_repr(self) -> str:
        return (f"{self.student_tap} -> {self.teacher_tap}, latent_ratio={self.latent_ratio}, "
                f"adaptation_weight={self.adaptation_weight}, affinity_weight={self.affinity_weight}, p={self.p}, "
                f"weight={self.weight}")


@register("ka_autoencoder", "segmentation", KA_PAPER)
class KAAutoencoder(_AutoencoderStage):
    """Knowledge Adaptation's first stage: the teacher auto-encoder's reconstruction error (mean squared).

    Build it with ``KnowledgeAdaptation().stage_method("ka_autoencoder")`` (or let
    ``fit_hint_stage(d, loader, method="ka_autoencoder")`` find it) so it shares the auto-encoder;
    built alone it owns a fresh :class:`KnowledgeAdaptation` (``.owner``).
    """

    owner_cls = KnowledgeAdaptation


# ============================================================================================
# IFVD
# ============================================================================================


@register("ifvd", "segmentation", IFVD_PAPER)
class IFVD(Method):
    """IFVD: match each pixel's cosine similarity to its class prototype (student vs teacher), over labelled pixels.

    Prototypes are class means of the feature map over each image's pixels of that class, classes
    from the ground-truth masks (``batch.targets``, resized to the map by nearest neighbour). Reads
    a feature map of each model (default ``"feat"``); channels may differ; the two maps must share
    their H x W (a student map of another size is resized bilinearly to the teacher's).
    ``num_classes``: None reads K from the teacher's ``(B, K, h, w)`` logits.

    Defaults: weight 200 = the authors' ``--lambda-ifv 200.0`` (YukangWang/IFVD ``options.py``). The
    paper trains IFVD together with pixel-wise KD (their λ_kd = 10) and SKD's holistic term: add
    ``"skd_pixel"`` and ``"skd_holistic"`` for the full recipe. The paper's text could not be read
    here; no arXiv version of it was found (the issue's "2003.05503" is Mambretti et al., a
    memory-safety paper): ECCV 2020, LNCS 12352, doi 10.1007/978-3-030-58571-6_21.
    Formula: :func:`distill.functional.ifvd_loss`.
    """

    needs_targets = True

    def __init__(self, student_tap: str = "feat", teacher_tap: str = "feat", num_classes: int | None = None,
                 ignore_index: int = 255, weight: float = 200.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.num_classes, self.ignore_index = num_classes, int(ignore_index)
        self.student_taps, self.teacher_taps = _tap_list(self.student_tap), _tap_list(self.teacher_tap)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s = _map(student_view, self.student_tap, "student", "ifvd")
        t = _map(teacher_view, self.teacher_tap, "teacher", "ifvd").detach()
        check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        k = _num_classes(self.num_classes, teacher_view, "ifvd")
        return DF.ifvd_loss(_resize_to(s, t), t, _labels(batch, t, "ifvd"), k, self.ignore_index)

    def extra_repr(self) -> str:
        return f"{self.student_tap} -> {self.teacher_tap}, num_classes={self.num_classes}, weight={self.weight}"


# ============================================================================================
# CIRKD
# ============================================================================================


@register("cirkd", "segmentation", CIRKD_PAPER)
class CIRKD(Method):
    """CIRKD: cross-image pixel-to-pixel similarity distillation in the mini-batch, plus pixel-to-pixel
    and pixel-to-region distillation against class-wise memory banks of teacher embeddings.

    .. math::
        L = w_{mb}\\, L_{mb}(F^S, F^T) + w_{pp}\\, L_{mem}(P(F^S), F^T; Q_{pixel})
        + w_{pr}\\, L_{mem}(P(F^S), F^T; Q_{region})

    * L_mb: :func:`distill.functional.cirkd_minibatch_pixel_loss` on the raw maps (channels may differ).
    * P: the student's projection head (1x1 conv → BN → ReLU → 1x1 conv, C_s → C_t), ℓ2-normalised per pixel.
    * Memory banks (buffers, saved with the method): ``pixel_queue`` ``(K, pixel_memory_size, C_t)`` and
      ``region_queue`` ``(K, region_memory_size, C_t)``, initialised with random unit vectors. In
      training mode each forward first enqueues the batch's teacher embeddings (ℓ2-normalised): per
      image and class, the class's mean embedding (renormalised) into the region queue and
      ``pixel_update_freq`` random pixels of that class into the pixel queue (first-in first-out,
      per class). No sample index is needed. Then ``pixel_contrast_size`` (``region_contrast_size``)
      entries per class are drawn at random and :func:`distill.functional.cirkd_memory_loss`
      compares the labelled pixels' similarity distributions over them.

    ``minibatch_pool`` k > 1 average-pools both maps k x k (``ceil_mode``) before the mini-batch term,
    whose cost grows as B²·(H·W)²: the authors' later code (CIRKD v2, ``cirkd_mini_batch.py``) pools
    4 x 4 on maps of 256 x 256 and more; 1 (no pooling) is the paper's version.

    Randomness (bank initialisation, enqueued pixels, contrast draws) comes from a ``torch.Generator``
    seeded with ``seed``. Labels: ``batch.targets`` resized (nearest) to the map; 255 ignored.
    ``num_classes``: None reads K from the teacher's logits.

    Defaults are the authors' code (winycg/CIRKD ``train_cirkd.py``): τ = 0.1, τ_kd = 1, weights
    1 (mini-batch), 0.1, 0.1 (memory pixel, region), banks of 20000 pixels and 2000 regions per
    class, 4096 / 1024 drawn per class, 16 pixels enqueued per class and image; the paper's text
    could not be read here. The authors add logit KD (``"kd"``-style, λ = 1) beside it. These banks
    are sized for Cityscapes: on small scenes pass e.g. ``pixel_memory_size=512,
    pixel_contrast_size=64, region_memory_size=64, region_contrast_size=16``.
    """

    requires_prepare = True  # projection head and banks are sized from the example maps
    needs_targets = True

    def __init__(self, student_tap: str = "feat", teacher_tap: str = "feat", num_classes: int | None = None,
                 tau: float = 0.1, kd_tau: float = 1.0, minibatch_weight: float = 1.0,
                 memory_pixel_weight: float = 0.1, memory_region_weight: float = 0.1,
                 pixel_memory_size: int = 20000, region_memory_size: int = 2000, pixel_contrast_size: int = 4096,
                 region_contrast_size: int = 1024, pixel_update_freq: int = 16, minibatch_pool: int = 1,
                 ignore_index: int = 255, seed: int = 0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if tau <= 0 or kd_tau <= 0:
            raise ValueError(f"tau and kd_tau must be > 0, got {tau}, {kd_tau}")
        for name, v in (("minibatch_weight", minibatch_weight), ("memory_pixel_weight", memory_pixel_weight),
                        ("memory_region_weight", memory_region_weight)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        for name, v in (("pixel_memory_size", pixel_memory_size), ("region_memory_size", region_memory_size),
                        ("pixel_contrast_size", pixel_contrast_size), ("region_contrast_size", region_contrast_size),
                        ("pixel_update_freq", pixel_update_freq), ("minibatch_pool", minibatch_pool)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.num_classes, self.ignore_index = num_classes, int(ignore_index)
        self.tau, self.kd_tau = float(tau), float(kd_tau)
        self.minibatch_weight, self.memory_pixel_weight = float(minibatch_weight), float(memory_pixel_weight)
        self.memory_region_weight = float(memory_region_weight)
        self.pixel_memory_size, self.region_memory_size = int(pixel_memory_size), int(region_memory_size)
        self.pixel_contrast_size = min(int(pixel_contrast_size), self.pixel_memory_size)
        self.region_contrast_size = min(int(region_contrast_size), self.region_memory_size)
        self.pixel_update_freq, self.seed = int(pixel_update_freq), int(seed)
        self.minibatch_pool = int(minibatch_pool)
        self.student_taps, self.teacher_taps = _tap_list(self.student_tap), _tap_list(self.teacher_tap)
        self.projector: nn.Module | None = None
        self.generator = torch.Generator().manual_seed(self.seed)

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _map(student_view, self.student_tap, "student", "cirkd")
        t = _map(teacher_view, self.teacher_tap, "teacher", "cirkd").detach()
        check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        return _resize_to(s, t), t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.projector is not None:
            return
        s, t = self._pair(student_view, teacher_view)
        k, d = _num_classes(self.num_classes, teacher_view, "cirkd"), t.shape[1]
        self.projector = nn.Sequential(nn.Conv2d(s.shape[1], d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU(),
                                       nn.Conv2d(d, d, 1, bias=False)).to(device=s.device, dtype=s.dtype)

        def bank(n: int) -> Tensor:
            return F.normalize(torch.randn(k, n, d, generator=self.generator), dim=2).to(device=t.device, dtype=t.dtype)

        self.register_buffer("pixel_queue", bank(self.pixel_memory_size))
        self.register_buffer("region_queue", bank(self.region_memory_size))
        self.register_buffer("pixel_ptr", torch.zeros(k, dtype=torch.long, device=t.device))
        self.register_buffer("region_ptr", torch.zeros(k, dtype=torch.long, device=t.device))

    @torch.no_grad()
    def enqueue(self, teacher: Tensor, labels: Tensor) -> None:
        """Push the batch's teacher embeddings ``(B, D, h, w)`` (ℓ2-normalised per pixel) with labels
        ``(B, h, w)`` into the banks: per image and class one region mean and up to
        ``pixel_update_freq`` random pixels."""
        k = self.pixel_queue.shape[0]
        for b in range(teacher.shape[0]):
            feat, lab = teacher[b].flatten(1), labels[b].flatten()
            for c in lab.unique().tolist():
                if c == self.ignore_index or not 0 <= c < k:
                    continue
                idx = (lab == c).nonzero().squeeze(1)
                r = int(self.region_ptr[c])
                self.region_queue[c, r] = F.normalize(feat[:, idx].mean(dim=1), dim=0)
                self.region_ptr[c] = (r + 1) % self.region_memory_size
                n = min(idx.numel(), self.pixel_update_freq, self.pixel_memory_size)
                pick = idx[torch.randperm(idx.numel(), generator=self.generator)[:n].to(idx.device)]
                rows = F.normalize(feat[:, pick].t(), dim=1)
                p = int(self.pixel_ptr[c])
                if p + n >= self.pixel_memory_size:  # the authors' wrap: overwrite the last n, restart at 0
                    self.pixel_queue[c, -n:] = rows
                    self.pixel_ptr[c] = 0
                else:
                    self.pixel_queue[c, p:p + n] = rows
                    self.pixel_ptr[c] = (p + n) % self.pixel_memory_size

    def draw(self, queue: Tensor, n: int) -> Tensor:
        """``n`` random entries of every class of ``queue`` ``(K, M, D)`` (the same positions for each
        class, as the authors' ``_sample_negative``) → ``(K·n, D)``."""
        pick = torch.randperm(queue.shape[1], generator=self.generator)[:n].to(queue.device)
        return queue[:, pick].reshape(-1, queue.shape[2])

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.projector is None:
            raise RuntimeError("CIRKD.prepare() must be called on an example batch before the first forward")
        s, t = self._pair(student_view, teacher_view)
        labels = _labels(batch, t, "cirkd")
        k = self.minibatch_pool
        s_mb, t_mb = (s, t) if k == 1 else (F.avg_pool2d(s, k, k, ceil_mode=True), F.avg_pool2d(t, k, k, ceil_mode=True))
        loss = self.minibatch_weight * DF.cirkd_minibatch_pixel_loss(s_mb, t_mb, self.tau)
        t_emb = F.normalize(t, dim=1)
        s_emb = F.normalize(self.projector(s), dim=1)
        if self.training:
            self.enqueue(t_emb, labels)
        valid = (labels != self.ignore_index).flatten()
        if not bool(valid.any()) or (self.memory_pixel_weight == 0 and self.memory_region_weight == 0):
            return loss + s_emb.sum() * 0.0
        s_rows = s_emb.permute(0, 2, 3, 1).reshape(-1, s_emb.shape[1])[valid]
        t_rows = t_emb.permute(0, 2, 3, 1).reshape(-1, t_emb.shape[1])[valid]
        if self.memory_pixel_weight > 0:
            q = self.draw(self.pixel_queue, self.pixel_contrast_size)
            loss = loss + self.memory_pixel_weight * DF.cirkd_memory_loss(s_rows, t_rows, q, self.tau, self.kd_tau)
        if self.memory_region_weight > 0:
            q = self.draw(self.region_queue, self.region_contrast_size)
            loss = loss + self.memory_region_weight * DF.cirkd_memory_loss(s_rows, t_rows, q, self.tau, self.kd_tau)
        return loss

    def extra_repr(self) -> str:
        return (f"{self.student_tap} -> {self.teacher_tap}, tau={self.tau}, kd_tau={self.kd_tau}, "
                f"weights=({self.minibatch_weight}, {self.memory_pixel_weight}, {self.memory_region_weight}), "
                f"banks=({self.pixel_memory_size}, {self.region_memory_size}), weight={self.weight}")


# ============================================================================================
# Graph Flow
# ============================================================================================


@register("graph_flow", "segmentation", GRAPH_FLOW_PAPER)
class GraphFlow(_AutoencoderOwner):
    """Graph Flow: distil a cross-layer graph whose vertices are each layer's channel saliences and whose
    edges are the cosine similarities between the channel maps of consecutive layers.

    .. math:: L = w_V\\, L_V + w_E\\, L_E \\quad(:func:`distill.functional.graph_flow_losses`)

    ``pairs``: (student tap, teacher tap) per layer, shallow to deep, at least two. Each teacher
    layer passes through the encoder of its paraphraser (a :class:`ConvAutoencoder` C_t → C_s, the
    student layer's width), pre-trained by the ``"graph_flow_paraphraser"`` stage and frozen here,
    so the student's and the teacher's graphs have the same size. Layers may differ in resolution
    (vertices are pooled; edges pool the larger map of a pair to the smaller).

    Sources: the paper's text could not be read here; the authors' repository
    (WrinkleXuan/Graph-FLow) shows the paraphraser (conv encoder / decoder with LeakyReLU 0.1,
    pre-trained and frozen, teacher widths mapped to the student's) and that the loss has a
    vertex and an edge term, but not their formulas (its ``utils/criterion.py`` is not released).
    The graph above is our reading of the abstract ("a variation graph ... to measure the flow of
    channel-wise salience features between different layers"), and the weights w_V = w_E = 1 are
    ours (the authors' 1e-5 and 1e-8 scale unnormalised sums we cannot reproduce). The paper's
    framework adds adversarial and logit distillation: combine with ``"skd_holistic"`` and ``"kd"``.
    """

    requires_prepare = True
    stages = ("graph_flow_paraphraser",)

    def __init__(self, pairs: Sequence[tuple[str, str]] = (("backbone_out.1", "backbone_out.1"),
                                                           ("backbone_out.2", "backbone_out.2"),
                                                           ("feat", "feat")),
                 vertex_weight: float = 1.0, edge_weight: float = 1.0, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = _pairs(pairs, "graph_flow")
        if len(self.pairs) < 2:
            raise ValueError(f"graph_flow needs at least two layers (a flow between them), got {self.pairs}")
        if vertex_weight < 0 or edge_weight < 0:
            raise ValueError(f"vertex_weight and edge_weight must be >= 0, got {vertex_weight}, {edge_weight}")
        self.vertex_weight, self.edge_weight = float(vertex_weight), float(edge_weight)
        self.student_taps = [p for s, _ in self.pairs for p in _tap_list(s)]
        self.teacher_taps = [p for _, t in self.pairs for p in _tap_list(t)]
        self.autoencoders = None

    def ae_teacher_taps(self) -> list[str]:
        return [t for _, t in self.pairs]

    def _layers(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        fs, ft = [], []
        for s_path, t_path in self.pairs:
            s = _map(student_view, s_path, "student", "graph_flow")
            t = _map(teacher_view, t_path, "teacher", "graph_flow").detach()
            check_batch(s, t, f"student:{s_path}", f"teacher:{t_path}")
            fs.append(s)
            ft.append(t)
        return fs, ft

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.autoencoders is None:
            fs, ft = self._layers(student_view, teacher_view)
            self.autoencoders = nn.ModuleList(ConvAutoencoder(t.shape[1], s.shape[1]) for s, t in zip(fs, ft)).to(
                device=ft[0].device, dtype=ft[0].dtype)
        self.freeze_autoencoders()

    def stage_method(self, name: str) -> Method:
        """``"graph_flow_paraphraser"``: the paraphrasers' pre-training loss, sharing this method's paraphrasers."""
        if name != "graph_flow_paraphraser":
            return super().stage_method(name)
        return GraphFlowParaphraser(owner=self)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        fs, ft = self._layers(student_view, teacher_view)
        vertices, edges = DF.graph_flow_losses(fs, [self.encode(i, t) for i, t in enumerate(ft)])
        return self.vertex_weight * vertices + self.edge_weight * edges

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, vertex_weight={self.vertex_weight}, edge_weight={self.edge_weight}, " \
               f"weight={self.weight}"


@register("graph_flow_paraphraser", "segmentation", GRAPH_FLOW_PAPER)
class GraphFlowParaphraser(_AutoencoderStage):
    """Graph Flow's first stage: each teacher layer's paraphraser reconstruction error (mean squared), summed.

    Build it with ``GraphFlow().stage_method("graph_flow_paraphraser")`` (or through
    ``fit_hint_stage(d, loader, method="graph_flow_paraphraser")``); built alone it owns a fresh
    :class:`GraphFlow` (``.owner``). The authors' ``Paraphraser`` mode 0 (reconstruction).
    """

    owner_cls = GraphFlow


__all__ = ["SKDPixel", "SKDPairwise", "SKDHolistic", "SKDCritic", "KnowledgeAdaptation", "KAAutoencoder", "IFVD",
           "CIRKD", "GraphFlow", "GraphFlowParaphraser", "ConvAutoencoder"]
