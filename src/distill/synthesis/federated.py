"""Simulated federated learning and FedFTG's server-side data-free fine-tuning.

Zhang, Shen, Ding, Tao, Duan, "Fine-tuning Global Model via Data-Free Knowledge Distillation for
Non-IID Federated Learning", CVPR 2022, arXiv 2203.09249 (FedFTG). Only the paper's abstract could
be read here; every form and default below is read from the authors' code
(github.com/ZhangLin-PKU/FedFTG: ``utils/util_dataset.py``, ``methods/train_gan_fn.py``,
``methods/local_fn_gan.py``) and marked where we depart from it.

The pieces, each a plain function of tensors and models:

* :func:`dirichlet_split`: non-IID clients, each with a class prior ``p_k ~ Dir(beta * 1_K)``;
* :func:`local_train`: a client's local SGD on its own data;
* :func:`fedavg`: parameters averaged with weights ``n_k / sum_j n_j`` (McMahan et al. 2017);
* :func:`class_client_weights`, :func:`sample_labels`: FedFTG's class-level ensemble weights
  ``alpha[c, k] = n_k^c / sum_j n_j^c`` and its customised label sampling ``p(y = c) ∝ sum_k n_k^c``;
* :func:`fedftg_diversity`, :func:`fedftg_generator_loss`, :func:`ensemble_soft_targets`: the
  generator's objective (hard samples + fidelity + diversity) and the global model's target;
* :func:`fedftg_finetune`: the server's loop, which sees the client *models* and their per-class
  sample counts, never a client's data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConditionalGenerator",
    "class_client_weights",
    "class_counts",
    "dirichlet_split",
    "ensemble_soft_targets",
    "fedavg",
    "fedftg_diversity",
    "fedftg_finetune",
    "fedftg_generator_loss",
    "local_train",
    "sample_labels",
]


# ----------------------------------------------------------------------------- clients


def dirichlet_split(labels: Tensor, num_clients: int, beta: float, *, num_classes: int | None = None,
                    seed: int = 0) -> list[Tensor]:
    """Split sample indices among ``num_clients`` non-IID clients (FedFTG's code's "Dirichlet" rule).

    Every client gets ``N // num_clients`` samples (the first ``N % num_clients`` clients one more)
    and a class prior ``p_k ~ Dir(beta * 1_K)``; its samples are drawn one at a time (clients
    visited in random order): a class ``c ~ p_k``, redrawn while class ``c`` has no sample left
    (drawn directly from ``p_k`` restricted to the classes with samples left, which is the same
    distribution), then the next unused sample of class ``c``. Small ``beta`` gives clients dominated by one or two
    classes; large ``beta`` approaches an IID split. Every sample is used exactly once.

    Args:
        labels: int labels ``(N,)``.
        num_clients: number of clients ``M``.
        beta: Dirichlet concentration (> 0).
        num_classes: ``K``; default ``labels.max() + 1``.
        seed: seed of every draw (the same seed gives the same split).

    Returns:
        ``M`` int64 index tensors into ``labels``, disjoint, together covering ``range(N)``.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"dirichlet_split: labels must be a non-empty (N,) tensor; got shape {tuple(labels.shape)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or not 1 <= num_clients <= labels.numel():
        raise ValueError(f"dirichlet_split: num_clients must be an int in [1, N={labels.numel()}]; got {num_clients!r}")
    if not beta > 0:
        raise ValueError(f"dirichlet_split: beta must be > 0; got {beta!r}")
    y = labels.cpu().numpy().astype(np.int64)
    k = int(num_classes if num_classes is not None else y.max() + 1)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"dirichlet_split: labels must lie in [0, {k}); got range [{y.min()}, {y.max()}]")
    rng = np.random.default_rng(seed)
    priors = rng.dirichlet([beta] * k, size=num_clients)  # (M, K)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in range(k)]
    left = np.array([len(p) > 0 for p in pools], dtype=np.float64)
    n = y.size
    remaining = np.full(num_clients, n // num_clients)
    remaining[: n % num_clients] += 1
    out: list[list[int]] = [[] for _ in range(num_clients)]
    open_clients = list(range(num_clients))
    while open_clients:
        slot = int(rng.integers(len(open_clients)))
        client = open_clients[slot]
        # redrawing while the class is empty = drawing from the prior restricted to non-empty classes
        p = priors[client] * left
        p = p if p.sum() > 0 else left  # the prior's mass is all on empty classes (underflow at tiny beta)
        cum = np.cumsum(p)
        c = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), k - 1)
        out[client].append(int(pools[c].pop()))
        if not pools[c]:
            left[c] = 0.0
        remaining[client] -= 1
        if remaining[client] == 0:
            open_clients.pop(slot)
    return [torch.tensor(sorted(ix), dtype=torch.long) for ix in out]


def class_counts(labels: Tensor, splits: Sequence[Tensor], num_classes: int) -> Tensor:
    """``(M, K)`` float counts: row ``k`` = how many samples of each class client ``k`` holds."""
    return torch.stack([torch.bincount(labels[ix], minlength=num_classes)[:num_classes] for ix in splits]).float()


def fedavg(models: Sequence[nn.Module], sizes: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg's aggregate (McMahan et al. 2017): ``theta = sum_k (n_k / sum_j n_j) theta_k``.

    Floating-point parameters and buffers are averaged; integer buffers (BatchNorm's
    ``num_batches_tracked``) are taken from the first model. Returns a state dict.
    """
    if len(models) == 0 or len(models) != len(sizes):
        raise ValueError(f"fedavg: need one size per model; got {len(models)} models and {len(sizes)} sizes")
    w = torch.as_tensor(list(sizes), dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"fedavg: sizes must be >= 0 with a positive sum; got {list(sizes)}")
    w = w / w.sum()
    states = [m.state_dict() for m in models]
    out: dict[str, Tensor] = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = sum(float(wk) * s[name].double() for wk, s in zip(w, states))
            out[name] = acc.to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def local_train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
                weight_decay: float = 1e-3, max_grad_norm: float = 10.0, seed: int = 0) -> nn.Module:
    """A client's update (FedFTG's code's ``train_model``): ``epochs`` passes of plain SGD (no
    momentum) on cross-entropy over shuffled mini-batches of ``(x (n, C, H, W), y (n,))``, the
    gradient norm clipped at ``max_grad_norm``. Trains ``model`` in place and returns it."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            ix = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[ix]), y[ix])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
    return model


# ----------------------------------------------------------------------------- FedFTG's terms


def class_client_weights(counts: Tensor) -> Tensor:
    """FedFTG's class-level ensemble weights ``alpha[c, k] = n_k^c / sum_j n_j^c``: ``(K, M)`` from
    counts ``(M, K)``; a class no client holds gets weight 0 everywhere."""
    per_class = counts.sum(0)  # (K,)
    return (counts / per_class.clamp_min(1e-12)).T * (per_class > 0).unsqueeze(1)


def sample_labels(counts: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """FedFTG's customised label sampling: ``n`` labels with class proportions ``sum_k n_k^c / N``
    (as the authors' ``generate_labels``: cut ``range(n)`` at ``floor(n * cumsum(p))``, then shuffle).
    ``counts``: ``(M, K)``. Returns int64 ``(n,)``."""
    p = counts.sum(0).double()
    p = p / p.sum()
    cuts = (torch.cumsum(p, 0) * n).floor().long()
    cuts[-1] = n
    labels = torch.bucketize(torch.arange(n), cuts, right=True)
    return labels[torch.randperm(n, generator=generator)]


def fedftg_diversity(z: Tensor, x: Tensor) -> Tensor:
    """FedFTG's diversity term (authors' ``DiversityLoss``, metric "l1"):

    ``L_div = exp(-(1/B^2) sum_{i,j} d_x(i, j) * d_z(i, j))`` with ``d_x(i, j) = mean |x_i - x_j|``
    over the image's entries and ``d_z(i, j) = mean (z_i - z_j)^2`` over the noise's entries.
    Small when samples far apart in noise are far apart as images. ``z``: ``(B, ...)``, ``x``: ``(B, ...)``.
    """
    x, z = x.flatten(1), z.flatten(1)
    dx = (x.unsqueeze(0) - x.unsqueeze(1)).abs().mean(2)
    dz = (z.unsqueeze(0) - z.unsqueeze(1)).pow(2).mean(2)
    return torch.exp(-(dx * dz).mean())


def fedftg_generator_loss(student_logits: Tensor, client_logits: Sequence[Tensor], labels: Tensor,
                          alpha_batch: Tensor, z: Tensor, images: Tensor, *, cls: float = 1.0,
                          div: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """The generator's objective (minimised), summed over clients ``k``:

    ``L_G = sum_k [ -(1/B) sum_i a_ik * mean_c |s_ic - t^k_ic|  +  cls * (1/B) sum_i a_ik * CE(t^k_i, y_i) ]
    + div * L_div``

    with ``a_ik = alpha[y_i, k]`` (:func:`class_client_weights`). The first term is the hard-sample
    mining (the generator *raises* the student-client L1 logit gap, as DFAD), the second the
    fidelity (client ``k`` classifies ``x_i`` as its sampled label ``y_i``, weighted by how much of
    class ``y_i`` it holds), the last :func:`fedftg_diversity`.

    Departures from the authors' code: their code steps the generator once per client with
    ``L_div / M`` each, which sums to the single step here; their fidelity term multiplies the
    *batch-mean* CE by the *mean* weight, ``mean_i(CE) * mean_i(a_ik)``, where we weight each
    sample's CE by its own ``a_ik`` (the class-level ensemble the paper describes).

    Args:
        student_logits: global model's logits ``(B, K)`` (the generator's gradient flows through them).
        client_logits: ``M`` tensors ``(B, K)``, each client model's logits on the same images.
        labels: sampled labels ``(B,)``.
        alpha_batch: ``(B, M)`` weights ``a_ik``.
        z: the noise ``(B, latent)``; images: ``(B, C, H, W)``.
    Returns: ``(loss, parts)`` with ``parts`` = floats of "md", "cls", "div".
    """
    md = student_logits.new_zeros(())
    fid = student_logits.new_zeros(())
    for k, t in enumerate(client_logits):
        a = alpha_batch[:, k]
        md = md + (a * (student_logits - t).abs().mean(1)).mean()
        fid = fid + (a * F.cross_entropy(t, labels, reduction="none")).mean()
    dv = fedftg_diversity(z, images)
    loss = -md + cls * fid + div * dv
    return loss, {"md": float(md.detach()), "cls": float(fid.detach()), "div": float(dv.detach())}


def ensemble_soft_targets(client_logits: Sequence[Tensor], alpha_batch: Tensor) -> Tensor:
    """The class-level ensemble the global model learns from: ``q_i = sum_k a_ik softmax(t^k_i)``,
    ``(B, K)`` (rows sum to 1 when the label's class is held by some client)."""
    return sum(alpha_batch[:, k:k + 1] * F.softmax(t, dim=1) for k, t in enumerate(client_logits))


class ConditionalGenerator(nn.Module):
    """A label-conditioned generator: ``forward(z (B, d), y (B,)) = base(cat[z, onehot(y)])``.

    FedFTG's generator takes ``(z, onehot(y))``; ours feeds their concatenation to any
    unconditional generator whose ``latent_dim`` is ``d + num_classes`` (e.g. the zoo's
    ``dfad_generator``).
    """

    def __init__(self, base: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.base, self.num_classes = base, num_classes

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return self.base(torch.cat([z.flatten(1), F.one_hot(y, self.num_classes).to(z.dtype)], 1))


def fedftg_finetune(global_model: nn.Module, client_models: Sequence[nn.Module], counts: Tensor,
                    generator: ConditionalGenerator, *, iterations: int = 10, generator_steps: int = 1,
                    student_steps: int = 5, batch_size: int = 50, latent_dim: int = 100, lr_global: float = 0.01,
                    lr_generator: float = 0.01, weight_decay: float = 1e-3, cls: float = 1.0, div: float = 1.0,
                    seed: int = 0) -> dict[str, float]:
    """FedFTG's server step: fine-tune ``global_model`` in place from the clients' models alone.

    For each of ``iterations`` batches of labels (:func:`sample_labels`) and noise ``z``:
    ``generator_steps`` Adam steps of the generator on :func:`fedftg_generator_loss` (global
    model and clients frozen), then ``student_steps`` SGD steps of the global model on the batch-mean
    soft cross-entropy ``-(1/B) sum_i sum_c q_ic log softmax(s_i)_c`` towards
    :func:`ensemble_soft_targets` on the same (detached) images. The client models stay in eval
    mode and are never changed; nothing here reads client data: only ``counts`` ``(M, K)``.

    Defaults from the authors' code (``train_global_model_cgan_bs_weight_iloop_fz_dis``): 10
    iterations, 1 generator and 5 global steps each, Adam for the generator, SGD (no momentum,
    weight decay) for the global model, generator lr 0.01. Their global loss is ``torch.mean`` over
    the ``(B, K)`` matrix, i.e. ours divided by ``K``, at lr 0.1: our default ``lr_global=0.01``
    is the same step for ``K = 10``.

    Returns the last iteration's generator-loss parts and ``"global"`` (the global model's loss).
    """
    if len(client_models) != counts.shape[0]:
        raise ValueError(f"fedftg_finetune: {len(client_models)} client models but counts has {counts.shape[0]} rows")
    g = torch.Generator().manual_seed(seed)
    alpha = class_client_weights(counts)  # (K, M)
    labels_all = sample_labels(counts, iterations * batch_size, g)
    for m in client_models:
        m.eval()
        m.requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_generator)
    opt_s = torch.optim.SGD(global_model.parameters(), lr=lr_global, weight_decay=weight_decay)
    parts: dict[str, float] = {}
    for it in range(iterations):
        y = labels_all[it * batch_size:(it + 1) * batch_size]
        a = alpha[y]  # (B, M)
        z = torch.randn(len(y), latent_dim, generator=g)
        global_model.eval()
        generator.train()
        for _ in range(generator_steps):
            x = generator(z, y)
            loss, parts = fedftg_generator_loss(global_model(x), [m(x) for m in client_models], y, a, z, x,
                                                cls=cls, div=div)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        global_model.zero_grad(set_to_none=True)  # the generator's step left gradients on it
        global_model.train()
        generator.eval()
        with torch.no_grad():
            x = generator(z, y)
            q = ensemble_soft_targets([m(x) for m in client_models], a)
        for _ in range(student_steps):
            loss_s = -(q * F.log_softmax(global_model(x), 1)).sum(1).mean()
            opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            opt_s.step()
        parts["global"] = float(loss_s.detach())
    global_model.eval()
    return parts
