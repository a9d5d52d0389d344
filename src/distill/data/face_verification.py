"""A small identity-verification task built from real images (issue 17, part G).

Faces are not available offline, so identities are made from handwriting: within each MNIST digit
class, k-means on the (2x2-pooled) pixels splits the class into ``per_class`` writing-style clusters,
and each (digit, cluster) pair is one identity. Training identities come from some digit classes,
verification pairs from the identities of the *other* classes (never seen in training), as face
verification tests on people outside the training set. A negative pair may be two styles of one digit
(hard) or two digits (easy).

* :func:`cluster_identities` - identity labels ``(N,)`` from images ``(N, 1, H, W)`` and classes ``(N,)``.
* :func:`verification_pairs` - balanced positive/negative index pairs over held-out identities.
* :func:`verification_metrics` - LFW-style 10-fold accuracy and TAR at fixed FARs from pair similarities.
* :func:`degrade` - the "hard samples": low resolution plus noise, as DDL's low-resolution faces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cluster_identities", "degrade", "verification_metrics", "verification_pairs"]


def cluster_identities(images: Tensor, classes: Tensor, per_class: int = 8, seed: int = 0) -> Tensor:
    """Identity of each image: ``class * per_class + k-means cluster`` within its class.

    Args:
        images: ``(N, C, H, W)`` images.
        classes: ``(N,)`` integer class labels.
        per_class: identities per class (k-means clusters on 2x2-average-pooled pixels).
        seed: k-means seed.

    Returns:
        ``(N,)`` long identity labels; identities of class ``c`` are ``c*per_class ... c*per_class+per_class-1``.
    """
    from sklearn.cluster import KMeans

    if images.dim() != 4 or classes.shape != images.shape[:1]:
        raise ValueError(f"images must be (N, C, H, W) with classes (N,); got {tuple(images.shape)} and "
                         f"{tuple(classes.shape)}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1; got {per_class!r}")
    flat = F.avg_pool2d(images.float(), 2).flatten(1).numpy()
    ids = torch.empty(len(classes), dtype=torch.long)
    for c in classes.unique().tolist():
        idx = (classes == c).nonzero().flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than per_class={per_class}")
        km = KMeans(per_class, n_init=1, random_state=seed).fit(flat[idx.numpy()])
        ids[idx] = int(c) * per_class + torch.as_tensor(km.labels_, dtype=torch.long)
    return ids


def verification_pairs(identities: Tensor, num_pairs: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``num_pairs`` index pairs, half of one identity (positive), half of two (negative).

    Args:
        identities: ``(N,)`` identity labels of the verification images.
        num_pairs: an even number of pairs.

    Returns:
        ``(i, j, same)``: ``(P,)`` indices into the images and ``(P,)`` bool, True for a positive pair.
    """
    if num_pairs < 2 or num_pairs % 2:
        raise ValueError(f"num_pairs must be an even integer >= 2; got {num_pairs!r}")
    g = torch.Generator().manual_seed(seed)
    n, half = len(identities), num_pairs // 2
    order = torch.argsort(identities, stable=True)
    sorted_ids = identities[order]
    _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    usable = (counts >= 2).nonzero().flatten()
    if len(usable) == 0 or len(counts) < 2:
        raise ValueError("verification needs at least two identities, one with two images")
    pick = usable[torch.randint(len(usable), (half,), generator=g)]
    a = torch.floor(torch.rand(half, generator=g) * counts[pick]).long()
    b = torch.floor(torch.rand(half, generator=g) * (counts[pick] - 1)).long()
    b = b + (b >= a).long()  # a second, different image of the same identity
    pos_i, pos_j = order[starts[pick] + a], order[starts[pick] + b]
    neg_i = torch.randint(n, (half,), generator=g)
    neg_j = torch.randint(n, (half,), generator=g)
    clash = identities[neg_i] == identities[neg_j]
    while clash.any():  # redraw until every negative pair crosses identities
        neg_j[clash] = torch.randint(n, (int(clash.sum()),), generator=g)
        clash = identities[neg_i] == identities[neg_j]
    same = torch.cat([torch.ones(half, dtype=torch.bool), torch.zeros(half, dtype=torch.bool)])
    return torch.cat([pos_i, neg_i]), torch.cat([pos_j, neg_j]), same


def _best_threshold(sim: np.ndarray, same: np.ndarray) -> float:
    """The accuracy-maximising threshold among the midpoints between consecutive distinct similarities
    (and one below / above them all); a pair is accepted when its similarity is >= the threshold."""
    u = np.unique(sim)
    cands = np.concatenate([[u[0] - 1.0], (u[1:] + u[:-1]) / 2, [u[-1] + 1.0]])
    acc = [((sim >= t) == same).mean() for t in cands]
    return float(cands[int(np.argmax(acc))])


def verification_metrics(similarity: Tensor, same: Tensor, fars: Sequence[float] = (0.01, 0.1),
                         folds: int = 10) -> dict[str, float]:
    """Verification accuracy (LFW protocol) and TAR at fixed FARs.

    Accuracy: the pairs are split into ``folds`` interleaved folds; for each, the threshold (a midpoint between
    similarities) that maximises accuracy on the other folds is applied to it; the mean test accuracy (%) is reported.
    TAR@FAR: with threshold ``tau`` the ``(1 - far)`` quantile of the negative pairs' similarities (so a
    fraction ``far`` of negatives is accepted), the fraction (%) of positive pairs with similarity > tau.

    Args:
        similarity: ``(P,)`` pair similarities (higher: more alike).
        same: ``(P,)`` bool, True for a positive pair.
    """
    s, y = similarity.detach().double().cpu().numpy(), same.cpu().numpy().astype(bool)
    if s.shape != y.shape or s.ndim != 1 or y.all() or not y.any():
        raise ValueError("similarity and same must be (P,) with both positive and negative pairs; got "
                         f"{s.shape} and {y.shape}")
    accs = []
    for k in range(folds):
        test = np.arange(len(s)) % folds == k
        t = _best_threshold(s[~test], y[~test])
        accs.append(((s[test] >= t) == y[test]).mean())
    out = {"accuracy": 100.0 * float(np.mean(accs))}
    neg = np.sort(s[~y])
    for far in fars:
        tau = np.quantile(neg, 1.0 - far)
        out[f"tar@far={far:g}"] = 100.0 * float((s[y] > tau).mean())
    return out


def degrade(images: Tensor, factor: int = 4, noise: float = 0.2, seed: int = 0) -> Tensor:
    """Hard samples: each image average-pooled by ``factor``, upsampled back (nearest), plus Gaussian noise
    of std ``noise`` (a fixed draw from ``seed``), clipped to [0, 1]. ``(N, C, H, W) -> (N, C, H, W)``."""
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"factor {factor} must divide the image size {tuple(images.shape[-2:])}")
    low = F.interpolate(F.avg_pool2d(images, factor), scale_factor=factor, mode="nearest")
    g = torch.Generator().manual_seed(seed)
    return (low + noise * torch.randn(images.shape, generator=g)).clamp(0, 1)
