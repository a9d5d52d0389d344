"""Measures of generated images: FID and KID with a feature extractor trained here, and PSNR.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017, arXiv 1706.08500) is the Fréchet distance between Gaussians fitted to
the features of real and generated images,
``FID = ||μ_r − μ_g||² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})``; KID (Bińkowski et al.,
"Demystifying MMD GANs", ICLR 2018, arXiv 1801.01401) is the unbiased MMD² with the cubic
polynomial kernel ``k(x, y) = (xᵀy / d + 1)³``, averaged over random subsets (mean and std).
Both are computed by torchmetrics (``FrechetInceptionDistance`` / ``KernelInceptionDistance``,
the field's implementations) with ``feature=`` our extractor.

**KID on standardised features.** The cubic kernel is not scale-free: ``(xᵀy/d + 1)³`` grows with the
cube of the features' magnitude. Inception's pool features that KID was designed for are non-negative
and mostly below a few units (d = 2048), so ``xᵀy/d`` is of order 1; our LeNet's ReLU features are
unnormalised, their scale is whatever training left (tens to hundreds), and KID came out in the
10⁵–10⁷ range (× 1000), comparable only within one table. :func:`train_feature_net` therefore
stores, with the cached extractor, the mean ``μ`` and standard deviation ``σ`` ``(num_features,)``
of each feature over the **real training split** it was trained on, and KID is computed on
``(f − μ) / σ`` (:meth:`FeatureNet.standardise`): every dimension has unit variance on real data, so
``xᵀy/d`` is of order 1 as for Inception, KID no longer depends on the features' arbitrary scale
(multiplying the raw features by c leaves it unchanged), and it is fixed by the extractor alone, not
by the sets being compared. FID keeps its definition on the raw features (a per-dimension rescaling
would change it; its published values are on raw features too). This choice is ours, not the KID
paper's (which uses raw Inception features); ``fid_kid(..., kid_features="raw")`` gives the old value
for comparison. A feature that is constant on the real split (a dead ReLU unit, ``σ < 1e-6``) is
centred but not divided (σ taken as 1). A live feature's σ is floored at 0.1 × the mean σ of the live
features (``STD_FLOOR``, ours): a unit almost constant on real data but active on generated images would
otherwise dominate the kernel (KID × 1000 of 10⁵ to 10¹⁰ was seen with extractors trained on a few thousand
images). The floor does not bind for the extractors the docs' tables used (MNIST and Fashion-MNIST, 2 epochs,
seed 0: smallest live σ 0.48 against a floor of 0.16), so their KID values are unchanged by it.

**The extractor is not Inception.** Inception-v3's weights cannot be downloaded here, and
Inception features of 28×28 grey digits say little anyway. :func:`train_feature_net` trains a
small LeNet-style classifier on the real training split of MNIST or Fashion-MNIST and uses its
penultimate features (128-d). Scores computed with it are comparable with each other (same data
set, epochs and seed: the extractor's ``name`` says which), never with published FIDs. It is
cached as safetensors with its feature statistics (``~/.cache/distill/feature_nets`` or
``$DISTILL_CACHE``; files ``lenet-v3-*``: earlier versions' files, without statistics or without the σ floor, are
never read), so benchmarks train it once.

Typical use::

    net = train_feature_net("mnist")                     # ~1 min on 2 cores the first time
    scores = fid_kid(real_images, generated_images, net)  # images (N, 1, 28, 28) in [0, 1]
    scores["fid"], scores["kid"], scores["kid_std"], scores["extractor"], scores["kid_features"]

torchmetrics is an optional dependency: ``pip install 'distill[generative]'``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.files import atomic_write
from distill.integrations import require
from distill.progress import StepProgress

__all__ = ["FeatureNet", "default_cache_dir", "fid_kid", "psnr", "train_feature_net"]

EXTRA = "generative"


# a live feature's std is at least this share of the live features' mean std (see the module docstring)
STD_FLOOR = 0.1


class FeatureNet(nn.Module):
    """A LeNet-style classifier whose penultimate layer is the FID/KID feature space.

    ``forward(images)``: images ``(B, channels, H, W)`` in ``[0, 1]`` (H, W ≥ 8; any dtype: uint8 is
    divided by 255) -> raw features ``(B, num_features)`` (what FID uses). ``classify(images)`` -> logits
    ``(B, num_classes)``. ``standardise(features)`` -> ``(features − feature_mean) / feature_std`` (what KID
    uses), with the buffers ``feature_mean`` / ``feature_std`` ``(num_features,)`` set by
    :meth:`fit_feature_stats` on real images and ``feature_stats_count`` (a 0-d tensor) the number of images
    they came from (0: not fitted).
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, num_features: int = 128,
                 name: str = "lenet (untrained)") -> None:
        super().__init__()
        self.channels, self.num_features, self.name = channels, num_features, name
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, num_features, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(num_features, num_classes)
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.register_buffer("feature_stats_count", torch.zeros((), dtype=torch.long))

    @property
    def has_feature_stats(self) -> bool:
        """Whether :meth:`fit_feature_stats` has set the standardisation used by KID."""
        return int(self.feature_stats_count) > 0

    @torch.no_grad()
    def fit_feature_stats(self, images: Tensor, batch_size: int = 1000) -> FeatureNet:
        """Sets ``feature_mean`` / ``feature_std`` to the per-dimension mean and (population) standard
        deviation of the raw features of ``images`` ``(N, channels, H, W)`` in ``[0, 1]``, N ≥ 2: meant for
        the real training split. Dimensions with std below 1e-6 keep std 1 (a constant feature is only
        centred); a live one's std is at least ``STD_FLOOR`` × the mean std of the live ones. Returns ``self``."""
        if images.dim() != 4 or len(images) < 2:
            raise ValueError(f"fit_feature_stats: images must be (N, C, H, W) with N >= 2, got {tuple(images.shape)}")
        was_training = self.training
        self.eval()
        feats = torch.cat([self(images[i:i + batch_size]).double() for i in range(0, len(images), batch_size)])
        self.train(was_training)
        mean, std = feats.mean(0), feats.std(0, unbiased=False)
        live = std >= 1e-6
        floor = STD_FLOOR * std[live].mean() if bool(live.any()) else torch.ones((), dtype=std.dtype)
        std = torch.where(live, torch.maximum(std, floor), torch.ones_like(std))
        self.feature_mean.copy_(mean.to(self.feature_mean.dtype))
        self.feature_std.copy_(std.to(self.feature_std.dtype))
        self.feature_stats_count.fill_(len(images))
        return self

    def standardise(self, features: Tensor) -> Tensor:
        """``(features − feature_mean) / feature_std`` for raw features ``(B, num_features)``, in float64."""
        return (features.double() - self.feature_mean.double()) / self.feature_std.double()

    def _prepare(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"the feature net {self.name!r} takes images (B, {self.channels}, H, W), "
                             f"got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images.float() - 0.5) / 0.5

    def forward(self, images: Tensor) -> Tensor:
        return self.body(self._prepare(images))

    def classify(self, images: Tensor) -> Tensor:
        return self.fc(self.forward(images))


def default_cache_dir() -> Path:
    """``$DISTILL_CACHE/feature_nets`` or ``~/.cache/distill/feature_nets``."""
    root = os.environ.get("DISTILL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "distill") / "feature_nets"


def _load_split(dataset: str) -> tuple[Tensor, Tensor]:
    from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist

    if dataset == "mnist":
        return load_mnist(_default_mnist_root(), "train")
    if dataset == "fashion_mnist":
        return load_fashion_mnist(split="train")
    raise ValueError(f"train_feature_net: dataset must be 'mnist' or 'fashion_mnist', got {dataset!r}")


def train_feature_net(dataset: str = "fashion_mnist", epochs: int = 2, seed: int = 0, *,
                      cache_dir: str | os.PathLike[str] | None = None, images: Tensor | None = None,
                      labels: Tensor | None = None, batch_size: int = 256, lr: float = 1e-3,
                      progress: bool = True) -> FeatureNet:
    """The FID/KID extractor: a :class:`FeatureNet` trained (Adam, cross-entropy) on ``dataset``'s
    real training split for ``epochs`` epochs, in eval mode, frozen.

    After training, :meth:`FeatureNet.fit_feature_stats` is run on the same training images (the
    standardisation KID uses). Cached under ``cache_dir`` (default :func:`default_cache_dir`) by
    ``(dataset, epochs, seed)`` as ``lenet-v3-<dataset>-e<epochs>-s<seed>.safetensors`` (weights and
    statistics): a second call loads it instead of training. ``images`` / ``labels`` replace the data
    set's split (for tests; nothing is cached then, and ``dataset`` only names the net).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    name = f"lenet-{dataset} (trained here, {epochs} epochs, seed {seed})"
    own_data = images is not None
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"lenet-v3-{dataset}-e{epochs}-s{seed}.safetensors"
    if own_data:
        if labels is None or labels.shape[0] != images.shape[0]:
            raise ValueError("train_feature_net: pass labels (N,) with images (N, C, H, W)")
        x, y = images, labels
    elif path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(path))
        net = FeatureNet(channels=state["body.0.weight"].shape[1], num_classes=state["fc.weight"].shape[0],
                         num_features=state["fc.weight"].shape[1], name=name)
        net.load_state_dict(state)
        return net.eval().requires_grad_(False)
    else:
        x, y = _load_split(dataset)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet(channels=x.shape[1], num_classes=int(y.max()) + 1, name=name)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    with StepProgress(progress, f"training the FID feature net on {dataset}", steps) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(net.classify(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.advance(f"loss {loss.item():.3f}")
    net.eval().requires_grad_(False)
    net.fit_feature_stats(x)
    if not own_data:
        from safetensors.torch import save

        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        atomic_write(path, lambda f: f.write(save(state)))
    return net


class _Wrapped(nn.Module):
    """torchmetrics calls ``feature(images)`` with the images it was given; it reads ``num_features``.
    ``standardised``: return :meth:`FeatureNet.standardise` of the features (for KID)."""

    def __init__(self, net: FeatureNet, standardised: bool = False) -> None:
        super().__init__()
        self.net, self.standardised = net, standardised
        self.num_features = net.num_features

    def forward(self, images: Tensor) -> Tensor:
        f = self.net(images)
        return self.net.standardise(f) if self.standardised else f.double()


def _batches(images: Tensor, batch_size: int) -> list[Tensor]:
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


@torch.no_grad()
def fid_kid(real: Tensor, fake: Tensor, feature_net: FeatureNet, *, kid_subset_size: int | None = None,
            kid_subsets: int = 50, batch_size: int = 500, seed: int = 0,
            kid_features: str = "auto") -> dict[str, Any]:
    """FID and KID between ``real`` and ``fake`` images ``(N, C, H, W)`` in ``[0, 1]`` (values outside
    are clamped), in ``feature_net``'s feature space.

    FID is always on the raw features. ``kid_features``: ``"standardised"`` (KID on
    :meth:`FeatureNet.standardise`'d features: needs :meth:`FeatureNet.fit_feature_stats`, which
    :func:`train_feature_net` runs), ``"raw"`` (the first version's KID, scale-dependent: for comparison
    with old tables) or ``"auto"`` (standardised when the net has statistics, else raw).
    ``kid_subset_size`` defaults to ``min(1000, N_real, N_fake)``. Returns ``{"fid", "kid", "kid_std",
    "kid_features", "extractor", "n_real", "n_fake"}`` (floats, ``"standardised"`` or ``"raw"``, the
    extractor's name, counts).
    """
    if kid_features not in ("auto", "standardised", "raw"):
        raise ValueError(f"fid_kid: kid_features must be 'auto', 'standardised' or 'raw', got {kid_features!r}")
    if kid_features == "standardised" and not feature_net.has_feature_stats:
        raise ValueError(f"fid_kid: kid_features='standardised' needs feature statistics, and the feature net "
                         f"{feature_net.name!r} has none: call its fit_feature_stats(real_training_images) "
                         "or pass kid_features='raw'")
    if kid_features == "auto":
        kid_features = "standardised" if feature_net.has_feature_stats else "raw"
    metrics = require("torchmetrics.image.fid", EXTRA, "FID")
    kid_module = require("torchmetrics.image.kid", EXTRA, "KID")
    for what, t in (("real", real), ("fake", fake)):
        if t.dim() != 4:
            raise ValueError(f"fid_kid: {what} images must be (N, C, H, W), got {tuple(t.shape)}")
        if len(t) < 2:
            raise ValueError(f"fid_kid: FID needs at least 2 {what} images (a covariance), got {len(t)}")
    subset = kid_subset_size or min(1000, len(real), len(fake))
    if subset > min(len(real), len(fake)):
        raise ValueError(f"fid_kid: kid_subset_size {subset} exceeds the smaller set "
                         f"({min(len(real), len(fake))} images)")
    feature = _Wrapped(feature_net.eval())
    fid = metrics.FrechetInceptionDistance(feature=feature, normalize=True)
    kid_feature = _Wrapped(feature_net, standardised=kid_features == "standardised")
    with warnings.catch_warnings():  # it keeps every feature in memory: what KID needs, at 128 floats per image
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        kid = kid_module.KernelInceptionDistance(feature=kid_feature, subsets=kid_subsets, subset_size=subset,
                                                 normalize=True)
    for is_real, images in ((True, real), (False, fake)):
        for chunk in _batches(images.detach().float().clamp(0, 1).cpu(), batch_size):
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws its subsets with torch's global generator
    try:
        kid_mean, kid_std = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "kid_features": kid_features, "extractor": feature_net.name, "n_real": len(real), "n_fake": len(fake)}


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range² / MSE)`` in dB over all elements of
    ``pred`` and ``target`` (same shape); ``inf`` when they are equal."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    mse = F.mse_loss(pred.detach().double(), target.detach().double())
    if mse == 0:
        return float("inf")
    return float(10.0 * torch.log10(torch.tensor(data_range, dtype=torch.float64) ** 2 / mse))
