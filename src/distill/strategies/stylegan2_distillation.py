"""StyleGAN2 Distillation for Feed-forward Image Manipulation (Viazovetskyi, Ivashkin, Kashin, ECCV 2020,
arXiv 2003.03581).

A teacher GAN's latent-space edit becomes paired data; an image-to-image student learns the edit
feed-forward. The pipeline (registered as strategy ``stylegan2_distillation``):

1. sample ``w = mapping(z)`` for many ``z ~ N(0, I)`` and score the images ``G(w)`` with a classifier
   teacher (:func:`sample_latents`, :func:`classify`);
2. the attribute direction (:func:`latent_direction`): ``d = mean(w | top-k of class b) -
   mean(w | top-k of class a)``, the difference of the class centres of the most confidently
   classified samples (``method="mean_diff"``); ``method="logistic"`` instead takes the normal of a
   logistic-regression boundary between the two classes in w-space (what the authors' released
   notebook ``Learn_direction_in_latent_space.ipynb`` does, with scikit-learn), rescaled to the same
   length along itself as the class-centre difference (the scale is ours);
3. for fresh latents the triple ``w - alpha d, w, w + alpha d`` is generated and classified; a pair
   ``(source, target)`` is kept when the member most confidently of class ``a`` (the source) lies
   before the member most confidently of class ``b`` (the target) along ``d`` and both
   probabilities reach ``confidence`` (:func:`edit_pairs`): opposite classes with high certainty;
4. the student (a U-Net) is trained on the pairs with pix2pix's losses
   (:func:`distill.strategies.img2img.train_img2img`); the paper trains pix2pixHD (adversarial +
   feature matching + VGG perceptual loss): no VGG weights here, so L1 (weight 100) + PatchGAN;
5. evaluation (:class:`StyleGAN2DistillationResult`): on held-out generated pairs, PSNR of the
   student's edit against the teacher's edited image (and of the unedited source, the do-nothing
   baseline), FID/KID of the student's edits against the teacher's with a feature net trained here,
   the classifier's rate of class ``b`` on the teacher's edits and on the student's; on real images of
   class ``a``, that rate on the student's edits against on the images themselves.

The pipeline's steps are as read from a summary of the paper (its section 3 could not be read here:
only its abstract) and the authors' repository (EvgenyKashin/stylegan2-distillation); the amplitude
``alpha = 1``, ``confidence = 0.9``, ``top_k`` and the truncation ``psi = 0.7`` are ours. The
paper's attributes are face attributes (gender, age); here an attribute is a class of the
classifier teacher (e.g. MNIST digit ``a`` -> digit ``b``), on a small StyleGAN2-like generator.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.papers import Paper
from distill.strategies.img2img import Img2ImgResult, predict_images, train_img2img
from distill.strategies.registry import as_model, register_strategy
from distill.synthesis.progress import StepProgress
from distill.train.generative_eval import psnr

__all__ = ["STYLEGAN2_DISTILLATION_PAPER", "StyleGAN2DistillationResult", "classify", "edit_pairs",
           "latent_direction", "sample_latents", "stylegan2_distillation", "teacher_gan"]

STYLEGAN2_DISTILLATION_PAPER = Paper("StyleGAN2 Distillation for Feed-forward Image Manipulation",
                                     "Y. Viazovetskyi, V. Ivashkin, E. Kashin", 2020, "2003.03581", "ECCV")


@dataclass
class StyleGAN2DistillationResult:
    """What :func:`stylegan2_distillation` returns (measures are None when not computed)."""

    student: nn.Module
    direction: Tensor
    train: Img2ImgResult
    pairs_train: int = 0
    pairs_test: int = 0
    keep_rate: float = 0.0
    psnr_student: float | None = None     # student(source) vs teacher's edit, held-out generated pairs
    psnr_identity: float | None = None    # source vs teacher's edit: what doing nothing scores
    fid_student: float | None = None      # student's edits vs teacher's edits (named extractor)
    kid_student: float | None = None
    extractor: str | None = None
    edit_rate_teacher: float | None = None  # classifier says class b on the teacher's edits
    edit_rate_student: float | None = None  # ... on the student's edits of the same sources
    edit_rate_source: float | None = None   # ... on the unedited sources
    real_edit_rate: float | None = None     # real images of class a: class b after the student's edit
    real_base_rate: float | None = None     # ... and on the unedited real images
    time_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _unit(images: Tensor) -> Tensor:
    """A generator's ``[-1, 1]`` images as ``[0, 1]``."""
    return ((images + 1) / 2).clamp(0, 1)


@torch.no_grad()
def classify(classifier: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Class probabilities ``(N, K)`` of images ``(N, C, H, W)`` in [0, 1]: ``softmax`` of
    ``classifier.classify(x)`` when the classifier has that method (the FID feature net), else of
    ``classifier(x)``. The classifier's mode is left as it is (pass it in eval mode)."""
    fn = getattr(classifier, "classify", None) or classifier
    return torch.cat([torch.softmax(fn(images[i:i + batch_size]).float(), 1)
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def sample_latents(generator: nn.Module, n: int, *, truncation_psi: float = 0.7, seed: int = 0,
                   batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """``n`` styles ``w = mapping(z, truncation_psi)`` ``(n, w_dim)`` and their images ``(n, C, H, W)`` in
    [0, 1] (no per-pixel noise: ``synthesis(w, noise="const")``), ``z ~ N(0, I)`` from ``seed``; the
    generator runs in eval mode (its ``w_avg`` is not moved) and gets its mode back."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_latents: n must be a positive int; got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    z = generator.sample_z(n, gen)
    ws, images = [], []
    was = generator.training
    generator.eval()  # in training mode the mapping network would move its running w_avg
    try:
        for i in range(0, n, batch_size):
            w = generator.mapping(z[i:i + batch_size], truncation_psi=truncation_psi)
            ws.append(w)
            images.append(_unit(generator.synthesis(w, noise="const")))
    finally:
        generator.train(was)
    return torch.cat(ws), torch.cat(images)


def latent_direction(w: Tensor, probs: Tensor, source_class: int, target_class: int, *, top_k: int | None = None,
                     method: str = "mean_diff") -> Tensor:
    """The edit direction ``d`` ``(w_dim,)`` in w-space from class ``source_class`` (a) to ``target_class`` (b).

    ``method="mean_diff"``: ``d = mean(w_i : i in top_k of p_b) - mean(w_i : i in top_k of p_a)``,
    ``top_k`` among the samples the classifier assigns to that class (argmax; all of them when
    ``top_k`` is None). ``method="logistic"``: ``u`` the unit normal of a logistic regression separating
    the two classes' samples (scikit-learn, balanced class weights), ``d = (u . m) u`` with ``m`` the
    ``mean_diff`` direction.

    Args:
        w: styles ``(N, w_dim)``; probs: their images' class probabilities ``(N, K)``.
    Raises: ValueError when either class has no sample.
    """
    if w.dim() != 2 or probs.dim() != 2 or w.shape[0] != probs.shape[0]:
        raise ValueError(f"latent_direction: w (N, w_dim) and probs (N, K) must share N; got {tuple(w.shape)} and "
                         f"{tuple(probs.shape)}")
    if source_class == target_class:
        raise ValueError(f"latent_direction: source_class and target_class must differ; both are {source_class}")
    k = probs.shape[1]
    for name, c in (("source_class", source_class), ("target_class", target_class)):
        if not 0 <= c < k:
            raise ValueError(f"latent_direction: {name}={c} is not a class of the classifier (0..{k - 1})")
    if method not in ("mean_diff", "logistic"):
        raise ValueError(f"latent_direction: method must be 'mean_diff' or 'logistic'; got {method!r}")
    pred = probs.argmax(1)
    centres = []
    for c in (source_class, target_class):
        idx = (pred == c).nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(f"latent_direction: no sample is classified as class {c}; sample more latents or "
                             "choose another class")
        if top_k is not None:
            idx = idx[probs[idx, c].argsort(descending=True)[:top_k]]
        centres.append(w[idx].mean(0))
    mean_diff = centres[1] - centres[0]
    if method == "mean_diff":
        return mean_diff
    from sklearn.linear_model import LogisticRegression

    both = (pred == source_class) | (pred == target_class)
    clf = LogisticRegression(class_weight="balanced", max_iter=1000)
    clf.fit(w[both].double().numpy(), (pred[both] == target_class).long().numpy())
    u = torch.as_tensor(clf.coef_[0], dtype=w.dtype)
    u = u / u.norm()
    return (u @ mean_diff) * u


@torch.no_grad()
def edit_pairs(generator: nn.Module, classifier: nn.Module, w: Tensor, direction: Tensor, source_class: int,
               target_class: int, *, amplitude: float = 1.0, confidence: float = 0.9,
               batch_size: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """Paired data from the edit: for each style ``w_i`` the triple ``w_i + s * amplitude * d``, ``s`` in
    (-1, 0, 1), is generated and classified; with ``src`` the member of highest ``p_a`` and ``tgt`` the
    member of highest ``p_b``, the pair ``(G(src), G(tgt))`` is kept when ``s_src < s_tgt``,
    ``p_a(src) >= confidence`` and ``p_b(tgt) >= confidence``.

    Returns: ``(source, target, kept)``: images ``(M, C, H, W)`` in [0, 1] and the boolean mask ``(N,)``
    of the styles that gave a pair.
    """
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"edit_pairs: confidence must be in [0, 1]; got {confidence!r}")
    if direction.shape != (w.shape[1],):
        raise ValueError(f"edit_pairs: direction must be (w_dim,) = ({w.shape[1]},); got {tuple(direction.shape)}")
    steps = torch.tensor([-1.0, 0.0, 1.0])
    images, pa, pb = [], [], []
    for s in steps:
        x = torch.cat([_unit(generator.synthesis(w[i:i + batch_size] + s * amplitude * direction, noise="const"))
                       for i in range(0, w.shape[0], batch_size)])
        p = classify(classifier, x, batch_size)
        images.append(x)
        pa.append(p[:, source_class])
        pb.append(p[:, target_class])
    stack = torch.stack(images, 1)                      # (N, 3, C, H, W)
    pa_t, pb_t = torch.stack(pa, 1), torch.stack(pb, 1)  # (N, 3)
    src, tgt = pa_t.argmax(1), pb_t.argmax(1)
    rows = torch.arange(w.shape[0])
    kept = (src < tgt) & (pa_t[rows, src] >= confidence) & (pb_t[rows, tgt] >= confidence)
    return stack[rows, src][kept], stack[rows, tgt][kept], kept


def _rate(classifier: nn.Module, images: Tensor, cls: int) -> float | None:
    return None if images.shape[0] == 0 else float((classify(classifier, images).argmax(1) == cls).float().mean())


def teacher_gan(dataset: str = "mnist", classes: tuple[int, ...] | None = (1, 7), *, steps: int = 1500,
                width: int = 32, batch_size: int = 32, limit: int | None = 6000, seed: int = 0,
                cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> nn.Module:
    """The teacher GAN: a :class:`~distill.models.stylegan.StyleGenerator` (``stylegan_mnist`` at ``width``)
    trained here with :func:`distill.strategies.gan.train_gan` on the real training images of ``classes``
    (all classes when None; the first ``limit`` of them), unconditional. Returns the EMA generator in eval
    mode. Cached as safetensors under ``cache_dir`` (default ``$DISTILL_CACHE/gans`` or
    ``~/.cache/distill/gans``) by every argument that changes it: a second call loads the file.
    """
    from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist
    from distill.models import create
    from distill.strategies.gan import load_gan_checkpoint, train_gan

    if dataset not in ("mnist", "fashion_mnist"):
        raise ValueError(f"teacher_gan: dataset must be 'mnist' or 'fashion_mnist'; got {dataset!r}")
    root = Path(cache_dir) if cache_dir is not None else \
        Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill") / "gans"
    tag = "all" if classes is None else "-".join(str(c) for c in classes)
    # "eqlr": the generator with equalised learning rate (files of the first version hold other weight scales)
    path = root / f"stylegan-eqlr-{dataset}-c{tag}-w{width}-s{steps}-b{batch_size}-n{limit}-seed{seed}.safetensors"
    torch.manual_seed(seed)
    generator = create("stylegan_mnist", width=width)
    ema = create("stylegan_mnist", width=width)
    if path.is_file():
        load_gan_checkpoint(path, ema=ema)
        return ema.eval().requires_grad_(False)
    images, labels = (load_mnist(_default_mnist_root(), "train") if dataset == "mnist"
                      else load_fashion_mnist(split="train"))
    if classes is not None:
        images = images[torch.isin(labels, torch.tensor(list(classes)))]
    if limit is not None:
        images = images[:limit]
    result = train_gan(generator, create("stylegan_discriminator", width=width), images, steps=steps,
                       batch_size=batch_size, checkpoint=path, progress=progress, seed=seed)
    return result.ema.eval().requires_grad_(False)


@register_strategy("stylegan2_distillation", "generative", STYLEGAN2_DISTILLATION_PAPER)
def stylegan2_distillation(student: Any, train_loader: Any = None, val_loader: Any = None, *, teacher: nn.Module,
                           classifier: nn.Module, source_class: int, target_class: int,
                           direction_samples: int = 4096, top_k: int | None = 256, direction_method: str = "mean_diff",
                           truncation_psi: float = 0.7, amplitude: float = 1.0, confidence: float = 0.9,
                           train_pairs: int = 2000, test_pairs: int = 500, max_latents: int = 200_000,
                           steps: int = 2000, batch_size: int = 64, l1_weight: float = 100.0, gan_weight: float = 1.0,
                           lr: float = 2e-4, real_images: Tensor | None = None, feature_net: nn.Module | None = None,
                           seed: int = 0, progress: bool = True) -> StyleGAN2DistillationResult:
    """Distil the teacher GAN's latent edit ``source_class -> target_class`` into an image-to-image ``student``.

    Args:
        student: the image-to-image network (e.g. ``create("unet_img2img_student")``) or a factory.
        train_loader, val_loader: not read (the strategy convention's slots: the data are generated).
        teacher: the trained GAN generator (:class:`~distill.models.stylegan.StyleGenerator`: ``mapping``,
            ``synthesis(w, noise=...)``, ``sample_z``), images in [-1, 1].
        classifier: the attribute classifier teacher on [0, 1] images (logits, or a ``classify`` method).
        source_class, target_class: the edit's classes ``a -> b``.
        direction_samples, top_k, direction_method: step 2 (:func:`latent_direction`).
        truncation_psi: of the sampled styles (ours: 0.7).
        amplitude, confidence: step 3 (:func:`edit_pairs`).
        train_pairs, test_pairs: pairs to collect (fresh latents until reached, at most ``max_latents``).
        steps, batch_size, l1_weight, gan_weight, lr: the student's pix2pix training (:func:`train_img2img`).
        real_images: real images of ``source_class`` ``(N, C, H, W)`` in [0, 1] for the real-image check.
        feature_net: a :class:`~distill.train.generative_eval.FeatureNet` for FID/KID (skipped when None).
    Returns: a :class:`StyleGAN2DistillationResult`.
    """
    student = as_model(student, "stylegan2_distillation")
    for name, m in (("teacher", teacher), ("classifier", classifier)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"stylegan2_distillation: {name} must be an nn.Module; got {m!r}")
    for name in ("mapping", "synthesis", "sample_z"):
        if not hasattr(teacher, name):
            raise TypeError(f"stylegan2_distillation: the teacher must be a StyleGAN-like generator with "
                            f"mapping / synthesis / sample_z; {type(teacher).__name__} has no {name!r}")
    for name, value in (("train_pairs", train_pairs), ("test_pairs", test_pairs), ("direction_samples",
                                                                                   direction_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"stylegan2_distillation: {name} must be a positive int; got {value!r}")
    start = time.perf_counter()
    teacher.eval().requires_grad_(False)
    classifier.eval().requires_grad_(False)
    w, images = sample_latents(teacher, direction_samples, truncation_psi=truncation_psi, seed=seed)
    direction = latent_direction(w, classify(classifier, images), source_class, target_class, top_k=top_k,
                                 method=direction_method)
    need = train_pairs + test_pairs
    sources, targets, seen, kept_total, chunk = [], [], 0, 0, 2048
    with StepProgress(progress, "collecting edit pairs", need) as bar:
        while kept_total < need and seen < max_latents:
            w_new, _ = sample_latents(teacher, chunk, truncation_psi=truncation_psi, seed=seed + 1 + seen)
            s, t, kept = edit_pairs(teacher, classifier, w_new, direction, source_class, target_class,
                                    amplitude=amplitude, confidence=confidence)
            sources.append(s)
            targets.append(t)
            seen += chunk
            bar.advance(f"kept {kept_total + int(kept.sum())}/{seen}", steps=min(int(kept.sum()), need - kept_total))
            kept_total += int(kept.sum())
    if kept_total < need:
        raise RuntimeError(f"stylegan2_distillation: only {kept_total} of {seen} latents gave a confident pair "
                           f"({need} needed); lower confidence (now {confidence}), raise amplitude (now {amplitude}) "
                           "or max_latents, or train the teacher GAN longer")
    source, target = torch.cat(sources)[:need], torch.cat(targets)[:need]
    train_src, train_tgt = source[:train_pairs], target[:train_pairs]
    test_src, test_tgt = source[train_pairs:], target[train_pairs:]
    fit = train_img2img(student, train_src, train_tgt, l1_weight=l1_weight, gan_weight=gan_weight, steps=steps,
                        batch_size=batch_size, lr=lr, val=(test_src, test_tgt), seed=seed, progress=progress)
    edited = predict_images(student, test_src)
    out = StyleGAN2DistillationResult(student=student, direction=direction, train=fit, pairs_train=train_pairs,
                                      pairs_test=test_pairs, keep_rate=kept_total / seen)
    out.psnr_student, out.psnr_identity = psnr(edited, test_tgt), psnr(test_src, test_tgt)
    out.edit_rate_teacher = _rate(classifier, test_tgt, target_class)
    out.edit_rate_student = _rate(classifier, edited, target_class)
    out.edit_rate_source = _rate(classifier, test_src, target_class)
    if feature_net is not None:
        from distill.train.generative_eval import fid_kid

        m = fid_kid(test_tgt, edited, feature_net)
        out.fid_student, out.kid_student, out.extractor = m["fid"], m["kid"], m["extractor"]
    if real_images is not None:
        out.real_edit_rate = _rate(classifier, predict_images(student, real_images), target_class)
        out.real_base_rate = _rate(classifier, real_images, target_class)
    out.time_s = time.perf_counter() - start
    out.info = {"latents_seen": seen, "direction_norm": float(direction.norm())}
    return out
