"""The adversarial teacher-student-generator loop of data-free distillation.

Fang et al., "Data-Free Adversarial Distillation", 2019, arXiv 1912.11006 (DFAD): a generator
``G`` maps noise ``z ~ N(0, I)`` to images; the student ``S`` minimises a discrepancy ``D`` between
its logits and the frozen teacher's ``T`` on ``G(z)``, and the generator maximises it:

    min_S max_G  E_z [ D(S(G(z)), T(G(z))) ]

Per iteration (the authors' ``DFAD_mnist.py``): ``student_steps`` student steps, each on a fresh
batch ``G(z)`` (generator output detached), then ``generator_steps`` generator steps on fresh
batches minimising ``L_G = -D(S(G(z)), T(G(z))) + generator_loss(...)``. ``generator_loss`` adds
the extra generator terms of the methods built on this loop (Han et al.'s robustness and
diversity terms, FedFTG's); with ``None`` the loop is DFAD's. Gradients of the generator step
reach the generator only (the student's parameters are left untouched by it; its BatchNorm
statistics, in training mode, are updated as in the authors' code). The teacher is in eval mode
with ``requires_grad`` off for the whole loop (both restored at the end); gradients flow through
it to the images.

Optimisers (the authors' MNIST script): student SGD (momentum 0.9, ``weight_decay``), generator
Adam; ``lr_milestones`` multiplies both learning rates by ``lr_gamma`` at those iterations (their
optional ``StepLR``). No training image is ever read.

With ``run_dir``, ``run_dir/last.pt`` (student, generator, both optimisers, the noise generator's
state, the global RNG state, the history) is written at every evaluation point and at the end,
and a later call with the same ``run_dir`` resumes from it (``iterations`` may be raised to train
on); the final weights go to ``student.safetensors`` and ``generator.safetensors``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.distiller import Distiller
from distill.synthesis._checks import check_int
from distill.synthesis.progress import StepProgress
from distill.train import FitResult, evaluate
from distill.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, save_model, set_rng_state

__all__ = ["adversarial_distill", "generator_step", "l1_logits", "student_step"]

CHECKPOINT = "last.pt"


def l1_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DFAD's discrepancy, the mean absolute error of the logits (arXiv 1912.11006; the authors'
    code's ``F.l1_loss``): ``(1 / (B K)) sum_{i,k} |s_ik - t_ik|`` for logits ``(B, K)``; a scalar."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"l1_logits: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have one shape (B, K)")
    return (student_logits - teacher_logits).abs().mean()


def student_step(teacher: nn.Module, student: nn.Module, generator: nn.Module, optimizer: torch.optim.Optimizer,
                 z: Tensor, discrepancy: Callable[[Tensor, Tensor], Tensor] = l1_logits) -> float:
    """One student step: ``x = G(z)`` (no gradient), minimise ``D(S(x), T(x))``; returns ``D``'s value.

    ``z``: noise ``(B, latent_dim)``; the generator stays in its current mode."""
    with torch.no_grad():
        x = generator(z)
        t = teacher(x)
    loss = discrepancy(student(x), t)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def generator_step(teacher: nn.Module, student: nn.Module, generator: nn.Module, optimizer: torch.optim.Optimizer,
                   z: Tensor, discrepancy: Callable[[Tensor, Tensor], Tensor] = l1_logits,
                   generator_loss: Callable[..., Tensor] | None = None) -> tuple[float, float]:
    """One generator step minimising ``L_G = -D(S(G(z)), T(G(z))) + generator_loss(images=x, z=z,
    teacher_logits=t, student_logits=s)`` (the last term only when given); gradients reach the
    generator's parameters only. Returns ``(L_G, D)`` as floats. ``z``: ``(B, latent_dim)``."""
    x = generator(z)
    t, s = teacher(x), student(x)
    d = discrepancy(s, t)
    loss = -d
    if generator_loss is not None:
        loss = loss + generator_loss(images=x, z=z, teacher_logits=t, student_logits=s)
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=[p for p in generator.parameters() if p.requires_grad])
    optimizer.step()
    return float(loss.detach()), float(d.detach())


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"adversarial_distill: {name} must be a positive number; got {value!r}")


def _check_shapes(teacher: nn.Module, student: nn.Module, generator: nn.Module, latent_dim: int,
                  device: torch.device) -> None:
    """One tiny forward (2 noise vectors, no gradient, modes restored) so that a wrong latent size or
    mismatched logits fail before any training."""
    modes = {m: m.training for m in (*generator.modules(), *student.modules())}
    try:
        generator.eval()
        student.eval()
        with torch.no_grad():
            try:
                x = generator(torch.zeros(2, latent_dim, device=device))
            except Exception as e:  # noqa: BLE001  (re-raised with what was expected)
                raise ValueError(f"adversarial_distill: the generator failed on noise of shape (2, {latent_dim}) "
                                 f"(latent_dim={latent_dim}): {e}") from e
            t, s = teacher(x), student(x)
        if t.shape != s.shape:
            raise ValueError(f"adversarial_distill: teacher logits {tuple(t.shape)} and student logits "
                             f"{tuple(s.shape)} on generated images {tuple(x.shape)} differ in shape")
    finally:
        for m, mode in modes.items():
            m.training = mode


def adversarial_distill(
    teacher: nn.Module,
    student: nn.Module,
    generator: nn.Module,
    *,
    iterations: int = 2000,
    student_steps: int = 5,
    generator_steps: int = 1,
    batch_size: int = 512,
    latent_dim: int = 100,
    discrepancy: Callable[[Tensor, Tensor], Tensor] = l1_logits,
    generator_loss: Callable[..., Tensor] | None = None,
    lr_student: float = 0.01,
    lr_generator: float = 1e-3,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 0.1,
    val_loader: Any = None,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
) -> FitResult:
    """Train ``student`` against ``teacher`` on images of ``generator`` (module docstring).

    Defaults: the authors' ``DFAD_mnist.py`` (batch 512, ``nz=100``, 5 student steps per generator
    step, 40 epochs x 50 iterations = 2000, SGD lr 0.01 momentum 0.9 weight decay 1e-4, Adam lr 1e-3,
    no schedule); the paper's experiment section could not be read here.

    Args:
        teacher: the trained teacher, images ``(B, C, H, W)`` -> logits ``(B, K)``.
        student: the model trained, same input and output shapes.
        generator: noise ``(B, latent_dim)`` -> images ``(B, C, H, W)`` (e.g. the zoo's ``dfad_generator``).
        iterations: outer iterations (each: ``student_steps`` + ``generator_steps`` steps).
        discrepancy: ``D(student_logits, teacher_logits) -> scalar``.
        generator_loss: extra generator terms, called with keywords ``images``, ``z``,
            ``teacher_logits``, ``student_logits``; returns a scalar added to ``-D``.
        val_loader: batches ``(x, y)`` of the test split, evaluated with :func:`distill.train.evaluate`
            every ``eval_every`` iterations and at the end.
        seed: seeds the noise (its own ``torch.Generator``) and torch's global RNG.
        run_dir: folder for the checkpoint and final weights; resumes from ``run_dir/last.pt``.

    Returns:
        a :class:`~distill.train.FitResult`: ``history`` one row per evaluation point (``epoch`` =
        ``iteration`` done, ``loss_student`` and ``discrepancy`` of the last steps, ``loss_generator``,
        ``time_s``, and the evaluation's ``student_acc``, ``teacher_acc``, ``agreement``,
        ``kl_to_teacher`` when ``val_loader`` is given); ``best_acc``/``last_acc`` from those.
    """
    for name, value, minimum in (("iterations", iterations, 1), ("student_steps", student_steps, 0),
                                 ("generator_steps", generator_steps, 0), ("batch_size", batch_size, 2),
                                 ("latent_dim", latent_dim, 1), ("eval_every", eval_every, 1)):
        check_int(name, value, minimum, who="adversarial_distill")
    _positive("lr_student", lr_student)
    _positive("lr_generator", lr_generator)
    for m in (teacher, student, generator):
        if not isinstance(m, nn.Module):
            raise TypeError(f"adversarial_distill: teacher, student and generator must be nn.Modules; got "
                            f"{type(m).__name__}")
    params = list(student.parameters())
    device = params[0].device if params else torch.device("cpu")
    teacher_modes = {m: m.training for m in teacher.modules()}
    teacher_grads = {p: p.requires_grad for p in teacher.parameters()}
    teacher.eval()
    teacher.requires_grad_(False)
    try:
        _check_shapes(teacher, student, generator, latent_dim, device)
        return _loop(teacher, student, generator, iterations=iterations, student_steps=student_steps,
                     generator_steps=generator_steps, batch_size=batch_size, latent_dim=latent_dim,
                     discrepancy=discrepancy, generator_loss=generator_loss, lr_student=lr_student,
                     lr_generator=lr_generator, weight_decay=weight_decay, momentum=momentum,
                     lr_milestones=sorted(int(m) for m in lr_milestones), lr_gamma=lr_gamma,
                     val_loader=val_loader, eval_every=eval_every, seed=seed, progress=progress,
                     run_dir=None if run_dir is None else Path(run_dir), device=device)
    finally:
        for m, mode in teacher_modes.items():
            m.training = mode
        for p, flag in teacher_grads.items():
            p.requires_grad_(flag)


def _loop(teacher: nn.Module, student: nn.Module, generator: nn.Module, *, iterations: int, student_steps: int,
          generator_steps: int, batch_size: int, latent_dim: int, discrepancy: Callable[[Tensor, Tensor], Tensor],
          generator_loss: Callable[..., Tensor] | None, lr_student: float, lr_generator: float,
          weight_decay: float, momentum: float, lr_milestones: list[int], lr_gamma: float, val_loader: Any,
          eval_every: int, seed: int, progress: bool, run_dir: Path | None, device: torch.device) -> FitResult:
    torch.manual_seed(seed)
    noise = torch.Generator().manual_seed(seed)
    opt_s = torch.optim.SGD(student.parameters(), lr=lr_student, momentum=momentum, weight_decay=weight_decay)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_generator)
    # what a resumed run must share with the run that wrote the checkpoint
    settings = dict(student_steps=student_steps, generator_steps=generator_steps, batch_size=batch_size,
                    latent_dim=latent_dim, lr_student=float(lr_student), lr_generator=float(lr_generator),
                    weight_decay=float(weight_decay), momentum=float(momentum), lr_milestones=lr_milestones,
                    lr_gamma=float(lr_gamma), eval_every=eval_every, seed=seed,
                    # the models' shapes too: another generator width must be refused, not fail in load_state_dict
                    shapes={name: {k: list(v.shape) for k, v in m.state_dict().items()}
                            for name, m in (("student", student), ("generator", generator))})
    result = FitResult(run_dir=run_dir)
    start, elapsed = 0, 0.0
    ckpt = None if run_dir is None else run_dir / CHECKPOINT
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt, map_location=device)
        if state.get("settings") != settings:
            saved = state.get("settings") or {}
            differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise ValueError(f"adversarial_distill: {str(ckpt)!r} was written with other settings ({', '.join(differ)} "
                             f"differ: {', '.join(f'{k}={saved.get(k)!r}' for k in differ if k != 'shapes')}); "
                             f"use another run_dir or the same settings and models to resume")
        student.load_state_dict(state["student"])
        generator.load_state_dict(state["generator"])
        opt_s.load_state_dict(state["opt_student"])
        opt_g.load_state_dict(state["opt_generator"])
        noise.set_state(state["noise"])
        set_rng_state(state["rng"])
        start, elapsed = int(state["iteration"]), float(state["time_s"])
        result.history = list(state["history"])
    elif run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)

    def lr_factor(done: int) -> float:
        return lr_gamma ** sum(1 for m in lr_milestones if done >= m)

    distiller = Distiller(student, teacher, {"ce": 1.0}) if val_loader is not None else None
    t0 = time.perf_counter() - elapsed
    loss_s = d = loss_g = float("nan")
    with StepProgress(progress, "adversarial distillation", iterations - start) as bar:
        for it in range(start, iterations):
            for opt, lr in ((opt_s, lr_student), (opt_g, lr_generator)):
                for group in opt.param_groups:
                    group["lr"] = lr * lr_factor(it)
            student.train()
            generator.train()
            for _ in range(student_steps):
                z = torch.randn(batch_size, latent_dim, generator=noise).to(device)
                loss_s = student_step(teacher, student, generator, opt_s, z, discrepancy)
            for _ in range(generator_steps):
                z = torch.randn(batch_size, latent_dim, generator=noise).to(device)
                loss_g, d = generator_step(teacher, student, generator, opt_g, z, discrepancy, generator_loss)
            for name, v, ran in (("student", loss_s, student_steps), ("generator", loss_g, generator_steps)):
                if ran and not math.isfinite(v):
                    raise FloatingPointError(f"adversarial_distill: the {name} loss became {v} at iteration {it + 1}")
            done = it + 1
            info = f"S {loss_s:.4f} G {loss_g:.4f}"
            if done % eval_every == 0 or done == iterations:
                row: dict[str, Any] = {"epoch": done, "iteration": done, "loss_student": loss_s,
                                       "loss_generator": loss_g, "discrepancy": d, "time_s": time.perf_counter() - t0}
                if distiller is not None:
                    row.update(evaluate(distiller, val_loader, device))
                    info += f" acc {row['student_acc']:.2f}"
                result.history.append(row)
                if ckpt is not None:
                    save_checkpoint(ckpt, {"settings": settings, "iteration": done, "time_s": row["time_s"],
                                           "student": student.state_dict(), "generator": generator.state_dict(),
                                           "opt_student": opt_s.state_dict(), "opt_generator": opt_g.state_dict(),
                                           "noise": noise.get_state(), "rng": rng_state(),
                                           "history": result.history})
            bar.advance(info)
    student.eval()
    generator.eval()
    accs = [r["student_acc"] for r in result.history if "student_acc" in r]
    if accs:
        result.last_acc = accs[-1]
        result.best_acc = max(accs)
        result.best_epoch = result.history[[r.get("student_acc") for r in result.history].index(result.best_acc)]["epoch"]
    result.time_s = time.perf_counter() - t0
    if run_dir is not None:
        save_model(run_dir / "student.safetensors", student, metadata={"iterations": iterations,
                                                                        "last_acc": result.last_acc})
        save_model(run_dir / "generator.safetensors", generator, metadata={"iterations": iterations})
    return result
