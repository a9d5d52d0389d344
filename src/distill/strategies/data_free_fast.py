"""Fast DFKD: a meta-learned generator synthesises each batch in a few steps; the student learns
from the growing pool with KD.

Paper: G. Fang, K. Mo, X. Wang, J. Song, S. Bei, H. Zhang, M. Song, "Up to 100x Faster Data-free
Knowledge Distillation", AAAI 2022, arXiv 2112.06253. The synthesizer (meta generator, feature
reuse, momentum BN regulariser, CE and adversarial terms) is
:class:`~distill.synthesis.fast_dfkd.FastMetaSynthesizer`; this module is the outer loop of the
authors' ``datafree_kd.py`` (github.com/zju-vipa/Fast-Datafree)::

    for epoch in range(epochs):
        for _ in range(syntheses_per_epoch):          # ep_steps // kd_steps in the code
            pool += synthesizer.synthesize(student if epoch >= warmup else None)   # g_steps each
            if epoch >= warmup:
                kd_steps SGD steps of T^2 KL(p_T^T || p_S^T) on random pool batches
        cosine lr step; evaluate on val_loader

Defaults from the authors' CIFAR scripts (``scripts/fast_cifar.sh``, "Fast-2"): student SGD lr 0.2,
momentum 0.9, weight decay 1e-4, cosine annealing to 2e-4, ``T = 20``, batch 256, 400 KD steps per
synthesis; their warm-up is 20 of 220 epochs, ours is the same fraction of ``epochs`` (rounded).
The pool samples batches uniformly with replacement (the code iterates a shuffled loader). Never
reads ``train_loader``; ``val_loader`` only evaluates.

The student's SGD defaults are the authors' for their CIFAR students, which all have BatchNorm (ResNet-18,
WRN); the authors ran no MNIST experiment. On MNIST with the BN-free LeNet-5-half, lr 0.2 (momentum 0.9,
``T = 20``) keeps the student near chance while the cosine schedule holds it high (issue 13,
``benchmarks/datafree_diagnosis.py``, 8 epochs, 2 seeds: 20.2 +- 13.1 % test top-1 against 85.9 +- 4.7 % with
``lr=0.01``, and 88.1 +- 4.2 % at lr 0.2 with a BN LeNet-5-half). There pass ``lr=0.01``: DFAD's MNIST
student lr for LeNet-5-half (``DFAD_mnist.py`` in github.com/VainF/Data-Free-Adversarial-Distillation).

Each history row carries ``time_s`` (seconds since the start: synthesis + training), for
time-to-accuracy comparisons. No resume: ``run_dir`` receives ``metrics.jsonl`` and the final ``student.pt`` (weights only).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import functional as DF
from distill.data.synthetic import SyntheticSet
from distill.distiller import Distiller
from distill.methods.logits import KD
from distill.models.registry import create
from distill.papers import Paper
from distill.strategies.data_free_deepinversion import DataFreeResult
from distill.strategies.registry import as_model, register_strategy
from distill.synthesis._checks import check_int
from distill.synthesis.fast_dfkd import FastMetaSynthesizer
from distill.synthesis.progress import StepProgress
from distill.synthesis.registry import teacher_fingerprint
from distill.train.checkpoint import save_checkpoint
from distill.train.evaluate import evaluate

__all__ = ["FANG_2022", "fit_fast_dfkd"]

FANG_2022 = Paper(
    title="Up to 100x Faster Data-free Knowledge Distillation",
    authors="G. Fang, K. Mo, X. Wang, J. Song, S. Bei, H. Zhang, M. Song",
    year=2022,
    arxiv="2112.06253",
    venue="AAAI",
)


@register_strategy("fast_dfkd", "data-free", FANG_2022)
def fit_fast_dfkd(
    student: Any,
    train_loader: Iterable[Any] | None,
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    num_classes: int,
    image_shape: tuple[int, int, int],
    epochs: int,
    syntheses_per_epoch: int = 1,
    kd_steps: int = 400,
    batch_size: int = 256,
    synthesis_batch_size: int | None = None,
    warmup: int | None = None,
    lr: float = 0.2,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    min_lr: float = 2e-4,
    T: float = 20.0,
    generator: nn.Module | None = None,
    latent_dim: int = 256,
    g_steps: int = 2,
    lr_g: float = 5e-3,
    lr_z: float = 0.015,
    bn: float = 10.0,
    oh: float = 0.5,
    adv: float = 1.33,
    bn_momentum: float = 0.9,
    meta: str = "reptile",
    jitter: int = 2,
    flip: bool = False,
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **fit_kwargs: Any,
) -> DataFreeResult:
    """Train ``student`` from ``teacher`` with Fast DFKD (never reads ``train_loader``).

    Args:
        student: the student (a module or a zero-argument factory); trained in place.
        train_loader: ignored: data-free (a test proves it is never iterated).
        val_loader: evaluated after every epoch (the test split).
        teacher: the trained teacher with BatchNorm layers; frozen.
        num_classes, image_shape: ``K`` and ``(C, H, W)``.
        epochs, syntheses_per_epoch, kd_steps: the schedule (module docstring).
        batch_size: KD batch; ``synthesis_batch_size`` images per synthesis (default ``batch_size``).
        warmup: epochs of synthesis only, without the adversarial term (default
            ``round(epochs * 20 / 220)``, the authors' fraction).
        lr, momentum, weight_decay, min_lr: the student's SGD and cosine schedule (``lr > 0``,
            ``0 <= min_lr <= lr``, ``0 <= momentum < 1``, ``weight_decay >= 0``; checked before any
            work). 0.2 suits BN students; 0.01 a BN-free LeNet-5-half on MNIST (module docstring).
        T: KD temperature.
        generator: the meta generator (default ``dfad_generator(latent_dim, image_size=H,
            channels=C, width=128)``: the authors' generator family, ``ngf=64`` i.e. 128 channels
            in the first block; ours ends in tanh + BN instead of a sigmoid, as our inputs are normalised).
        latent_dim, g_steps, lr_g, lr_z, bn, oh, adv, bn_momentum, meta, jitter, flip: the
            synthesizer's (:class:`~distill.synthesis.fast_dfkd.FastMetaSynthesizer`).
        **fit_kwargs: what a recipe's ``train`` passes to every strategy. ``device`` moves teacher,
            student and generator; ``optimizer`` must be ``"sgd"`` and ``resume`` false; the rest
            (``schedule``, ``milestones``, ``gamma``, ``nesterov``, ``amp``, ``grad_clip``,
            ``deterministic``, ``fingerprint``) is not used: the loop is the authors' (SGD, cosine).

    Returns:
        :class:`~distill.strategies.data_free_deepinversion.DataFreeResult`; ``synthetic`` is the final
        pool (labels: the targets the images were synthesised for).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"fast_dfkd needs teacher= (a trained nn.Module); got {type(teacher).__name__}")
    model = as_model(student, "fast_dfkd")
    check_int("epochs", epochs)
    check_int("syntheses_per_epoch", syntheses_per_epoch)
    check_int("kd_steps", kd_steps)
    check_int("batch_size", batch_size)
    if len(tuple(image_shape)) != 3:
        raise ValueError(f"image_shape must be (C, H, W); got {image_shape!r}")
    warm = round(epochs * 20 / 220) if warmup is None else check_int("warmup", warmup, 0)
    if warm >= epochs:
        raise ValueError(f"warmup={warm} leaves no training epoch of {epochs}")
    KD(T=T)  # validates T
    # the student's SGD and cosine schedule, checked before any synthesis (torch would accept lr=0 or
    # min_lr > lr silently: the first trains nothing, the second anneals upwards)
    for name, v in (("lr", lr), ("min_lr", min_lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"fast_dfkd: {name} must be a finite number; got {v!r}")
    if lr <= 0:
        raise ValueError(f"fast_dfkd: lr must be > 0; got {lr!r}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"fast_dfkd: min_lr must be in [0, lr={lr}] (the cosine schedule's floor); got {min_lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"fast_dfkd: momentum must be in [0, 1); got {momentum!r}")
    if weight_decay < 0:
        raise ValueError(f"fast_dfkd: weight_decay must be >= 0; got {weight_decay!r}")
    unknown = set(fit_kwargs) - {"optimizer", "device", "resume", "schedule", "milestones", "gamma", "nesterov",
                                 "amp", "grad_clip", "deterministic", "fingerprint"}
    if unknown:
        raise TypeError(f"fast_dfkd got unexpected keyword arguments {sorted(unknown)}")
    if fit_kwargs.get("optimizer", "sgd") != "sgd":
        raise ValueError(f"fast_dfkd trains the student with SGD (the authors'); got optimizer={fit_kwargs['optimizer']!r}")
    if fit_kwargs.get("resume"):
        raise ValueError("fast_dfkd cannot resume (the pool and the meta generator are not checkpointed)")
    if fit_kwargs.get("device") is not None:
        teacher.to(fit_kwargs["device"])
    c, h, _ = image_shape
    device = next(teacher.parameters()).device
    gen = generator if generator is not None else create("dfad_generator", latent_dim=latent_dim, image_size=h,
                                                         channels=c, width=128)
    gen = gen.to(device).train()
    torch.manual_seed(seed)
    synthesizer = FastMetaSynthesizer(teacher, gen, num_classes=num_classes, latent_dim=latent_dim,
                                      batch_size=synthesis_batch_size or batch_size, g_steps=g_steps, lr_g=lr_g,
                                      lr_z=lr_z, bn=bn, oh=oh, adv=adv, bn_momentum=bn_momentum, meta=meta,
                                      jitter=jitter, flip=flip, seed=seed)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs - warm), eta_min=min_lr)
    judge = Distiller(model, teacher, {"kd": KD(T=T)})
    rng = torch.Generator().manual_seed(seed + 1)
    root = Path(run_dir) if run_dir is not None else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        if (root / "metrics.jsonl").exists():
            raise FileExistsError(f"{root} already holds a run (metrics.jsonl); use a new run_dir")
    pool_x: list[torch.Tensor] = []
    pool_y: list[torch.Tensor] = []
    history: list[dict[str, Any]] = []
    teacher_mode = teacher.training
    teacher.eval()
    start = time.perf_counter()
    synth_time = 0.0
    per_epoch = syntheses_per_epoch * (1 + kd_steps)
    try:
        with StepProgress(progress, "fast_dfkd", epochs * per_epoch) as bar:
            for epoch in range(epochs):
                training = epoch >= warm
                kd_sum, kd_n, synth_losses = 0.0, 0, []
                for _ in range(syntheses_per_epoch):
                    t0 = time.perf_counter()
                    model.eval()
                    step = synthesizer.synthesize(model if training else None)
                    synth_time += time.perf_counter() - t0
                    pool_x.append(step.images)
                    pool_y.append(step.targets)
                    synth_losses.append(step.loss_best)
                    bar.advance(f"epoch {epoch} synth {step.loss_best:.3g}")
                    if not training:
                        bar.advance(steps=kd_steps)
                        continue
                    images = torch.cat(pool_x)
                    model.train()
                    for _k in range(kd_steps):
                        idx = torch.randint(0, images.shape[0], (batch_size,), generator=rng)
                        x = images[idx].to(device)
                        with torch.no_grad():
                            t_logits = teacher(x)
                        loss = DF.kd_loss(model(x), t_logits, T)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        kd_sum += float(loss.detach())
                        kd_n += 1
                        bar.advance(f"epoch {epoch} kd {float(loss.detach()):.3g}")
                if training:
                    sched.step()
                row: dict[str, Any] = {"epoch": epoch, "warmup": not training, "pool": sum(len(p) for p in pool_x),
                                       "synth_loss": sum(synth_losses) / len(synth_losses),
                                       "lr": opt.param_groups[0]["lr"]}
                if kd_n:
                    row["train_kd"] = kd_sum / kd_n
                if val_loader is not None:
                    metrics = evaluate(judge, val_loader, device)
                    row.update({f"val_{k}": v for k, v in metrics.items()})
                row["time_s"] = time.perf_counter() - start
                history.append(row)
                if root is not None:
                    with open(root / "metrics.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
    finally:
        synthesizer.close()
        teacher.train(teacher_mode)
    if root is not None:
        save_checkpoint(root / "student.pt", {"student": model.state_dict()})
    accs = [r["val_student_acc"] for r in history if "val_student_acc" in r]
    best = max(accs) if accs else None
    pool = SyntheticSet(torch.cat(pool_x).float(), torch.cat(pool_y).long(),
                        {"method": "fast_dfkd", "family": "data-free", "num_classes": num_classes,
                         "teacher": {"fingerprint": teacher_fingerprint(teacher)},
                         "settings": {"epochs": epochs, "g_steps": g_steps, "meta": meta, "seed": seed}})
    return DataFreeResult(history=history, best_acc=best,
                          best_epoch=next((r["epoch"] for r in history if r.get("val_student_acc") == best), None),
                          last_acc=accs[-1] if accs else None, run_dir=root, time_s=time.perf_counter() - start,
                          synthetic=pool, synthesis_time_s=synth_time, student=model)
