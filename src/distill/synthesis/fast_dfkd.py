"""The meta-learned synthesizer of Fast DFKD (the generator side; the student loop is the strategy
``fast_dfkd`` in :mod:`distill.strategies.data_free_fast`).

Paper: G. Fang, K. Mo, X. Wang, J. Song, S. Bei, H. Zhang, M. Song, "Up to 100x Faster Data-free
Knowledge Distillation", AAAI 2022, arXiv 2112.06253. Instead of optimising every synthetic batch
from scratch, a *meta generator* ``G_theta`` learns the features that all batches share (feature
reuse): each synthesis task starts from a copy ``theta' = theta`` and a fresh latent ``z``, takes a
few (``g_steps``) Adam steps on the inversion loss

    L(x) = bn * R_bn^mmt(x~) + oh * CE(f_T(x~), y) + adv * L_adv(x~),   x = G_theta'(z)

and then moves the meta initialisation (outer loop, first-order):

* ``meta="reptile"``: ``grad theta = theta - theta'`` (Reptile), one Adam step;
* ``meta="fomaml"``: ``grad theta = sum over the inner steps of dL/dtheta'`` (first-order MAML;
  the authors' scripts run this, ``--is_maml 1``).

``R_bn^mmt`` is DeepInversion's BN distance against a momentum blend of the batch statistics
(the paper's "momentum-based" BN regulariser): per BN layer
``||(1-m) mu(x) + m mu_ema - running_mean||_2 + ||(1-m) var(x) + m var_ema - running_var||_2``, where
``(mu_ema, var_ema)`` is an EMA (momentum ``m``) of the statistics of the previous syntheses' last
step (plain matching for the first synthesis). ``L_adv = -mean_b [1(argmax p_S = argmax p_T)_b *
KL(p_T,b || p_S,b)]`` seeks samples on which the student still disagrees in distribution but
agrees in decision. ``x~`` is ``x`` after a random roll by up to ``jitter`` pixels (and a flip
when ``flip``); the lowest-loss inner iterate of each task is kept, as the authors' code does.

Only the abstract of the paper could be read here; the loss terms and defaults follow the authors'
code (github.com/zju-vipa/Fast-Datafree: ``datafree/synthesis/fast_meta.py``, ``datafree/hooks.py``,
``scripts/fast_cifar.sh``, "Fast-2": ``g_steps 2``, ``lr_g 5e-3``, ``lr_z 0.015``, ``bn 10``,
``oh 0.5``, ``adv 1.33``, ``bn_mmt 0.9``, meta Adam at ``lr_g * g_steps`` with betas (0.5, 0.999)).
Departures: the code's Reptile gradient is multiplied by 67 (we use the plain difference); the
code's random crop (pad 4) + horizontal flip augmentation is replaced by
:func:`~distill.synthesis.priors.jitter_flip` (flip off by default: digits are not mirror-symmetric);
the code's re-initialisation of the generator's first layer after 120 epochs is not done.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.synthesis.priors import jitter_flip

__all__ = ["META_RULES", "FastMetaSynthesizer", "MomentumBNStatistics", "SynthesisStep", "adversarial_kl"]

META_RULES = ("reptile", "fomaml")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class MomentumBNStatistics:
    """BN-statistics distance against a momentum blend of the batch statistics (module docstring).

    ``loss()`` after a forward pass (scalar); ``update()`` folds the last pass's statistics into
    the EMA; ``remove()`` drops the hooks. ``momentum=0`` is DeepInversion's plain ``R_feature``.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.9) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, _BN) and m.running_mean is not None]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics: "
                             "Fast DFKD's BN regulariser needs them")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
        self.momentum = float(momentum)
        self.batch: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self.ema: list[tuple[Tensor, Tensor]] | None = None
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0]
            dims = [0, *range(2, x.dim())]
            self.batch[i] = (x.mean(dims), x.var(dims, correction=0))
        return hook

    def loss(self) -> Tensor:
        total: Tensor | None = None
        m = self.momentum
        for i, (layer, stats) in enumerate(zip(self.layers, self.batch)):
            if stats is None:
                raise RuntimeError("MomentumBNStatistics.loss() before a forward pass")
            mean, var = stats
            if self.ema is not None:
                mean = (1 - m) * mean + m * self.ema[i][0]
                var = (1 - m) * var + m * self.ema[i][1]
            term = torch.linalg.vector_norm(mean - layer.running_mean) + torch.linalg.vector_norm(var - layer.running_var)
            total = term if total is None else total + term
        assert total is not None
        return total

    def update(self) -> None:
        """``ema <- m * ema + (1 - m) * last batch statistics`` (the first call copies them)."""
        last = [(s[0].detach(), s[1].detach()) for s in self.batch if s is not None]
        if len(last) != len(self.layers):
            raise RuntimeError("MomentumBNStatistics.update() before a forward pass")
        if self.ema is None:
            self.ema = last
        else:
            m = self.momentum
            self.ema = [(m * e[0] + (1 - m) * b[0], m * e[1] + (1 - m) * b[1]) for e, b in zip(self.ema, last)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def adversarial_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """``-mean_b [1(argmax s_b = argmax t_b) * KL(softmax(t_b) || softmax(s_b))]`` (scalar) for
    logits ``(B, K)``: Fast DFKD's adversarial term (authors' code, temperature 1)."""
    log_t = F.log_softmax(teacher_logits, dim=1)
    log_s = F.log_softmax(student_logits, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).to(kl.dtype)
    return -(kl * mask).mean()


@dataclass
class SynthesisStep:
    """One synthesis task's output: the kept images ``(B, C, H, W)`` (detached), their target classes
    ``(B,)``, and the task's loss at its first and its best inner step."""

    images: Tensor
    targets: Tensor
    loss_first: float
    loss_best: float


class FastMetaSynthesizer:
    """The meta generator and its per-task fast adaptation (module docstring).

    Args:
        teacher: the frozen BN teacher (kept in eval mode by the caller; never updated here).
        generator: the meta generator ``G_theta`` (``(B, latent_dim) -> (B, C, H, W)``), trained here.
        num_classes, latent_dim, batch_size: classes, ``z``'s width, images per task.
        g_steps, lr_g, lr_z: inner steps and their Adam learning rates (generator, latent).
        bn, oh, adv: the loss weights; ``bn_momentum``: ``m`` of ``R_bn^mmt``.
        meta: ``"reptile"`` or ``"fomaml"``; ``meta_lr``: the outer Adam's lr (default ``lr_g * g_steps``).
        jitter, flip: the augmentation before the teacher.
        seed: seeds the latents, targets and augmentation draws.
    """

    def __init__(self, teacher: nn.Module, generator: nn.Module, *, num_classes: int, latent_dim: int,
                 batch_size: int = 256, g_steps: int = 2, lr_g: float = 5e-3, lr_z: float = 0.015,
                 bn: float = 10.0, oh: float = 0.5, adv: float = 1.33, bn_momentum: float = 0.9,
                 meta: str = "reptile", meta_lr: float | None = None, jitter: int = 2, flip: bool = False,
                 seed: int = 0) -> None:
        if meta not in META_RULES:
            raise ValueError(f"meta must be one of {META_RULES}; got {meta!r}")
        for name, v in (("num_classes", num_classes), ("latent_dim", latent_dim), ("batch_size", batch_size),
                        ("g_steps", g_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        for name, v in (("lr_g", lr_g), ("lr_z", lr_z), ("bn", bn), ("oh", oh), ("adv", adv)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0; got {v!r}")
        self.teacher, self.generator = teacher, generator
        self.num_classes, self.latent_dim, self.batch_size = num_classes, latent_dim, batch_size
        self.g_steps, self.lr_g, self.lr_z = g_steps, float(lr_g), float(lr_z)
        self.bn_w, self.oh, self.adv = float(bn), float(oh), float(adv)
        self.meta, self.jitter, self.flip = meta, jitter, flip
        self.bn = MomentumBNStatistics(teacher, bn_momentum)
        self.meta_opt = torch.optim.Adam(generator.parameters(), lr=meta_lr if meta_lr is not None else lr_g * g_steps,
                                         betas=(0.5, 0.999))
        self.rng = torch.Generator().manual_seed(seed)
        self.last_fast: nn.Module | None = None

    def loss(self, x: Tensor, targets: Tensor, student: nn.Module | None) -> Tensor:
        """``bn R_bn^mmt + oh CE + adv L_adv`` of images ``x`` ``(B, C, H, W)`` (adv only with a student)."""
        x_j = jitter_flip(x, self.jitter, self.flip, self.rng) if (self.jitter or self.flip) else x
        t_out = self.teacher(x_j)
        loss = self.bn_w * self.bn.loss() + self.oh * F.cross_entropy(t_out, targets)
        if student is not None and self.adv > 0:
            loss = loss + self.adv * adversarial_kl(t_out, student(x_j))
        return loss

    def synthesize(self, student: nn.Module | None = None) -> SynthesisStep:
        """One task: copy the meta generator, adapt it and a fresh ``z`` for ``g_steps`` steps, keep the
        best iterate's images, update the meta generator and the BN momentum statistics.

        ``student`` (eval mode, not updated) enables the adversarial term; ``None`` during warm-up."""
        device = next(self.generator.parameters()).device
        z = torch.randn(self.batch_size, self.latent_dim, generator=self.rng).to(device).requires_grad_(True)
        targets = torch.randint(0, self.num_classes, (self.batch_size,), generator=self.rng).sort().values.to(device)
        fast = copy.deepcopy(self.generator).train()
        fast_params = list(fast.parameters())
        opt = torch.optim.Adam([{"params": fast_params}, {"params": [z], "lr": self.lr_z}], lr=self.lr_g,
                               betas=(0.5, 0.999))
        meta_grads = [torch.zeros_like(p) for p in fast_params]
        best, best_loss, first = None, float("inf"), 0.0
        for it in range(self.g_steps):
            x = fast(z)
            loss = self.loss(x, targets, student)
            grads = torch.autograd.grad(loss, [*fast_params, z])
            value = float(loss.detach())
            if it == 0:
                first = value
            if value < best_loss:
                best_loss, best = value, x.detach()
            for p, g in zip(fast_params, grads[:-1]):
                p.grad = g
            z.grad = grads[-1]
            if self.meta == "fomaml":
                for acc, g in zip(meta_grads, grads[:-1]):
                    acc.add_(g)
            opt.step()
        self.meta_opt.zero_grad(set_to_none=True)
        for p, fp, acc in zip(self.generator.parameters(), fast_params, meta_grads):
            p.grad = (p.detach() - fp.detach()) if self.meta == "reptile" else acc
        self.meta_opt.step()
        self.bn.update()
        self.last_fast = fast  # the adapted copy theta' of the last task (for inspection)
        assert best is not None
        return SynthesisStep(best.cpu(), targets.cpu(), first, best_loss)

    def close(self) -> None:
        """Remove the teacher hooks."""
        self.bn.remove()
