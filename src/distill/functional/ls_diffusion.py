"""Penultimate-layer geometry of label smoothing and KD: Müller's template-plane projection and a
measure of *systematic diffusion*.

Papers:

* Müller, Kornblith, Hinton, "When does label smoothing help?", NeurIPS 2019, arXiv 1906.02629,
  Section 2: the visualisation. Pick three classes; the *template* of class ``k`` is the final
  layer's row ``w_k``; find an orthonormal basis of the plane through the three templates; project
  the penultimate activations of those classes' examples onto it (read from the abstract and
  secondary summaries here, not the paper's text). The bias is appended to the template and a
  ``1`` to the activation (so that the logit is ``x̃ᵀw̃_k``) as the authors of the ICML 2022 paper do
  in their script; ``bias=None`` gives the bias-free projection.
* Chandrasegaran, Tran, Zhao, Cheung, "Revisiting Label Smoothing and Knowledge Distillation
  Compatibility: What was Missing?", ICML 2022, arXiv 2206.14532: with a teacher trained with label
  smoothing (LS) distilled at a higher temperature T, the student's cluster of the target class
  *diffuses systematically* toward a semantically similar class in that projection.

What was read: of Chandrasegaran et al. only the abstract and introduction (the stored pages end
there) and the authors' visualisation script (``src/visualization/alpha-LS-KD_imagenet_centroids.py``
of sutd-visual-computing-group/LS-KD-compatibility). That script shows the effect as pictures and
marks the class centroids; no number that quantifies the diffusion could be read. The measure in
:func:`systematic_diffusion` is therefore OURS (defined below); the projection is Müller's.

Departures from the authors' script, on purpose: it takes the 3-D *span* of the three augmented
templates (a QR of them, origin included) and then a PCA fitted to the projected points to draw 2-D;
we keep Müller's 2-D plane *through* the templates, which needs no fitted PCA (the figure is the same
plane for every data set). The script indexes the bias by the classes' positions (0, 1, 2) rather
than their class ids; we take the chosen classes' own biases.

Our measure, in the plane. Let ``u_s = (w̃_s − w̃_t)/‖w̃_s − w̃_t‖`` (target → similar template; it
lies in the plane, it is the first Gram–Schmidt axis). For a target-class example,
``x̃ᵀu_s = (z_s − z_t)/‖w̃_s − w̃_t‖`` with ``z`` its logits, so the position of an example along
that axis is its logit margin of the similar class over the target one, up to one constant. With
``μ_t, μ_s`` the mean positions of the target and similar classes' examples, each target example's
*relative position* is ``r_i = (x̃_iᵀu_s − μ_t)/(μ_s − μ_t)``: 0 at the target cluster's centroid,
1 at the similar cluster's. Then

* ``spread_similar = std_i(r_i)`` (population std): how far the target cluster spreads toward the
  similar class, in units of the gap between the two clusters;
* ``overlap_similar = mean_i[r_i > 1/2]``: the share of target examples past the midpoint;
* the same two toward the dissimilar class (axis ``u_d``), and
  ``directionality = spread_similar / spread_dissimilar``: above 1 the spread is *systematic*,
  aimed at the similar class rather than at every class alike.

All of them are invariant to a rotation of the penultimate space (applied to features and
templates), to scaling or translating the features, and to scaling the templates (the constant
of the augmented ``1`` cancels in the differences).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DiffusionStats", "pick_diffusion_classes", "project_to_template_plane", "systematic_diffusion",
           "template_plane_basis"]


def _augmented_templates(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[W | b]`` (K, D+1), or ``W`` (K, D) without a bias, in float64 (the geometry is small)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be the final layer's (K, D) matrix; got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if bias is None:
        return w
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}; "
                         f"got {tuple(bias.shape)}")
    return torch.cat([w, bias.detach().to(torch.float64)[:, None]], dim=1)


def _augmented_features(features: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if features.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"features must be penultimate activations (N, {weight.shape[1]}) matching weight "
                         f"{tuple(weight.shape)}; got shape {tuple(features.shape)}")
    x = features.detach().to(torch.float64)
    if bias is None:
        return x
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)


def _check_classes(classes: tuple[int, int, int], num_classes: int) -> tuple[int, int, int]:
    if len(classes) != 3:
        raise ValueError(f"classes must be (target, similar, dissimilar); got {classes!r}")
    t, s, d = (int(c) for c in classes)
    if len({t, s, d}) != 3 or not all(0 <= c < num_classes for c in (t, s, d)):
        raise ValueError(f"classes must be three distinct class ids in [0, {num_classes}); got {classes!r}")
    return t, s, d


def template_plane_basis(weight: Tensor, bias: Tensor | None, classes: tuple[int, int, int],
                         eps: float = 1e-9) -> Tensor:
    r"""Orthonormal basis of the plane through three class templates (Müller et al. 2019, arXiv 1906.02629).

    Gram–Schmidt on the template differences, target first:

    .. math:: e_1 = \frac{\tilde w_s - \tilde w_t}{\lVert \tilde w_s - \tilde w_t\rVert},\qquad
              e_2 = \frac{v - (v^\top e_1) e_1}{\lVert v - (v^\top e_1) e_1\rVert},\quad v = \tilde w_d - \tilde w_t

    Args:
        weight: final layer weight (K, D); row ``k`` is class ``k``'s template.
        bias: final layer bias (K,) appended to the templates, or None (then features get no ``1``).
        classes: ``(target, similar, dissimilar)`` class ids.
        eps: relative tolerance below which the templates count as collinear.

    Returns:
        (2, D') float64, ``D' = D + 1`` with a bias, else ``D``; row 0 points from the target
        template to the similar one.
    """
    t, s, d = _check_classes(classes, weight.shape[0] if weight.dim() == 2 else 0)
    w = _augmented_templates(weight, bias)
    a, v = w[s] - w[t], w[d] - w[t]
    scale = max(float(a.norm()), float(v.norm()), float(w[t].norm()), 1e-300)
    if float(a.norm()) <= eps * scale:
        raise ValueError(f"the templates of classes {t} and {s} coincide: no plane through them")
    e1 = a / a.norm()
    v = v - (v @ e1) * e1  # Gram–Schmidt: remove the component along e1
    if float(v.norm()) <= eps * scale:
        raise ValueError(f"the templates of classes {classes!r} are collinear: no unique plane through them")
    return torch.stack([e1, v / v.norm()])


def project_to_template_plane(features: Tensor, weight: Tensor, bias: Tensor | None,
                              classes: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    r"""Müller's 2-D coordinates of penultimate activations in the plane through three templates.

    ``coords_i = ((x̃_i − w̃_t)ᵀ e_1, (x̃_i − w̃_t)ᵀ e_2)``: the orthogonal projection onto the plane,
    with the target template at the origin (the choice of origin only translates the figure).

    Args:
        features: penultimate activations ``x`` (N, D), e.g. the input of the final linear layer.
        weight, bias, classes: as in :func:`template_plane_basis`.

    Returns:
        ``(coords (N, 2), templates (3, 2))`` float64: the examples' and the three templates'
        (target, similar, dissimilar) coordinates.
    """
    basis = template_plane_basis(weight, bias, classes)
    x = _augmented_features(features, weight, bias)
    w = _augmented_templates(weight, bias)
    t = int(classes[0])
    idx = torch.tensor([int(c) for c in classes])
    return (x - w[t]) @ basis.T, (w[idx] - w[t]) @ basis.T


def _check_target(target: int, k: int) -> None:
    if not 0 <= int(target) < k or k < 3:
        raise ValueError(f"target must be a class id in [0, {k}) with at least 3 classes; got target={target}")


def pick_diffusion_classes(target: int, weight: Tensor | None = None, bias: Tensor | None = None, *,
                           logits: Tensor | None = None, labels: Tensor | None = None,
                           by: str = "template") -> tuple[int, int, int]:
    """Choose the semantically similar and the dissimilar class for ``target`` (ours: the paper picks by hand).

    ``by="template"``: the classes whose augmented templates are nearest to and farthest from the
    target's (Euclidean, bias appended when given). ``by="confusion"``: from a (teacher's) logits
    (N, K) and labels (N,): among the target-class examples, the class with the highest and the
    lowest mean softmax probability other than the target (the most and least confused class).

    Returns:
        ``(target, similar, dissimilar)``.
    """
    if by == "template":
        if weight is None:
            raise ValueError("by='template' needs the final layer's weight (K, D)")
        w = _augmented_templates(weight, bias)
        k = w.shape[0]
        _check_target(target, k)
        score = -(w - w[int(target)]).norm(dim=1)  # nearer = higher
    elif by == "confusion":
        if logits is None or labels is None:
            raise ValueError("by='confusion' needs logits (N, K) and labels (N,)")
        if logits.dim() != 2 or labels.shape != (logits.shape[0],):
            raise ValueError(f"logits must be (N, K) and labels (N,); got {tuple(logits.shape)} and "
                             f"{tuple(labels.shape)}")
        k = logits.shape[1]
        _check_target(target, k)
        rows = labels == int(target)
        if not bool(rows.any()):
            raise ValueError(f"no example of the target class {target} among the labels")
        score = torch.softmax(logits[rows].detach().to(torch.float64), dim=1).mean(0)
    else:
        raise ValueError(f"by must be 'template' or 'confusion'; got {by!r}")
    score = score.clone()
    score[int(target)] = float("-inf")
    similar = int(score.argmax())
    score[int(target)] = float("inf")
    dissimilar = int(score.argmin())
    return int(target), similar, dissimilar


class DiffusionStats(NamedTuple):
    """Our measure of systematic diffusion (see the module docstring); every field is a float."""

    spread_similar: float
    spread_dissimilar: float
    overlap_similar: float
    overlap_dissimilar: float
    directionality: float


def _relative_positions(x: Tensor, labels: Tensor, axis: Tensor, t: int, other: int) -> Tensor:
    pos = x @ axis
    mu_t, mu_o = pos[labels == t].mean(), pos[labels == other].mean()
    gap = mu_o - mu_t
    if not float(gap) > 0:  # the classifier does not even order the two class means along its own axis
        raise ValueError(f"class {other}'s examples are not on average past class {t}'s along the template axis "
                         f"(gap {float(gap):.3g}): the model does not separate them")
    return (pos[labels == t] - mu_t) / gap


def systematic_diffusion(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None,
                         classes: tuple[int, int, int]) -> DiffusionStats:
    r"""How far the target class's penultimate cluster spreads toward the similar class (OURS).

    Along ``u = (w̃_o − w̃_t)/‖w̃_o − w̃_t‖`` for ``o`` the similar, then the dissimilar class:
    ``r_i = (x̃_iᵀu − μ_t)/(μ_o − μ_t)`` for the target examples ``i``, ``μ_c`` the mean of
    ``x̃ᵀu`` over class ``c``'s examples; ``spread = std(r)`` (population), ``overlap = mean[r > ½]``;
    ``directionality = spread_similar / spread_dissimilar``. Both axes lie in Müller's plane
    (:func:`template_plane_basis`), so these are read off the projection. See the module docstring
    for why it is ours and what it is invariant to.

    Args:
        features: penultimate activations (N, D) of examples that include the three classes (others
            are ignored).
        labels: (N,) class ids.
        weight, bias, classes: as in :func:`template_plane_basis`.
    """
    t, s, d = _check_classes(classes, weight.shape[0] if weight.dim() == 2 else 0)
    x = _augmented_features(features, weight, bias)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must have shape ({features.shape[0]},); got {tuple(labels.shape)}")
    labels = labels.to(x.device)
    for c in (t, s, d):
        if int((labels == c).sum()) < 2:
            raise ValueError(f"class {c} needs at least 2 examples; got {int((labels == c).sum())}")
    template_plane_basis(weight, bias, classes)  # the same errors as the projection (coincident / collinear)
    w = _augmented_templates(weight, bias).to(x.device)
    out = []
    for o in (s, d):
        axis = (w[o] - w[t]) / (w[o] - w[t]).norm()
        r = _relative_positions(x, labels, axis, t, o)
        out.append((float(r.std(unbiased=False)), float((r > 0.5).double().mean())))
    (sp_s, ov_s), (sp_d, ov_d) = out
    return DiffusionStats(sp_s, sp_d, ov_s, ov_d, sp_s / sp_d if sp_d > 0 else float("inf"))
