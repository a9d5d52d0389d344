"""R2L: distil a neural radiance field (NeRF) into a deep residual MLP neural light field (NeLF).

Paper: H. Wang, J. Ren, Z. Huang, K. Olszewski, M. Chai, Y. Fu, S. Tulyakov, "R2L: Distilling Neural
Radiance Field to Neural Light Field for Efficient Novel View Synthesis", ECCV 2022, arXiv 2203.17261
(code: github.com/snap-research/R2L).

A NeRF renders a pixel by querying its MLP at ``num_samples`` points along the ray and compositing them
(volume rendering); a light field maps the ray straight to its colour in one pass. R2L's finding: a deep
(88-layer) residual light field learns the scene well only with much more data than the real views, so a
trained NeRF teacher renders *pseudo-data*: images from many random new camera poses. The stages:

0. the teacher NeRF is trained on the real views (:func:`train_nerf`; skip it by passing a trained one);
1. the teacher renders ``pseudo_images`` views from random poses (:func:`make_pseudo_data`); the student
   (:class:`~distill.models.nerf.NeLF`) learns them with the MSE of :func:`~distill.functional.r2l_loss`;
2. the student is fine-tuned on the real views with the same loss (the README's "step 5").

Where each default comes from (the pages we could read of the paper give its abstract only: the 88 layers;
the rest is from the authors' code, ``main.py``/``option.py``/``utils/create_data.py`` and the README's
commands):

* pseudo poses (``create_data.py --create_data rand``): uniform random azimuth and elevation over the
  hemisphere the training cameras live on, at their radius, looking at the centre, the focal length scaled
  by ``U[1, 2)`` per image (``use_rand_focal``); ours draw the elevation over the training cameras' range.
  The README's count is 10,000 images (``--n_pose_kd 10000``); ours is CPU-sized;
* optimiser: Adam, lr 5e-4, a linear warm-up from 1e-4 over 200 steps (``--warmup_lr 0.0001,200``), then
  ``lr · 0.1^(step / 500k)``; we decay to ``final_lr_ratio · lr`` over the run instead (our runs are short);
* the ray representation samples are stratified in training (``perturb=1``) and at bin positions at test.
* the code's hard-ray mining (``--hard_ratio 0.2 --hard_mul 20``: the 20% rays of each batch with the largest
  error are kept in a pool and re-used, :class:`HardRayPool`) is available (``hard_ratio``) but off by default:
  we could not confirm it in the paper;
* the NeRF teacher's hierarchical (coarse-to-fine) sampling (NeRF, Mildenhall et al. ECCV 2020, arXiv
  2003.08934, Section 5.2) is an option of the teacher: ``NeRF(num_fine_samples=N_f)`` (see
  :func:`render_hierarchical`); off by default, so the teacher renders ``num_samples`` stratified samples only.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.data.lightfield import LightFieldViews, get_rays, pose_spherical
from distill.models.nerf import NeLF, NeRF, fine_uniforms, sample_depths, sample_pdf
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.registry import register_strategy
from distill.train.generative_eval import psnr

__all__ = [
    "HardRayPool",
    "R2LResult",
    "evaluate_views",
    "make_pseudo_data",
    "pseudo_poses",
    "r2l",
    "render_hierarchical",
    "render_image",
    "render_nerf_rays",
    "time_per_image",
    "train_nelf",
    "train_nerf",
]

PAPER = Paper(
    title="R2L: Distilling Neural Radiance Field to Neural Light Field for Efficient Novel View Synthesis",
    authors="H. Wang, J. Ren, Z. Huang, K. Olszewski, M. Chai, Y. Fu, S. Tulyakov",
    year=2022,
    arxiv="2203.17261",
    venue="ECCV",
)


# ------------------------------------------------------------------------------------------- rendering


def render_nerf_rays(teacher: NeRF, rays: Tensor, *, near: float, far: float, num_samples: int,
                     background: Tensor | None = None, perturb: bool = False,
                     generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Volume-render ``rays`` (N, 6) = (origin, direction) with ``num_samples`` samples each (stratified
    when ``perturb``): ``{"rgb": (N, 3), "acc": (N,), "depth": (N,), "weights": (N, S)}``. Differentiable;
    call under ``torch.no_grad()`` to only render. A teacher with a fine network (``NeRF(num_fine_samples=N_f)``)
    renders hierarchically (:func:`render_hierarchical`, ``num_samples`` coarse samples) and returns its keys."""
    if rays.dim() != 2 or rays.shape[-1] != 6:
        raise ValueError(f"rays must be (N, 6) = (origin, direction), got {tuple(rays.shape)}")
    fine = getattr(teacher, "fine", None)
    if fine is not None:
        return render_hierarchical(teacher, fine, rays, near=near, far=far, num_samples=num_samples,
                                   num_fine_samples=teacher.num_fine_samples, background=background,
                                   perturb=perturb, generator=generator)
    t = sample_depths(near, far, num_samples, rays.shape[0], perturb=perturb, generator=generator, device=rays.device)
    return _composite(teacher, rays, t, far, background)


def _composite(field: nn.Module, rays: Tensor, t: Tensor, far: float, background: Tensor | None) -> dict[str, Tensor]:
    """``field`` evaluated at the depths ``t`` (N, S) of ``rays`` (N, 6), volume-rendered
    (:func:`distill.functional.volume_render`; the last interval ends at ``far``)."""
    o, d = rays[:, :3], rays[:, 3:]
    rgb, sigma = field(o[:, None, :] + t[..., None] * d[:, None, :])
    return DF.volume_render(rgb, sigma, DF.interval_lengths(t, far, d.norm(dim=-1)), t, background)


def render_hierarchical(coarse: nn.Module, fine: nn.Module, rays: Tensor, *, near: float, far: float,
                        num_samples: int, num_fine_samples: int, background: Tensor | None = None,
                        perturb: bool = False, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """NeRF's hierarchical volume sampling (Mildenhall et al., "NeRF: Representing Scenes as Neural Radiance
    Fields for View Synthesis", ECCV 2020, arXiv 2003.08934, Section 5.2) of ``rays`` (N, 6).

    1. ``N_c = num_samples`` stratified depths ``t^c`` (N, N_c) (:func:`sample_depths`; bin centres unless
       ``perturb``); the ``coarse`` field composites them: weights ``w_i = T_i (1 - exp(-σ_i δ_i))`` (N, N_c).
    2. ``N_f = num_fine_samples`` depths ``t^f`` (N, N_f) from the piecewise-constant PDF ``ŵ_i = w_i / Σ_j w_j``
       by inverse transform sampling (:func:`~distill.models.nerf.sample_pdf`, uniforms from
       :func:`~distill.models.nerf.fine_uniforms`: random when ``perturb``, fixed quantiles otherwise). Bin
       ``i`` is ``[t^c_i, t^c_{i+1})`` (the last ends at ``far``): the interval ``δ_i`` that ``w_i`` is the
       termination probability of (nerf-pytorch's bins run between the samples' midpoints and drop the first
       and last weight). The weights are detached: no gradient flows through the sampling.
    3. The ``fine`` field composites all ``N_c + N_f`` depths, sorted, (N, N_c + N_f).

    Returns the fine rendering ``{"rgb": (N, 3), "acc": (N,), "depth": (N,), "weights": (N, N_c + N_f),
    "depths": (N, N_c + N_f)}`` and the coarse one under ``"rgb_coarse"``, ``"acc_coarse"``,
    ``"weights_coarse"`` (N, N_c), ``"depths_coarse"`` (N, N_c). NeRF trains both networks on the sum of the two
    renderings' squared errors (:func:`train_nerf` does); the fine rendering is the picture.
    """
    if rays.dim() != 2 or rays.shape[-1] != 6:
        raise ValueError(f"rays must be (N, 6) = (origin, direction), got {tuple(rays.shape)}")
    if num_fine_samples <= 0:
        raise ValueError(f"num_fine_samples must be > 0 for hierarchical sampling, got {num_fine_samples}")
    t_c = sample_depths(near, far, num_samples, rays.shape[0], perturb=perturb, generator=generator,
                        device=rays.device)
    out_c = _composite(coarse, rays, t_c, far, background)
    edges = torch.cat([t_c, torch.full_like(t_c[:, :1], far)], -1)  # (N, N_c + 1)
    u = fine_uniforms(rays.shape[0], num_fine_samples, perturb=perturb, generator=generator, device=rays.device)
    t_f = sample_pdf(edges, out_c["weights"].detach(), u)
    t_all = torch.sort(torch.cat([t_c, t_f], -1), -1).values
    out = _composite(fine, rays, t_all, far, background)
    out["depths"] = t_all
    out.update(rgb_coarse=out_c["rgb"], acc_coarse=out_c["acc"], weights_coarse=out_c["weights"], depths_coarse=t_c)
    return out


@torch.no_grad()
def _predict(model: nn.Module, rays: Tensor, *, near: float, far: float, num_samples: int,
             background: Tensor | None, chunk: int) -> Tensor:
    """Colours (N, 3) of ``rays`` (N, 6) by the teacher (volume rendering) or the student (one pass)."""
    out = []
    for i in range(0, rays.shape[0], chunk):
        r = rays[i:i + chunk]
        if isinstance(model, NeRF):
            out.append(render_nerf_rays(model, r, near=near, far=far, num_samples=num_samples,
                                        background=background)["rgb"])
        else:
            out.append(model(r))
    return torch.cat(out)


def render_image(model: nn.Module, pose: Tensor, H: int, W: int, focal: float, *, near: float, far: float,
                 num_samples: int = 64, background: Tensor | None = None, chunk: int = 8192) -> Tensor:
    """An image (H, W, 3) seen from ``pose`` (4, 4): volume rendering with ``num_samples`` samples per ray
    for a :class:`NeRF`, one forward pass per ray for a light field (any model mapping rays (N, 6) to colours
    (N, 3)). The model is put in eval mode (deterministic samples) and left there."""
    model.eval()
    o, d = get_rays(H, W, focal, pose)
    rays = torch.cat([o, d], -1).reshape(-1, 6).to(next(model.parameters()).device)
    rgb = _predict(model, rays, near=near, far=far, num_samples=num_samples, background=background, chunk=chunk)
    return rgb.reshape(H, W, 3).cpu()


def evaluate_views(model: nn.Module, views: LightFieldViews, *, num_samples: int = 64,
                   chunk: int = 8192) -> dict[str, Any]:
    """PSNR of ``model``'s renderings of ``views``: ``{"psnr": mean over images of the per-image PSNR (as
    NeRF and R2L report it), "psnrs": [...], "images": (V, H, W, 3)}``."""
    images = torch.stack([render_image(model, p, views.H, views.W, views.focal, near=views.near, far=views.far,
                                       num_samples=num_samples, background=views.background, chunk=chunk)
                          for p in views.poses])
    psnrs = [psnr(images[i], views.images[i]) for i in range(len(views))]
    return {"psnr": statistics.fmean(psnrs), "psnrs": psnrs, "images": images}


def time_per_image(model: nn.Module, views: LightFieldViews, *, num_samples: int = 64, reps: int = 3,
                   chunk: int = 8192) -> float:
    """Median wall-clock seconds to render one ``views.H``×``views.W`` image (after one warm-up render)."""
    pose = views.poses[0]
    args = dict(near=views.near, far=views.far, num_samples=num_samples, background=views.background, chunk=chunk)
    render_image(model, pose, views.H, views.W, views.focal, **args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        render_image(model, pose, views.H, views.W, views.focal, **args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------- training


def _check_steps(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _lr_at(step: int, steps: int, lr: float, final_lr_ratio: float, warmup_steps: int, warmup_lr: float) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then exponential decay to
    ``final_lr_ratio · lr`` at the last step."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    span = max(steps - warmup_steps, 1)
    return lr * final_lr_ratio ** ((step - warmup_steps) / span)


def train_nerf(teacher: NeRF, views: LightFieldViews, *, steps: int = 3000, batch_rays: int = 1024,
               num_samples: int = 64, lr: float = 5e-3, final_lr_ratio: float = 0.1, seed: int = 0,
               progress: bool = True) -> list[dict[str, float]]:
    """Train the teacher NeRF on the real views: random batches of ``batch_rays`` pixels over all views,
    stratified samples, MSE to the pixel colours (NeRF's photometric loss), Adam with ``lr`` decayed
    exponentially to ``final_lr_ratio · lr``. NeRF's are lr 5e-4 → 5e-5, 4096 rays, 64 + 128 samples; ours
    are CPU-sized. With a fine network (``NeRF(num_fine_samples=N_f)``) the rendering is hierarchical
    (:func:`render_hierarchical`, ``num_samples = N_c``) and the loss is the coarse plus the fine rendering's
    MSE (NeRF Section 5.2), so both networks learn. Returns the loss every 100 steps."""
    _check_steps(steps=steps, batch_rays=batch_rays, num_samples=num_samples)
    device = next(teacher.parameters()).device
    o, d, colors = views.rays()
    rays, colors = torch.cat([o, d], -1).to(device), colors.to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(teacher.parameters(), lr=lr)
    teacher.train()
    history: list[dict[str, float]] = []
    with StepProgress(progress, "R2L teacher NeRF", steps) as bar:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, final_lr_ratio, 0, lr)
            idx = torch.randint(0, rays.shape[0], (batch_rays,), generator=g).to(device)
            out = render_nerf_rays(teacher, rays[idx], near=views.near, far=views.far, num_samples=num_samples,
                                   background=views.background, perturb=True, generator=g)
            loss = ((out["rgb"] - colors[idx]) ** 2).mean()
            if "rgb_coarse" in out:  # hierarchical: NeRF's loss sums the coarse and the fine rendering's errors
                loss = loss + ((out["rgb_coarse"] - colors[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            if step % 100 == 0 or step == steps - 1:
                history.append({"step": step, "loss": value, "psnr": -10 * math.log10(max(value, 1e-12))})
            bar.advance(f"loss {value:.4f}")
    teacher.eval()
    return history


def _camera_ranges(views: LightFieldViews) -> tuple[float, float, float]:
    """(mean radius, min elevation, max elevation in degrees) of the views' camera centres."""
    centres = views.poses[:, :3, 3]
    radius = centres.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((centres[:, 2] / radius).clamp(-1, 1)))
    return float(radius.mean()), float(elevation.min()), float(elevation.max())


def pseudo_poses(views: LightFieldViews, num: int, *, seed: int = 0) -> Tensor:
    """``num`` random camera poses (num, 4, 4) for pseudo-data: uniform azimuth in [0, 360), uniform elevation
    over the range of ``views``' cameras, at their mean radius, looking at the origin (R2L's code samples the
    whole upper hemisphere its training cameras live on, at their radius 4)."""
    _check_steps(num=num)
    radius, lo, hi = _camera_ranges(views)
    lo, hi = max(lo, -89.0), min(hi, 89.0)
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(num, generator=g) * 360.0
    el = lo + (hi - lo) * torch.rand(num, generator=g)
    return torch.stack([pose_spherical(float(a), float(e), radius) for a, e in zip(az, el)]) if num \
        else torch.zeros(0, 4, 4)


@torch.no_grad()
def make_pseudo_data(teacher: NeRF, views: LightFieldViews, num_images: int, *, num_samples: int = 64,
                     focal_scale: tuple[float, float] = (1.0, 2.0), seed: int = 0, chunk: int = 8192,
                     progress: bool = True) -> tuple[Tensor, Tensor]:
    """R2L's pseudo-data: the teacher renders ``num_images`` ``views.H``×``views.W`` images from
    :func:`pseudo_poses`, each with the focal length ``views.focal`` scaled by ``U[focal_scale)`` (R2L's code:
    ``[1, 2)``; ``(1.0, 1.0)`` keeps it). Returns every pixel as ``(rays (M, 6), colors (M, 3))``,
    ``M = num_images · H · W``."""
    lo, hi = focal_scale
    if not 0 < lo <= hi:
        raise ValueError(f"focal_scale must be (lo, hi) with 0 < lo <= hi, got {focal_scale!r}")
    teacher.eval()
    device = next(teacher.parameters()).device
    poses = pseudo_poses(views, num_images, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    all_rays, all_colors = [], []
    with StepProgress(progress, "R2L pseudo-data", num_images) as bar:
        for pose in poses:
            focal = views.focal * (lo + (hi - lo) * float(torch.rand(1, generator=g)))
            o, d = get_rays(views.H, views.W, focal, pose)
            rays = torch.cat([o, d], -1).reshape(-1, 6).to(device)
            all_rays.append(rays.cpu())
            all_colors.append(_predict(teacher, rays, near=views.near, far=views.far, num_samples=num_samples,
                                       background=views.background, chunk=chunk).cpu())
            bar.advance()
    if not all_rays:
        return torch.zeros(0, 6), torch.zeros(0, 3)
    return torch.cat(all_rays), torch.cat(all_colors)


class HardRayPool:
    """R2L's code's hard-ray mining (``--hard_ratio``, ``--hard_mul``; the paper's pages we could read do not mention it): after each
    step the ``n = hard_ratio · batch`` rays of the fresh batch with the largest squared error enter a pool of
    ``hard_mul · batch`` rays; once the pool is full, every batch is extended by ``n`` rays drawn from it at
    random, and the next hard rays replace exactly those drawn."""

    def __init__(self, batch_rays: int, hard_ratio: float, hard_mul: float, generator: torch.Generator) -> None:
        if not 0.0 <= hard_ratio <= 1.0 or hard_mul < 1.0:
            raise ValueError(f"need 0 <= hard_ratio <= 1 and hard_mul >= 1, got {hard_ratio}, {hard_mul}")
        self.n, self.size, self.g = int(hard_ratio * batch_rays), int(hard_mul * batch_rays), generator
        self.rays: Tensor | None = None
        self.colors: Tensor | None = None
        self.full = False
        self._drawn: Tensor | None = None

    def draw(self) -> tuple[Tensor, Tensor] | None:
        """``n`` pooled rays (n, 6) and colours (n, 3) to append to the batch, or ``None`` before the pool is full."""
        if not (self.n and self.full):
            return None
        assert self.rays is not None and self.colors is not None
        self._drawn = torch.randperm(self.rays.shape[0], generator=self.g)[: self.n]
        return self.rays[self._drawn], self.colors[self._drawn]

    def add(self, rays: Tensor, colors: Tensor, errors: Tensor) -> None:
        """Keep the ``n`` rays of largest ``errors`` (B,) of the fresh batch ``rays`` (B, 6), ``colors`` (B, 3)."""
        if not self.n:
            return
        hard = errors.topk(min(self.n, errors.shape[0])).indices
        new_rays, new_colors = rays[hard].detach().cpu(), colors[hard].detach().cpu()
        if self.full and self._drawn is not None:
            assert self.rays is not None and self.colors is not None
            self.rays[self._drawn], self.colors[self._drawn] = new_rays, new_colors
        elif not self.full:
            self.rays = new_rays if self.rays is None else torch.cat([self.rays, new_rays])
            self.colors = new_colors if self.colors is None else torch.cat([self.colors, new_colors])
            self.full = self.rays.shape[0] >= self.size


def train_nelf(student: NeLF, rays: Tensor, colors: Tensor, *, steps: int, batch_rays: int = 1024,
               lr: float = 5e-4, final_lr_ratio: float = 0.1, warmup_steps: int = 200, warmup_lr: float = 1e-4,
               hard_ratio: float = 0.0, hard_mul: float = 20.0, seed: int = 0, progress: bool = True,
               desc: str = "R2L student") -> list[dict[str, float]]:
    """Train the light field on ``rays`` (M, 6) with target ``colors`` (M, 3): random batches of
    ``batch_rays`` rays, :func:`~distill.functional.r2l_loss` (MSE), Adam with R2L's warm-up (``warmup_lr``
    → ``lr`` over ``warmup_steps``) then exponential decay to ``final_lr_ratio · lr``. ``hard_ratio > 0``
    adds the authors' code's hard-ray mining (:class:`HardRayPool`; their commands use 0.2 and
    ``hard_mul=20``; off by default here). Returns the loss every 100 steps."""
    _check_steps(steps=steps, batch_rays=batch_rays, warmup_steps=warmup_steps)
    if rays.shape[0] != colors.shape[0] or rays.shape[-1] != 6 or colors.shape[-1] != 3:
        raise ValueError(f"rays must be (M, 6) and colors (M, 3), got {tuple(rays.shape)} and {tuple(colors.shape)}")
    if steps and rays.shape[0] == 0:
        raise ValueError("train_nelf got no rays to train on")
    device = next(student.parameters()).device
    g = torch.Generator().manual_seed(seed)
    pool = HardRayPool(batch_rays, hard_ratio, hard_mul, g)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    history: list[dict[str, float]] = []
    with StepProgress(progress, desc, steps) as bar:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, final_lr_ratio, warmup_steps, warmup_lr)
            idx = torch.randint(0, rays.shape[0], (batch_rays,), generator=g)
            batch_r, batch_c = rays[idx], colors[idx]
            extra = pool.draw()
            if extra is not None:
                batch_r, batch_c = torch.cat([batch_r, extra[0]]), torch.cat([batch_c, extra[1]])
            batch_r, batch_c = batch_r.to(device), batch_c.to(device)
            pred = student(batch_r)
            loss = DF.r2l_loss(pred, batch_c)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pool.add(batch_r[:batch_rays], batch_c[:batch_rays],
                     ((pred[:batch_rays].detach() - batch_c[:batch_rays]) ** 2).mean(-1))
            value = loss.item()
            if step % 100 == 0 or step == steps - 1:
                history.append({"step": step, "loss": value})
            bar.advance(f"loss {value:.4f}")
    student.eval()
    return history


# ------------------------------------------------------------------------------------------- the strategy


@dataclass
class R2LResult:
    """What :func:`r2l` returns: the trained ``student`` and ``teacher``, the training ``history`` per stage
    (``"teacher"``, ``"distill"``, ``"finetune"``), the number of pseudo rays, and, when test views were
    given, ``teacher_psnr`` / ``student_psnr`` (dB, mean per image), the seconds per image of each and
    ``speedup`` = teacher time ÷ student time, and the analytic ``macs_ratio`` = student MACs per ray ÷
    teacher MACs per ray (``num_samples`` MLP evaluations)."""

    student: NeLF
    teacher: NeRF
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    pseudo_rays: int = 0
    teacher_psnr: float | None = None
    student_psnr: float | None = None
    teacher_time_s: float | None = None
    student_time_s: float | None = None
    speedup: float | None = None
    macs_ratio: float | None = None


@register_strategy("r2l", "generative", PAPER)
def r2l(student: NeLF, train_views: LightFieldViews, test_views: LightFieldViews | None = None, *,
        teacher: NeRF, teacher_steps: int = 0, num_samples: int = 64, pseudo_images: int = 10000,
        focal_scale: tuple[float, float] = (1.0, 2.0), distill_steps: int = 1200000, finetune_steps: int = 400000,
        batch_rays: int = 1024, lr: float = 5e-4, final_lr_ratio: float = 0.1, warmup_steps: int = 200,
        warmup_lr: float = 1e-4, hard_ratio: float = 0.0, hard_mul: float = 20.0,
        teacher_kwargs: dict[str, Any] | None = None, seed: int = 0, progress: bool = True) -> R2LResult:
    """R2L: a NeRF teacher's renderings of random new views train a deep residual MLP light field, which is
    then fine-tuned on the real views.

    Args:
        student: the light field (:class:`~distill.models.nerf.NeLF`), its ``near``/``far`` those of the views.
        train_views: the real posed images (the teacher's training data and the fine-tuning data).
        test_views: held-out views for the PSNR and timing in the result (optional).
        teacher: the NeRF; trained here first for ``teacher_steps`` steps (``0``: it is already trained)
            with :func:`train_nerf` (``teacher_kwargs`` go to it: lr, batch_rays...).
        num_samples: the teacher's samples per ray when rendering pseudo-data and test views (the coarse
            samples ``N_c`` of a hierarchical teacher, ``NeRF(num_fine_samples=N_f)``).
        pseudo_images: how many pseudo views the teacher renders (R2L: 10,000).
        focal_scale: the range the pseudo views' focal length is scaled by (R2L's code: ``[1, 2)``).
        distill_steps, finetune_steps: steps on pseudo-data, then on the real views (R2L's README: 1.2M, and
            0.4M more; it warns fine-tuning overfits quickly).
        batch_rays, lr, final_lr_ratio, warmup_steps, warmup_lr: :func:`train_nelf`'s (R2L: Adam 5e-4 with a
            warm-up from 1e-4 over 200 steps; its batches are 20 × 4096 rays).
        hard_ratio, hard_mul: the code's hard-ray mining (:class:`HardRayPool`; its commands: 0.2 and 20);
            ``0``: off.
        seed: seeds the pseudo poses and the batches; progress: rich progress bars (``False``: silent).
    """
    if not isinstance(student, NeLF):
        raise TypeError(f"r2l: student must be a distill.models.nerf.NeLF, got {type(student).__name__}")
    if not isinstance(teacher, NeRF):
        raise TypeError(f"r2l: teacher must be a distill.models.nerf.NeRF, got {type(teacher).__name__}")
    if (student.near, student.far) != (train_views.near, train_views.far):
        raise ValueError(f"r2l: the student's near/far ({student.near}, {student.far}) differ from the views' "
                         f"({train_views.near}, {train_views.far})")
    _check_steps(teacher_steps=teacher_steps, pseudo_images=pseudo_images, distill_steps=distill_steps,
                 finetune_steps=finetune_steps, num_samples=num_samples)
    if distill_steps and not pseudo_images:
        raise ValueError("r2l: distill_steps > 0 needs pseudo_images > 0 (the pseudo-data it trains on)")
    history: dict[str, list[dict[str, float]]] = {}
    if teacher_steps:
        kwargs = {"num_samples": num_samples, **(teacher_kwargs or {})}
        history["teacher"] = train_nerf(teacher, train_views, steps=teacher_steps, seed=seed, progress=progress,
                                        **kwargs)
    teacher.eval().requires_grad_(False)
    nelf_kwargs = dict(batch_rays=batch_rays, lr=lr, final_lr_ratio=final_lr_ratio, warmup_steps=warmup_steps,
                       warmup_lr=warmup_lr, hard_ratio=hard_ratio, hard_mul=hard_mul, progress=progress)
    pseudo_count = 0
    if distill_steps:
        rays, colors = make_pseudo_data(teacher, train_views, pseudo_images, num_samples=num_samples,
                                        focal_scale=focal_scale, seed=seed, progress=progress)
        pseudo_count = rays.shape[0]
        history["distill"] = train_nelf(student, rays, colors, steps=distill_steps, seed=seed,
                                        desc="R2L student (pseudo-data)", **nelf_kwargs)
        del rays, colors
    if finetune_steps:
        o, d, colors = train_views.rays()
        history["finetune"] = train_nelf(student, torch.cat([o, d], -1), colors, steps=finetune_steps,
                                         seed=seed + 1, desc="R2L student (real views)", **nelf_kwargs)
    result = R2LResult(student=student, teacher=teacher, history=history, pseudo_rays=pseudo_count)
    if test_views is not None:
        result.teacher_psnr = evaluate_views(teacher, test_views, num_samples=num_samples)["psnr"]
        result.student_psnr = evaluate_views(student, test_views)["psnr"]
        result.teacher_time_s = time_per_image(teacher, test_views, num_samples=num_samples)
        result.student_time_s = time_per_image(student, test_views)
        result.speedup = result.teacher_time_s / result.student_time_s
        result.macs_ratio = student.macs_per_ray() / teacher.macs_per_ray(num_samples)
    return result
