"""Transfer sets, ensemble labels and pseudo-labels: the math of the ensemble/semi-supervised strategies.

Pure, seeded functions on tensors (no modules, no global random state); the strategies in
:mod:`distill.strategies.transfer` call them.

* **MUNGE** (:func:`munge`, :func:`munge_swap`), with the two simpler generators it is compared
  with, RANDOM (:func:`random_transfer`) and NBE (:func:`fit_naive_bayes_mixture`,
  :func:`sample_naive_bayes_mixture`): C. Buciluă, R. Caruana, A. Niculescu-Mizil, "Model
  Compression", KDD 2006. The mimic model's loss: :func:`probability_regression_loss`.
* **Co-training**'s selection of confidently self-labelled examples (:func:`cotrain_select`) and
  its two views of an image (:func:`half_view`): A. Blum, T. Mitchell, "Combining Labeled and
  Unlabeled Data with Co-Training", COLT 1998.
* **Data distillation**'s multi-transform inference (:func:`transform_grid`,
  :func:`apply_transform`, :func:`rescale`, :func:`hflip`) and its ensembled pseudo-labels
  (:func:`mean_probabilities`, :func:`pseudo_labels`): I. Radosavovic, P. Dollár, R. Girshick,
  G. Gkioxari, K. He, "Data Distillation: Towards Omni-Supervised Learning", CVPR 2018, arXiv
  1712.04440.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "NaiveBayesMixture",
    "apply_transform",
    "cotrain_select",
    "fit_naive_bayes_mixture",
    "half_view",
    "hflip",
    "mean_probabilities",
    "munge",
    "munge_swap",
    "plurality_vote",
    "probability_regression_loss",
    "pseudo_labels",
    "random_transfer",
    "rescale",
    "sample_naive_bayes_mixture",
    "transform_grid",
]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_table(x: Tensor, who: str, min_rows: int = 1) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} expects a float table (N, D) of N examples and D attributes; got {got} "
                         "(flatten images with x.flatten(1))")
    if x.shape[0] < min_rows:
        raise ValueError(f"{who} needs at least {min_rows} examples; got {x.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}: the data holds NaN or infinite values")


def _check_count(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def _nominal_mask(nominal: Tensor | Sequence[int] | Sequence[bool] | None, d: int, device: torch.device) -> Tensor:
    """``(D,)`` bool: True for nominal attributes, from a bool mask or a list of column indices."""
    if nominal is None:
        return torch.zeros(d, dtype=torch.bool, device=device)
    t = torch.as_tensor(nominal, device=device)
    if t.dtype == torch.bool:
        if t.shape != (d,):
            raise ValueError(f"nominal as a mask must have shape ({d},); got {tuple(t.shape)}")
        return t
    if t.dim() != 1 or t.is_floating_point() or (t.numel() and (int(t.min()) < 0 or int(t.max()) >= d)):
        raise ValueError(f"nominal must be a ({d},) bool mask or column indices in [0, {d}); got {nominal!r}")
    mask = torch.zeros(d, dtype=torch.bool, device=device)
    mask[t.long()] = True
    return mask


# --------------------------------------------------------------------------------------------
# MUNGE (Buciluă, Caruana, Niculescu-Mizil, KDD 2006)
# --------------------------------------------------------------------------------------------


def munge_swap(a: Tensor, b: Tensor, swap: Tensor, noise_a: Tensor, noise_b: Tensor, s: float,
               nominal: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""MUNGE's update of an example ``a`` and its nearest neighbour ``b``, attribute by attribute.

    For each attribute :math:`j` chosen for a swap (``swap[j]``, drawn with probability ``p``):

    * nominal: the two values are exchanged, :math:`a'_j = b_j,\ b'_j = a_j`;
    * continuous: each takes a draw around the *other's* value with the local spread
      :math:`\sigma_j = |a_j - b_j| / s`:
      :math:`a'_j = b_j + \sigma_j \varepsilon^a_j,\ b'_j = a_j + \sigma_j \varepsilon^b_j`,
      :math:`\varepsilon \sim \mathcal N(0, 1)` given as ``noise_a`` / ``noise_b``.

    Attributes not chosen keep their values. ``s = inf`` makes the continuous rule an exact swap.

    Shapes: ``a``, ``b``, ``noise_a``, ``noise_b`` ``(D,)`` (or any equal shapes), ``swap`` and
    ``nominal`` bool of the same shape → two tensors of that shape.
    """
    sd = (a - b).abs() / s
    new_a = torch.where(swap, b + sd * noise_a, a)
    new_b = torch.where(swap, a + sd * noise_b, b)
    if nominal is not None:
        exact = swap & nominal
        new_a = torch.where(exact, b, new_a)
        new_b = torch.where(exact, a, new_b)
    return new_a, new_b


def munge(x: Tensor, *, p: float = 0.5, s: float = 5.0, multiplier: int = 1,
          nominal: Tensor | Sequence[int] | Sequence[bool] | None = None, seed: int = 0) -> Tensor:
    r"""MUNGE: a synthetic transfer set that follows the joint distribution of ``x``.

    Algorithm 1 of Buciluă, Caruana & Niculescu-Mizil, "Model Compression", KDD 2006, run
    ``multiplier`` times, each pass on a fresh copy :math:`T' \leftarrow T` of the data::

        for each example e of T' (in order):
            e' = the nearest neighbour of e in T' (the copy as modified so far), e' != e
            (e, e') = munge_swap(e, e', swap ~ Bernoulli(p) per attribute, noise ~ N(0, 1), s)

    and the passes' :math:`T'` are stacked. Both the example and its neighbour are changed, in
    place, so later examples search among already-munged ones, as in the paper's pseudo-code.

    Distance: :math:`d(e, f)^2 = \sum_{j\ \mathrm{cont}} ((e_j - f_j) / r_j)^2 + \sum_{j\ \mathrm{nom}} [e_j \ne f_j]`,
    Euclidean on continuous attributes scaled to [0, 1] by their range :math:`r_j` in ``x`` (the
    paper scales continuous attributes to [0, 1]) plus the Hamming distance on nominal ones; a
    constant attribute counts 0. Ties go to the lowest index.

    Randomness: ``torch.Generator().manual_seed(seed)``; each pass draws, in this order,
    ``U = rand(N, D)`` (``swap = U[e] < p``) then ``Z = randn(N, 2, D)`` (``noise_a = Z[e, 0]``,
    ``noise_b = Z[e, 1]``), both on the CPU in ``x``'s dtype. The same ``(x, arguments)`` always
    give the same output; nothing global is touched.

    Args:
        x: the training inputs ``(N, D)`` (images: ``x.flatten(1)``), N >= 2.
        p: probability of swapping each attribute (0.5).
        s: local-variance divisor (5; ``math.inf`` swaps continuous values exactly).
        multiplier: passes, so ``multiplier * N`` synthetic examples.
        nominal: nominal attributes, as a ``(D,)`` bool mask or column indices (default: none).
        seed: seed of the draws.

    Returns:
        ``(multiplier * N, D)``, ``x``'s dtype and device; ``x`` is not modified.

    Defaults: the paper treats p and s as settings of the generator; the values here (p = 0.5,
    s = 5) are those of the public R implementation that cites the paper (``munge(p_swap = 0.5,
    local_var = 5)``); the paper's own values could not be checked here. Cost: O(multiplier · N² · D),
    one Python step per example (the sequential in-place update does not vectorise).
    """
    _check_table(x, "munge", min_rows=2)
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"munge: p must be a probability in [0, 1]; got {p!r}")
    if not float(s) > 0:
        raise ValueError(f"munge: s must be > 0 (math.inf for exact swaps); got {s!r}")
    _check_count("munge: multiplier", multiplier)
    n, d = x.shape
    nom = _nominal_mask(nominal, d, x.device)
    span = x.max(0).values - x.min(0).values
    inv_span = torch.where((span > 0) & ~nom, 1.0 / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(span))
    g = torch.Generator().manual_seed(int(seed))
    passes = []
    for _ in range(multiplier):
        t = x.clone()
        u = torch.rand(n, d, generator=g, dtype=x.dtype).to(x.device)
        z = torch.randn(n, 2, d, generator=g, dtype=x.dtype).to(x.device)
        for e in range(n):
            diff = t - t[e]
            dist = (diff * inv_span).pow(2).sum(1) + (diff[:, nom] != 0).sum(1).to(x.dtype)
            dist[e] = math.inf
            j = int(dist.argmin())
            t[e], t[j] = munge_swap(t[e], t[j], u[e] < p, z[e, 0], z[e, 1], float(s), nom)
        passes.append(t)
    return torch.cat(passes)


def random_transfer(x: Tensor, num_samples: int, *, seed: int = 0) -> Tensor:
    r"""RANDOM, the simplest transfer set of the paper: every attribute drawn on its own.

    Each attribute :math:`j` of each synthetic example is a value picked uniformly at random from
    the multiset :math:`\{x_{1j}, \dots, x_{Nj}\}` of that attribute's values in the training data
    (so the marginals are kept and every dependency between attributes is lost, which is why the
    paper finds it a poor transfer set).

    Shapes: ``x`` ``(N, D)`` → ``(num_samples, D)``. Draws: ``randint(0, N, (num_samples, D))``
    from ``torch.Generator().manual_seed(seed)``.
    """
    _check_table(x, "random_transfer")
    _check_count("random_transfer: num_samples", num_samples)
    g = torch.Generator().manual_seed(int(seed))
    rows = torch.randint(0, x.shape[0], (num_samples, x.shape[1]), generator=g).to(x.device)
    return x.gather(0, rows)


class NaiveBayesMixture(NamedTuple):
    """A mixture of C naive-Bayes (diagonal Gaussian) components over D attributes."""

    weights: Tensor  # (C,), sums to 1
    means: Tensor  # (C, D)
    variances: Tensor  # (C, D)


def _component_log_likelihood(x: Tensor, model: NaiveBayesMixture) -> Tensor:
    """``log w_c + log N(x_n | mu_c, diag var_c)`` for every example and component, ``(N, C)``."""
    var = model.variances
    sq = (x[:, None, :] - model.means[None]).pow(2) / var[None]
    log_norm = (var.log() + math.log(2 * math.pi)).sum(1)  # (C,)
    return model.weights.clamp_min(torch.finfo(x.dtype).tiny).log() - 0.5 * (sq.sum(2) + log_norm)


def fit_naive_bayes_mixture(x: Tensor, components: int = 10, *, iterations: int = 50, min_variance: float = 1e-3,
                            seed: int = 0) -> NaiveBayesMixture:
    r"""NBE's density model, fitted by EM: a mixture of naive-Bayes components (the paper's NBE baseline).

    .. math:: p(x) = \sum_c w_c \prod_j \mathcal N(x_j \mid \mu_{cj}, \sigma^2_{cj})

    E-step: responsibilities :math:`r_{nc} \propto w_c \prod_j \mathcal N(x_{nj} \mid \mu_{cj}, \sigma^2_{cj})`;
    M-step: :math:`w_c = \frac1N \sum_n r_{nc}`, :math:`\mu_c = \sum_n r_{nc} x_n / \sum_n r_{nc}`,
    :math:`\sigma^2_c = \max(\sum_n r_{nc} (x_n - \mu_c)^2 / \sum_n r_{nc},\ \text{min\_variance})`.
    Initialised with ``components`` distinct training examples as means (a seeded permutation),
    the data's variance per attribute and equal weights.

    Shapes: ``x`` ``(N, D)`` → weights ``(C,)``, means ``(C, D)``, variances ``(C, D)``.

    NBE (D. Lowd, P. Domingos, "Naive Bayes Models for Probability Estimation", ICML 2005), which the
    paper samples from, also models nominal attributes (multinomials), and grows and prunes the
    number of components on held-out likelihood; here C is fixed and every attribute is Gaussian.
    """
    _check_table(x, "fit_naive_bayes_mixture")
    _check_count("fit_naive_bayes_mixture: components", components)
    _check_count("fit_naive_bayes_mixture: iterations", iterations, low=0)
    if components > x.shape[0]:
        raise ValueError(f"fit_naive_bayes_mixture: components={components} exceeds the {x.shape[0]} examples")
    if not min_variance > 0:
        raise ValueError(f"fit_naive_bayes_mixture: min_variance must be > 0; got {min_variance!r}")
    g = torch.Generator().manual_seed(int(seed))
    start = torch.randperm(x.shape[0], generator=g)[:components].to(x.device)
    var0 = x.var(0, unbiased=False).clamp_min(min_variance)
    model = NaiveBayesMixture(torch.full((components,), 1.0 / components, dtype=x.dtype, device=x.device),
                              x[start].clone(), var0.expand(components, -1).clone())
    for _ in range(iterations):
        r = _component_log_likelihood(x, model).softmax(1)  # (N, C)
        mass = r.sum(0)  # (C,)
        safe = mass.clamp_min(torch.finfo(x.dtype).tiny)[:, None]
        means = r.T @ x / safe
        var = (r.T @ x.pow(2) / safe - means.pow(2)).clamp_min(min_variance)
        alive = (mass > 0)[:, None]  # a component that lost every example keeps its old shape
        model = NaiveBayesMixture(mass / x.shape[0], torch.where(alive, means, model.means),
                                  torch.where(alive, var, model.variances))
    return model


def sample_naive_bayes_mixture(model: NaiveBayesMixture, num_samples: int, *, seed: int = 0) -> Tensor:
    r"""Draw ``num_samples`` examples ``(num_samples, D)`` from a :class:`NaiveBayesMixture`.

    A component :math:`c \sim \mathrm{Cat}(w)` per example, then every attribute independently,
    :math:`x_j \sim \mathcal N(\mu_{cj}, \sigma^2_{cj})`. Draws: ``multinomial`` then ``randn`` from
    ``torch.Generator().manual_seed(seed)``.
    """
    _check_count("sample_naive_bayes_mixture: num_samples", num_samples)
    g = torch.Generator().manual_seed(int(seed))
    comp = torch.multinomial(model.weights.detach().cpu().float(), num_samples, replacement=True, generator=g)
    eps = torch.randn(num_samples, model.means.shape[1], generator=g, dtype=model.means.dtype)
    comp, eps = comp.to(model.means.device), eps.to(model.means.device)
    return model.means[comp] + model.variances[comp].sqrt() * eps


def probability_regression_loss(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    r"""Squared error between the student's class probabilities and the teacher's (mimic training).

    .. math:: L = \frac1B \sum_b \sum_k \big(\operatorname{softmax}(s_b)_k - p_{b,k}\big)^2

    Shapes: ``student_logits`` (B, K), ``teacher_probs`` (B, K) (rows summing to 1) → scalar.

    Model Compression trains the mimic network on the ensemble's predictions as regression targets
    (squared error to the ensemble's predicted probability); for K classes this is the sum over
    the K probability outputs. ``nn.MSELoss`` on the probabilities equals this divided by K.
    """
    if student_logits.shape != teacher_probs.shape or student_logits.dim() != 2:
        raise ValueError(f"probability_regression_loss expects two (B, K) tensors of one shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
    return (fp32(student_logits).softmax(1) - teacher_probs).pow(2).sum(1).mean()


# --------------------------------------------------------------------------------------------
# Co-training (Blum & Mitchell, COLT 1998)
# --------------------------------------------------------------------------------------------


def half_view(x: Tensor, which: str) -> Tensor:
    """One of two disjoint views of images ``(B, C, H, W)``: the named half kept, the other zeroed.

    ``which``: ``"left"`` (columns ``[0, W // 2)``), ``"right"`` (``[W // 2, W)``), ``"top"`` (rows
    ``[0, H // 2)``) or ``"bottom"``. The shape is kept, so one architecture serves both views.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"half_view expects images (B, C, H, W); got {tuple(x.shape) if isinstance(x, Tensor) else x!r}")
    halves = {"left": (-1, 0), "right": (-1, 1), "top": (-2, 0), "bottom": (-2, 1)}
    if which not in halves:
        raise ValueError(f"half_view: which must be one of {sorted(halves)}; got {which!r}")
    dim, part = halves[which]
    size = x.shape[dim]
    keep = torch.arange(size, device=x.device) < size // 2
    keep = keep if part == 0 else ~keep
    shape = [1] * x.dim()
    shape[dim] = size
    return x * keep.view(shape).to(x.dtype)


def cotrain_select(probs: Tensor, counts: Sequence[int] | Tensor, available: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""The examples one co-training classifier labels in a round: its most confident per class.

    For each class :math:`c = 0, \dots, K-1` in turn, the ``counts[c]`` examples with the highest
    :math:`P(c \mid x)` among those still available (``available`` and not yet taken for an
    earlier class) are labelled :math:`c`; ties go to the lower index. Blum & Mitchell's binary
    rule "the p most confident positive and n most confident negative" is ``counts = (n, p)``
    with class 1 positive.

    Shapes: ``probs`` ``(U, K)`` (a classifier's class probabilities on the pool), ``counts`` ``(K,)``
    non-negative, ``available`` ``(U,)`` bool (default all) → ``(index (M,), labels (M,))``, int64,
    class by class; fewer than ``sum(counts)`` when the pool runs out.
    """
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        raise ValueError(f"cotrain_select expects probabilities (U, K); got {probs!r}")
    u, k = probs.shape
    counts_t = torch.as_tensor(counts)
    if counts_t.shape != (k,) or counts_t.is_floating_point() or bool((counts_t < 0).any()):
        raise ValueError(f"cotrain_select: counts must be {k} non-negative integers (one per class); got {counts!r}")
    free = torch.ones(u, dtype=torch.bool, device=probs.device) if available is None else available.clone().bool()
    if free.shape != (u,):
        raise ValueError(f"cotrain_select: available must have shape ({u},); got {tuple(free.shape)}")
    index, labels = [], []
    for c in range(k):
        n_c = int(counts_t[c])
        if n_c == 0:
            continue
        order = torch.sort(probs[:, c], descending=True, stable=True).indices
        chosen = order[free[order]][:n_c]
        free[chosen] = False
        index.append(chosen)
        labels.append(torch.full_like(chosen, c))
    if not index:
        empty = torch.zeros(0, dtype=torch.long, device=probs.device)
        return empty, empty.clone()
    return torch.cat(index), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Data distillation (Radosavovic et al., CVPR 2018): multi-transform inference
# --------------------------------------------------------------------------------------------


def hflip(x: Tensor) -> Tensor:
    """Mirror images ``(B, C, H, W)`` left-right."""
    return x.flip(-1)


def rescale(x: Tensor, scale: float, fill: float = 0.0) -> Tensor:
    """Rescale images ``(B, C, H, W)`` by ``scale`` and bring them back to ``H x W`` around the centre.

    The image is resized (bilinear, ``align_corners=False``, no antialiasing) to
    ``(round(H * scale), round(W * scale))`` (at least 1 pixel), then centre-cropped (scale > 1,
    a zoom in) or centre-padded with ``fill`` (scale < 1, a zoom out); when the margin is odd the
    extra pixel is taken from (or added at) the bottom / right. Keeping the size lets any model,
    also one without global pooling, take every scale; the paper resizes whole images for a
    fully-convolutional detector instead.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"rescale expects images (B, C, H, W); got {tuple(x.shape) if isinstance(x, Tensor) else x!r}")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"rescale: scale must be a finite number > 0; got {scale!r}")
    h, w = x.shape[-2:]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return x
    y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    dh, dw = h - nh, w - nw  # > 0: pad, < 0: crop (F.pad crops on negative margins)
    return F.pad(y, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=fill)


def transform_grid(scales: Sequence[float] = (1.0,), flip: bool = True) -> list[tuple[float, bool]]:
    """Every ``(scale, flipped)`` pair of the multi-transform inference: each scale, unflipped and
    (with ``flip``) flipped, as the paper combines its test scales with horizontal flipping."""
    scales = list(scales)
    if not scales:
        raise ValueError("transform_grid needs at least one scale")
    for sc in scales:
        if isinstance(sc, bool) or not isinstance(sc, (int, float)) or not (math.isfinite(sc) and sc > 0):
            raise ValueError(f"transform_grid: scales must be finite numbers > 0; got {scales!r}")
    return [(float(sc), f) for sc in scales for f in ((False, True) if flip else (False,))]


def apply_transform(x: Tensor, scale: float, flipped: bool, fill: float = 0.0) -> Tensor:
    """One transform of :func:`transform_grid` on images ``(B, C, H, W)``: :func:`rescale` then :func:`hflip`."""
    y = rescale(x, scale, fill)
    return hflip(y) if flipped else y


def mean_probabilities(logits: Tensor) -> Tensor:
    r"""The ensembled prediction: the average of the class probabilities over transforms (or models).

    .. math:: \bar p_{b} = \frac1T \sum_t \operatorname{softmax}(z_{t,b})

    Shapes: ``logits`` ``(T, B, K)`` → ``(B, K)``.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"mean_probabilities expects logits (T, B, K); got {logits!r}")
    return fp32(logits).softmax(-1).mean(0)


def plurality_vote(member_logits: Tensor) -> Tensor:
    r"""The class most members of an ensemble predict (bagging's vote), per example.

    .. math:: \hat y_b = \arg\max_k \big(\#\{m : \arg\max_j z_{m,b,j} = k\} + \tfrac12 \bar p_{b,k}\big)

    A tie in votes goes to the class with the higher mean probability :math:`\bar p` (which, at most
    1/2, never outweighs a vote), then to the lower index.

    Shapes: ``member_logits`` ``(M, B, K)`` → ``(B,)`` int64.
    """
    votes = F.one_hot(member_logits.argmax(-1), member_logits.shape[-1]).sum(0)
    return (votes.to(member_logits.dtype) + 0.5 * mean_probabilities(member_logits)).argmax(1)


def pseudo_labels(probs: Tensor, threshold: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Hard labels from ensembled probabilities, kept where the score clears a threshold.

    ``labels = argmax_k probs``, ``scores = max_k probs``, ``keep = scores >= threshold`` (all kept
    when ``threshold`` is None).

    Shapes: ``probs`` ``(B, K)`` → ``labels`` ``(B,)`` int64, ``scores`` ``(B,)``, ``keep`` ``(B,)`` bool.

    The paper keeps a detection when its score clears a threshold chosen so that the unlabeled
    images get as many annotations on average as the labelled ones have; a classification image has
    exactly one label, so that rule keeps every image (``threshold=None``); a threshold in [0, 1]
    keeps only the confident ones.
    """
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        raise ValueError(f"pseudo_labels expects probabilities (B, K); got {probs!r}")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"pseudo_labels: threshold must be None or in [0, 1]; got {threshold!r}")
    scores, labels = probs.max(1)
    keep = torch.ones_like(labels, dtype=torch.bool) if threshold is None else scores >= threshold
    return labels, scores, keep
