"""Masked-image-modelling distillation: FD, SdAE and DMJD pre-training, then a probe or fine-tuning.

* :func:`fd` (Wei et al. 2022, arXiv 2205.14141): the student regresses a frozen teacher's whitened
  output features (method :class:`~distill.methods.mim.FD`, one :func:`distill.fit`), then is
  fine-tuned with labels.
* :func:`sdae` (Chen et al., ECCV 2022, arXiv 2208.00449): a ViT encoder sees the visible tokens, a
  decoder predicts, at the masked tokens, the features that an EMA copy of the encoder (the teacher
  branch) gives them when it sees only those masked tokens, fold by fold; no labels.
* :func:`dmjd` (Ma et al. 2022, arXiv 2301.00230): several masked views per image whose visible
  sets are disjoint; a decoder reconstructs the masked tokens' targets (HOG, or pixels) and a
  visible branch regresses the visible tokens' targets; no labels.

Each returns a :class:`MIMResult`: the pre-trained ``encoder`` (the student model itself, trained
in place), the pre-training history, and, when asked (``probe_epochs``, ``finetune_epochs``), the
linear-probe accuracy (:func:`distill.train.probe.linear_probe`) and the fine-tuning result
(:func:`distill.train.probe.finetune`), whose accuracies fill ``last_acc`` / ``best_acc``.
The encoders are ViTs laid out as the zoo's (:class:`~distill.models.vit.ViT` and its subclasses:
``embed``, ``blocks``, ``norm``, ``num_prefix_tokens``) or as timm's ``VisionTransformer``
(``patch_embed`` + ``_pos_embed`` instead of ``embed``; :func:`vit_embed` reads either).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import as_batch
from distill.distiller import Distiller
from distill.methods.mim import FD, FD_PAPER
from distill.methods.base import Paper
from distill.models.vit import Block, num_prefix_tokens, patch_grid
from distill.strategies.registry import as_model, register_strategy
from distill.train.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from distill.train.distributed import dist_info
from distill.train.loop import FitProgress, FitResult, fit
from distill.train.probe import finetune, linear_probe
from distill.train.rundir import open_run_dir

__all__ = ["MIMResult", "MaskedDecoder", "encode_visible", "ema_update_", "sincos_2d", "fd", "sdae", "dmjd"]

SDAE_PAPER = Paper(
    title="SdAE: Self-distillated Masked Autoencoder",
    authors="Y. Chen, Y. Liu, D. Jiang, X. Zhang, W. Dai, H. Xiong, Q. Tian",
    year=2022,
    arxiv="2208.00449",
    venue="ECCV",
)
DMJD_PAPER = Paper(
    title="Disjoint Masking with Joint Distillation for Efficient Masked Image Modeling",
    authors="X. Ma, C. Liu, C. Xie, L. Ye, Y. Deng, X. Ji",
    year=2022,
    arxiv="2301.00230",
    venue="arXiv (IEEE TMM 2023)",
)

# fit's settings that concern where and how a run executes rather than what it optimises: given to the
# pre-training stage too (the optimiser settings of the recipe's ``train`` are the fine-tuning's)
_RUN_KEYS = ("device", "amp", "deterministic", "grad_clip", "nan_check_every", "fingerprint", "overwrite", "resume")


@dataclass
class MIMResult(FitResult):
    """A pre-training strategy's result: ``encoder`` (the pre-trained student), ``pretrain_history``
    (one row per epoch: ``{"epoch", "pretrain_loss", "time_s"}``), ``probe`` (the linear probe's dict)
    ``finetuned`` (the fine-tuned copy) and, for SdAE, ``teacher`` (the EMA teacher branch). ``last_acc``/``best_acc``/``history`` are the
    fine-tuning's when it ran, else the probe's top-1 (both), else ``None``."""

    encoder: nn.Module | None = None
    teacher: nn.Module | None = None
    pretrain_history: list[dict[str, Any]] = field(default_factory=list)
    probe: dict[str, Any] | None = None
    finetuned: nn.Module | None = None


# ---------------------------------------------------------------------------------------- shared parts


def _check_vit(model: nn.Module, who: str) -> None:
    has_embed = hasattr(model, "embed") or (hasattr(model, "_pos_embed") and hasattr(model, "patch_embed"))
    missing = [a for a in ("blocks", "norm") if not hasattr(model, a)] + ([] if has_embed else ["embed"])
    if missing or patch_grid(model) is None:
        raise TypeError(f"{who}: the encoder must be a ViT laid out as the zoo's or timm's VisionTransformer (embed or "
                        f"patch_embed + _pos_embed, blocks, norm, patch_embed.grid_size); {type(model).__name__} lacks "
                        f"{missing or ['patch_embed.grid_size']}")
    drop = getattr(model, "patch_drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise ValueError(f"{who}: the ViT drops patch tokens itself (timm's patch_drop_rate > 0); masked image "
                         "modelling chooses the visible tokens: build the model with patch_drop_rate=0")


def vit_embed(model: nn.Module, inputs: Tensor) -> Tensor:
    """Prefix + patch tokens with position embeddings, before the blocks, ``(B, P + L, D)``: the zoo
    ViT's ``embed``, or for timm's ``VisionTransformer`` ``norm_pre(_pos_embed(patch_embed(x)))``
    (what its ``forward_features`` does before the blocks; ``patch_drop`` is refused by :func:`_check_vit`)."""
    if hasattr(model, "embed"):
        return model.embed(inputs)
    x = model._pos_embed(model.patch_embed(inputs))
    norm_pre = getattr(model, "norm_pre", None)
    return norm_pre(x) if norm_pre is not None else x


def _patch_size(model: nn.Module) -> int:
    size = model.patch_embed.patch_size
    if isinstance(size, (tuple, list)):  # timm keeps (ph, pw)
        if len(set(size)) != 1:
            raise ValueError(f"dmjd needs square patches, got patch_size {tuple(size)}")
        size = size[0]
    return int(size)


def _int(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _num(name: str, value: Any, low: float, high: float | None = None, strict: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < low or (strict and value == low) or (high is not None and value > high):
        span = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be a number {span}, got {value!r}")
    return float(value)


def encode_visible(model: nn.Module, inputs: Tensor, keep: Tensor) -> Tensor:
    """Run a ViT (the zoo's or timm's) on the prefix tokens and the patch tokens ``keep`` only (MAE's encoder).

    ``inputs`` (B, C, H, W); ``keep`` (B, K) long patch positions (position embeddings are added
    before the selection, so each token keeps its place). A model with a shared relative position
    bias (:class:`~distill.models.vit_relpos.RelPosViT`) gets the bias rows and columns of the kept
    tokens. Returns the normed tokens ``(B, P + K, D)``, prefix first, patches in ``keep``'s order.
    """
    prefix = num_prefix_tokens(model)
    h = vit_embed(model, inputs)
    patches = torch.gather(h[:, prefix:], 1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    x = torch.cat([h[:, :prefix], patches], 1)
    bias = None
    rel = getattr(model, "rel_pos_bias", None)
    if rel is not None:
        pos = torch.cat([torch.arange(prefix, device=keep.device).expand(keep.shape[0], -1), keep + prefix], 1)
        full = rel()  # (heads, N, N)
        bias = full[:, pos[:, :, None], pos[:, None, :]].permute(1, 0, 2, 3).to(x.dtype)
    for block in model.blocks:
        x = block(x, bias) if bias is not None else block(x)
    return model.norm(x)


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings (MAE's decoder's): ``(h·w, dim)``, half the channels
    for the row, half for the column, each ``[sin(p ω_k), cos(p ω_k)]`` with ``ω_k = 10000^{-k/(dim/4)}``."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                            indexing="ij")
    parts = []
    for p in (ys.flatten(), xs.flatten()):
        angle = p[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1).float()


class MaskedDecoder(nn.Module):
    """MAE's decoder: encoder tokens -> ``dim``, a learned mask token at every hidden patch, fixed
    sine-cosine positions, ``depth`` transformer blocks, LayerNorm, a linear prediction ``out_dim``.

    ``forward(tokens (B, P + K, D_enc), keep (B, K))`` -> ``(B, L, out_dim)`` at every patch position
    (prefix tokens pass through the blocks and are dropped)."""

    def __init__(self, enc_dim: int, out_dim: int, grid: tuple[int, int], prefix: int, dim: int = 64,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.grid, self.prefix = grid, prefix
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_2d(dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        x = self.embed(tokens)
        b, d = x.shape[0], x.shape[-1]
        num = self.grid[0] * self.grid[1]
        full = self.mask_token.expand(b, num, d).clone()
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, d), x[:, self.prefix:])
        h = torch.cat([x[:, :self.prefix], full + self.pos], 1)
        for block in self.blocks:
            h = block(h)
        return self.pred(self.norm(h))[:, self.prefix:]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m θ_t + (1 - m) θ_s`` for every parameter (by name; buffers are copied). Names the
    teacher lacks (the decoder's) are refused."""
    mine = dict(teacher.named_parameters())
    theirs = dict(student.named_parameters())
    if mine.keys() != theirs.keys():
        raise ValueError(f"ema_update_: parameter names differ: {sorted(set(mine) ^ set(theirs))[:5]}")
    for name, p in mine.items():
        p.mul_(momentum).add_(theirs[name].detach(), alpha=1.0 - momentum)
    their_bufs = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        b.copy_(their_bufs[name])


def _keep_indices(mask: Tensor) -> Tensor:
    """``(B, L)`` bool mask with the same visible count per row -> visible positions ``(B, K)``, increasing."""
    k = int((~mask[0]).sum())
    return (~mask).nonzero()[:, 1].reshape(mask.shape[0], k)


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a half-cosine to 0 (MAE's per-step schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def _pretrain(modules: list[nn.Module], loss_fn: Callable[[Tensor, torch.Generator], Tensor],
              loader: Iterable[Any], *, epochs: int, lr: float, weight_decay: float, warmup_epochs: int,
              seed: int, progress: bool, device: torch.device | str | None,
              on_step: Callable[[int, int], None] | None = None,
              on_epoch: Callable[[int], None] | None = None, run_dir: str | Path | None = None,
              resume: bool = False, overwrite: bool = False,
              also_saved: list[nn.Module] | None = None) -> list[dict[str, Any]]:
    """The label-free loop: AdamW (β = 0.9, 0.95: MAE's and SdAE's), warm-up + cosine per step, a
    progress bar; ``loss_fn(inputs, generator)`` -> scalar. Returns one row per epoch.

    With ``run_dir``, each epoch ends with ``run_dir/checkpoints/last.pt`` (the trained modules and
    ``also_saved``'s — an EMA teacher —, the optimizer, the step, the masking generator's and the
    global random states, the history), written atomically; ``resume=True`` continues from it
    (the run folder rules of :func:`distill.train.rundir.open_run_dir`: a folder with results is
    never overwritten without ``overwrite``). A resumed run draws the same masks and reaches the
    same weights as an uninterrupted one (CPU)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    steps = len(loader)  # type: ignore[arg-type]
    if steps == 0:
        raise ValueError("the training loader yields no batch")
    total, warmup = epochs * steps, warmup_epochs * steps
    generator = torch.Generator().manual_seed(seed)
    saved = list(modules) + list(also_saved or [])
    folder = Path(run_dir) if run_dir is not None else None
    last = folder / "checkpoints" / "last.pt" if folder is not None else None
    if resume and folder is None:
        raise ValueError("resume=True needs run_dir, where the pre-training keeps its checkpoints")
    history: list[dict[str, Any]] = []
    step, start = 0, 0
    stack = ExitStack()
    bar: FitProgress | None = None
    try:
        open_run_dir(folder, resume=resume, overwrite=overwrite, info=dist_info(), stack=stack, what="pre-training")
        if resume and last is not None and last.is_file():
            state = load_checkpoint(last)
            if len(state["modules"]) != len(saved):
                raise CheckpointError(f"{str(last)!r} holds {len(state['modules'])} modules, this run trains "
                                      f"{len(saved)}")
            for module, module_state in zip(saved, state["modules"], strict=True):
                module.load_state_dict(module_state)
            opt.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            set_rng_state(state["rng"])
            step, start, history = int(state["step"]), int(state["epoch"]) + 1, list(state["history"])
        bar = FitProgress(progress, epochs, steps)
        for epoch in range(start, epochs):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for m in modules:
                m.train()
            bar.start_epoch(epoch)
            t0, seen, running = time.perf_counter(), 0, 0.0
            for raw in loader:
                x = as_batch(raw).inputs
                if device is not None:
                    x = x.to(device)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, warmup, lr)
                loss = loss_fn(x, generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"pre-training loss became {float(loss)} at epoch {epoch}, step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if on_step is not None:
                    on_step(step, total)
                running += float(loss.detach()) * x.shape[0]
                seen += x.shape[0]
                bar.advance(float(loss.detach()) if bar.wants_loss(step) else None)
            if on_epoch is not None:
                on_epoch(epoch)
            history.append({"epoch": epoch, "pretrain_loss": running / max(seen, 1),
                            "time_s": time.perf_counter() - t0})
            if last is not None:
                save_checkpoint(last, {"epoch": epoch, "step": step, "modules": [m.state_dict() for m in saved],
                                       "optimizer": opt.state_dict(), "generator": generator.get_state(),
                                       "rng": rng_state(), "history": history})
    finally:
        if bar is not None:
            bar.close()
        stack.close()
    return history


def _evaluate(model: nn.Module, pretrain_history: list[dict[str, Any]], train_loader: Iterable[Any],
              val_loader: Iterable[Any] | None, *, probe_epochs: int, finetune_epochs: int, run_dir: str | None,
              seed: int, progress: bool, t0: float, fit_kwargs: dict[str, Any]) -> MIMResult:
    result = MIMResult(history=list(pretrain_history), encoder=model, pretrain_history=pretrain_history)
    if (probe_epochs or finetune_epochs) and val_loader is None:
        raise ValueError("probe_epochs / finetune_epochs need a val_loader to measure on")
    device = fit_kwargs.get("device")
    if probe_epochs:
        result.probe = linear_probe(model, train_loader, val_loader, features="head:input",  # type: ignore[arg-type]
                                    epochs=probe_epochs, seed=seed, device=device, progress=progress)
        result.last_acc = result.best_acc = result.probe["top1"]
        result.history.append({"epoch": len(pretrain_history), "probe_top1": result.probe["top1"]})
    if finetune_epochs:
        kwargs = dict(fit_kwargs)  # resume / overwrite apply to the fine-tuning's own folder too
        lr = kwargs.pop("lr", 1e-3)
        out = finetune(model, int(getattr(model, "num_classes", 0)) or _classes(train_loader), train_loader,
                       val_loader, epochs=finetune_epochs, lr=lr, seed=seed, progress=progress,
                       run_dir=str(Path(run_dir) / "finetune") if run_dir is not None else None, **kwargs)
        result.finetuned = out.model
        result.last_acc, result.best_acc, result.best_epoch = out.last_acc, out.best_acc, out.best_epoch
        result.history += [{**row, "stage": "finetune"} for row in out.history]
    result.time_s = time.perf_counter() - t0
    result.run_dir = Path(run_dir) if run_dir is not None else None
    return result


def _pretrain_run_dir(run_dir: str | None, fit_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The pre-training's folder (``run_dir/pretrain``, as FD's ``fit``) and the run's resume / overwrite."""
    return {"run_dir": Path(run_dir) / "pretrain" if run_dir is not None else None,
            "resume": bool(fit_kwargs.get("resume")), "overwrite": bool(fit_kwargs.get("overwrite"))}


def _classes(loader: Iterable[Any]) -> int:
    targets = getattr(loader, "targets", None)
    if isinstance(targets, Tensor) and targets.numel():
        return int(targets.max()) + 1
    raise ValueError("finetune needs the number of classes: give a model with num_classes or a loader with targets")


def _common_checks(epochs: Any, probe_epochs: Any, finetune_epochs: Any, fit_kwargs: dict[str, Any]) -> None:
    _int("epochs", epochs, 1)
    _int("probe_epochs", probe_epochs)
    _int("finetune_epochs", finetune_epochs)
    if fit_kwargs.get("resume") not in (None, False, True):
        raise ValueError(f"resume must be True or False (each stage resumes from its own folder under run_dir), "
                         f"got {fit_kwargs['resume']!r}")


# ---------------------------------------------------------------------------------------- FD


@register_strategy("fd", "self-supervised", FD_PAPER)
def fd(student: Any, train_loader: Iterable[Any], val_loader: Iterable[Any] | None = None, *,
       teacher: nn.Module | None = None,
       epochs: int, run_dir: str | None = None, seed: int = 0, progress: bool = True, student_tap: str = "norm",
       teacher_tap: str = "norm", beta: float = 2.0, pretrain_lr: float = 1e-3, pretrain_weight_decay: float = 0.05,
       probe_epochs: int = 0, finetune_epochs: int = 0, **fit_kwargs: Any) -> MIMResult:
    """Feature distillation, then fine-tuning: the student regresses the frozen teacher's whitened features.

    Stage 1 (``epochs`` epochs, no labels used): :func:`distill.fit` of the student with the single
    loss :class:`~distill.methods.mim.FD` (``student_tap``, ``teacher_tap``, ``beta``), AdamW with
    ``pretrain_lr`` and ``pretrain_weight_decay`` (0.05: the authors' configs; their lr 3e-4 at batch
    128·8 is for ViT-B, ours 1e-3 for the tiny zoo ViTs) and a cosine schedule. Use the student
    ``vit_tiny_rpb`` for the paper's shared relative position bias and student-only drop path.
    Stage 2: a linear probe (``probe_epochs``) and/or fine-tuning (``finetune_epochs``, the recipe's
    optimiser settings in ``fit_kwargs``) on labels.
    """
    _common_checks(epochs, probe_epochs, finetune_epochs, fit_kwargs)
    if teacher is None:
        raise ValueError("fd needs a teacher (a trained model whose features the student regresses)")
    model = as_model(student, "fd")
    t0 = time.perf_counter()
    distiller = Distiller(model, teacher, {"fd": FD(student_tap=student_tap, teacher_tap=teacher_tap, beta=beta)})
    run_kwargs = {k: fit_kwargs[k] for k in _RUN_KEYS if k in fit_kwargs}
    pre = fit(distiller, train_loader, None, epochs=epochs, optimizer="adamw", lr=pretrain_lr,
              weight_decay=pretrain_weight_decay, schedule="cosine", seed=seed, progress=progress,
              run_dir=str(Path(run_dir) / "pretrain") if run_dir is not None else None, **run_kwargs)
    rows = [{"epoch": r["epoch"], "pretrain_loss": r.get("train_fd", r.get("train_loss")), **r} for r in pre.history]
    return _evaluate(model, rows, train_loader, val_loader, probe_epochs=probe_epochs,
                     finetune_epochs=finetune_epochs, run_dir=run_dir, seed=seed, progress=progress, t0=t0,
                     fit_kwargs=fit_kwargs)


# ---------------------------------------------------------------------------------------- SdAE


@register_strategy("sdae", "self-supervised", SDAE_PAPER)
def sdae(student: Any, train_loader: Iterable[Any], val_loader: Iterable[Any] | None = None, *, epochs: int,
         run_dir: str | None = None, seed: int = 0, progress: bool = True, mask_ratio: float = 0.75,
         folds: int = 3, ema_momentum: float = 0.96, ema_momentum_final: float = 0.99, ema_every: str = "epoch",
         decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4, pretrain_lr: float = 1e-3,
         pretrain_weight_decay: float = 0.05, warmup_epochs: int = 0, probe_epochs: int = 0,
         finetune_epochs: int = 0, **fit_kwargs: Any) -> MIMResult:
    r"""SdAE pre-training: the student branch reconstructs the EMA teacher branch's masked-token features.

    Each step: a random mask hides ``mask_ratio`` of the patch tokens (:func:`~distill.functional.random_token_mask`);
    the encoder (the student ViT) sees the prefix and the visible tokens; the decoder
    (:class:`MaskedDecoder`, mask tokens at the hidden positions) predicts an encoder-width feature at
    every position. The teacher, an exponential moving average of the encoder, sees the *masked*
    tokens only, cut into ``folds`` disjoint folds (:func:`~distill.functional.mask_folds`), each fold
    a separate sequence with the class token (multi-fold masking: every fold carries a balanced, small
    share of the image). Its output at a masked token, centred and scaled, is the target:
    :math:`L = 1 - \overline{\cos}(\text{pred}, \text{target})` over the masked tokens
    (:func:`~distill.functional.sdae_loss`). The teacher moves as
    :math:`θ_t ← m θ_t + (1 - m) θ_s` (:func:`ema_update_`), ``m`` rising from ``ema_momentum`` to
    ``ema_momentum_final`` on a cosine (:func:`~distill.functional.cosine_momentum`), once per epoch
    (``ema_every="epoch"``) or per step (``"step"``).

    Defaults from the authors' code and README (github.com/AbrahamYabo/SdAE; the paper's sections
    could not be read here, only its abstract): mask ratio 0.75, 3 folds (``--ncrop_loss 3`` over all
    masked tokens, ``--shrink_num 147`` = 0.75·196), momentum 0.96 -> 0.99 per epoch, AdamW β = (0.9,
    0.95), weight decay 0.05, loss ``1 - cos`` against the normalised teacher output. Ours: the
    decoder (64 wide, 2 blocks; theirs 512 x 8 for ViT-B), ``pretrain_lr`` 1e-3 (theirs 2.67e-4 ·
    batch/256), no drop path (theirs 0.25), no warm-up by default (theirs 60 epochs of 300).
    With few epochs use ``ema_every="step"`` and a momentum near 0.99-0.999: a per-epoch EMA at 0.96
    leaves the teacher near its starting weights.

    Returns a :class:`MIMResult` (``encoder`` = the student, trained in place).
    """
    _common_checks(epochs, probe_epochs, finetune_epochs, fit_kwargs)
    DF.random_token_mask(1, 4, mask_ratio)  # checks the ratio before any work
    _int("folds", folds, 1)
    _num("ema_momentum", ema_momentum, 0.0, 1.0)
    _num("ema_momentum_final", ema_momentum_final, 0.0, 1.0)
    if ema_every not in ("epoch", "step"):
        raise ValueError(f"ema_every must be 'epoch' or 'step', got {ema_every!r}")
    _num("pretrain_lr", pretrain_lr, 0.0, strict=True)
    model = as_model(student, "sdae")
    _check_vit(model, "sdae")
    device = fit_kwargs.get("device")
    if device is not None:
        model.to(device)
    grid, prefix = patch_grid(model), num_prefix_tokens(model)
    assert grid is not None
    num = grid[0] * grid[1]
    masked = num - int(num * (1 - mask_ratio))
    if masked // folds < 1:
        raise ValueError(f"sdae: {masked} masked tokens of {num} cannot fill {folds} folds")
    width = int(getattr(model, "embed_dim", model.norm.normalized_shape[0]))
    ref = next(model.parameters())
    decoder = MaskedDecoder(width, width, grid, prefix, decoder_dim, decoder_depth, decoder_heads).to(ref.device)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    t0 = time.perf_counter()

    def loss_fn(x: Tensor, g: torch.Generator) -> Tensor:
        mask = DF.random_token_mask(x.shape[0], num, mask_ratio, generator=g, device=x.device)
        keep = _keep_indices(mask)
        pred = decoder(encode_visible(model, x, keep), keep)  # (B, L, D)
        idx = DF.mask_folds(mask, folds, generator=g)  # (B, F, m)
        b, f, m = idx.shape
        with torch.no_grad():
            teacher.eval()
            out = encode_visible(teacher, x.repeat_interleave(f, 0), idx.reshape(b * f, m))[:, prefix:]
            target = out.reshape(b, f, m, -1)
        chosen = torch.gather(pred, 1, idx.reshape(b, f * m, 1).expand(-1, -1, pred.shape[-1]))
        return DF.sdae_loss(chosen.reshape(b, f, m, -1), target)

    def on_step(step: int, total: int) -> None:
        if ema_every == "step":
            ema_update_(teacher, model, DF.cosine_momentum(step - 1, total, ema_momentum, ema_momentum_final))

    def on_epoch(epoch: int) -> None:
        if ema_every == "epoch":
            ema_update_(teacher, model, DF.cosine_momentum(epoch, epochs, ema_momentum, ema_momentum_final))

    rows = _pretrain([model, decoder], loss_fn, train_loader, epochs=epochs, lr=pretrain_lr,
                     weight_decay=pretrain_weight_decay, warmup_epochs=warmup_epochs, seed=seed, progress=progress,
                     device=device, on_step=on_step, on_epoch=on_epoch, also_saved=[teacher],
                     **_pretrain_run_dir(run_dir, fit_kwargs))
    result = _evaluate(model, rows, train_loader, val_loader, probe_epochs=probe_epochs,
                       finetune_epochs=finetune_epochs, run_dir=run_dir, seed=seed, progress=progress, t0=t0,
                       fit_kwargs=fit_kwargs)
    result.teacher = teacher
    return result


# ---------------------------------------------------------------------------------------- DMJD


def _dmjd_targets(kind: str, patch: int, cell: int, bins: int) -> Callable[[Tensor], Tensor]:
    if kind == "hog":
        return lambda x: DF.hog_patch_targets(x, patch, cell, bins)
    if kind == "pixels":
        return lambda x: DF.pixel_patch_targets(x, patch)
    raise ValueError(f"target must be 'hog' or 'pixels', got {kind!r}")


@register_strategy("dmjd", "self-supervised", DMJD_PAPER)
def dmjd(student: Any, train_loader: Iterable[Any], val_loader: Iterable[Any] | None = None, *, epochs: int,
         run_dir: str | None = None, seed: int = 0, progress: bool = True, mask_ratio: float = 0.6, views: int = 2,
         block: int = 2, target: str = "hog", hog_bins: int = 9, hog_cell: int | None = None, theta: float = 1.0,
         beta: float = 2.0, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4,
         pretrain_lr: float = 1e-3, pretrain_weight_decay: float = 0.05, warmup_epochs: int = 0,
         probe_epochs: int = 0, finetune_epochs: int = 0, **fit_kwargs: Any) -> MIMResult:
    r"""DMJD pre-training: disjoint masked views, joint invisible-reconstruction and visible distillation.

    Each image gives ``views`` masked views with disjoint visible sets
    (:func:`~distill.functional.disjoint_view_masks`: every view masks ``mask_ratio`` of the tokens, in
    ``block x block`` cells, and together the views leave no token unpredicted). The views form one
    batch of ``views · B``; the encoder sees each view's visible tokens. The invisible branch (a
    :class:`MaskedDecoder`) predicts the target at the masked tokens (squared error, mean over the
    masked tokens); the visible branch (an MLP on the encoder's visible tokens) regresses the target
    of the visible tokens (smooth-L1, β), weighted θ (:func:`~distill.functional.dmjd_loss`).

    Targets: ``"hog"`` (default, the authors' ``--pred_type hog``): per-cell HOG histograms whitened
    per cell and channel (:func:`~distill.functional.hog_patch_targets`; ``hog_cell`` defaults to
    ``patch/2``: 2x2 cells per token as the authors' 8-pixel cells in 16-pixel patches); ``"pixels"``:
    per-patch standardised pixels (MAE's target).

    Defaults from the authors' code (github.com/mx-mark/DMJD, ``PRETRAIN.md`` and
    ``models_dmjd.py``; the paper's sections could not be read here, only its abstract): 2 views,
    mask ratio 0.6, block masking with 2x2 blocks (``--mask_type block``; a 7x7 patch grid needs
    ``block=1``, random masking), HOG target, squared error on masked tokens, smooth-L1 β = 2 on
    visible ones, θ = 1, AdamW weight decay 0.05. Ours: the ViT encoder (theirs a ConViT with masked
    convolutions), the decoder size (theirs 512 x 8), the visible branch's MLP width, ``pretrain_lr``.
    """
    _common_checks(epochs, probe_epochs, finetune_epochs, fit_kwargs)
    _num("theta", theta, 0.0)
    _num("beta", beta, 0.0, strict=True)
    _num("pretrain_lr", pretrain_lr, 0.0, strict=True)
    model = as_model(student, "dmjd")
    _check_vit(model, "dmjd")
    grid, prefix = patch_grid(model), num_prefix_tokens(model)
    assert grid is not None
    DF.disjoint_view_masks(1, grid, mask_ratio, views, block)  # checks ratio, views and block before any work
    patch = _patch_size(model)
    cell = hog_cell if hog_cell is not None else max(patch // 2, 1)
    make_target = _dmjd_targets(target, patch, cell, hog_bins)
    device = fit_kwargs.get("device")
    if device is not None:
        model.to(device)
    width = int(getattr(model, "embed_dim", model.norm.normalized_shape[0]))
    example = as_batch(next(iter(train_loader))).inputs[:1]
    out_dim = make_target(example).shape[-1]
    ref = next(model.parameters())
    decoder = MaskedDecoder(width, out_dim, grid, prefix, decoder_dim, decoder_depth, decoder_heads).to(ref.device)
    visible_head = nn.Sequential(nn.Linear(width, decoder_dim), nn.GELU(), nn.Linear(decoder_dim, out_dim)).to(ref.device)
    num = grid[0] * grid[1]
    t0 = time.perf_counter()

    def loss_fn(x: Tensor, g: torch.Generator) -> Tensor:
        masks = DF.disjoint_view_masks(x.shape[0], grid, mask_ratio, views, block, generator=g, device=x.device)
        mask = masks.reshape(views * x.shape[0], num)
        xs = x.repeat(views, 1, 1, 1)  # view v of image b is row v·B + b, as the masks
        keep = _keep_indices(mask)
        latent = encode_visible(model, xs, keep)
        with torch.no_grad():
            y = make_target(x).repeat(views, 1, 1)
        return DF.dmjd_loss(decoder(latent, keep), visible_head(latent[:, prefix:]), y, mask, theta, beta)

    rows = _pretrain([model, decoder, visible_head], loss_fn, train_loader, epochs=epochs, lr=pretrain_lr,
                     weight_decay=pretrain_weight_decay, warmup_epochs=warmup_epochs, seed=seed, progress=progress,
                     device=device, **_pretrain_run_dir(run_dir, fit_kwargs))
    return _evaluate(model, rows, train_loader, val_loader, probe_epochs=probe_epochs,
                     finetune_epochs=finetune_epochs, run_dir=run_dir, seed=seed, progress=progress, t0=t0,
                     fit_kwargs=fit_kwargs)
