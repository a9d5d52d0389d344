"""Generator-based data-free KD: DFAD (adversarial) and RDSKD (robustness and diversity seeking).

* ``dfad``: Fang, Song, Shen, Wang, Chen, Song, "Data-Free Adversarial Distillation", 2019,
  arXiv 1912.11006. A generator ``G`` maps noise ``z`` to images; the student ``S`` minimises and
  the generator maximises the teacher-student discrepancy, the mean absolute error of the logits
  (:func:`dfad_discrepancy`). Built on :func:`distill.synthesis.adversarial.adversarial_distill`.
* ``rdskd``: Han, Park, Wang, Liu, "Robustness and Diversity Seeking Data-Free Knowledge
  Distillation", ICASSP 2021, arXiv 2011.03749. The generator is trained from the teacher alone on
  authenticity (one-hot), class diversity (information entropy) and inter-sample diversity, the
  first two penalised exponentially in their increments (:func:`rdskd_generator_loss`); then the
  student learns from the teacher on the generator's images (temperature-scaled KL).

Both never read ``train_loader`` (they take it only for the strategy convention); ``val_loader``
(the test split) is only for evaluation.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.distiller import Distiller
from distill.models import create
from distill.papers import Paper
from distill.strategies.registry import as_model, register_strategy
from distill.synthesis.adversarial import adversarial_distill, l1_logits
from distill.synthesis.progress import StepProgress
from distill.train import FitResult, evaluate

__all__ = ["DFAD_PAPER", "RDSKD_PAPER", "dfad", "dfad_discrepancy", "dfad_generator_objective", "rdskd",
           "rdskd_generator_loss", "train_settings"]

DFAD_PAPER = Paper("Data-Free Adversarial Distillation", "Fang, Song, Shen, Wang, Chen, Song", 2019, "1912.11006")
RDSKD_PAPER = Paper("Robustness and Diversity Seeking Data-Free Knowledge Distillation", "Han, Park, Wang, Liu",
                    2021, "2011.03749", "ICASSP 2021")


# ----------------------------------------------------------------------------- DFAD


dfad_discrepancy = l1_logits
"""DFAD's model discrepancy, the mean absolute error of the logits (S1a's
:func:`~distill.synthesis.adversarial.l1_logits`): ``L_MAE = (1/(B K)) sum_{i,k} |s_ik - t_ik|`` for
logits ``(B, K)``. The student minimises it on generated images; the generator maximises it."""


def dfad_generator_objective(student_logits: Tensor, teacher_logits: Tensor, form: str = "mae") -> Tensor:
    """What DFAD's generator minimises: ``-L_MAE`` (``form="mae"``, the authors' ``DFAD_mnist.py``) or
    ``-log(L_MAE + 1)`` (``form="log"``, the alternative left commented out in that script)."""
    d = dfad_discrepancy(student_logits, teacher_logits)
    if form == "mae":
        return -d
    if form == "log":
        return -torch.log(d + 1)
    raise ValueError(f"dfad_generator_objective: form must be 'mae' or 'log'; got {form!r}")


def _log_form(*, student_logits: Tensor, teacher_logits: Tensor, **_: Any) -> Tensor:
    """Added to the loop's ``-L_MAE``, turns the generator's objective into ``-log(L_MAE + 1)``."""
    d = dfad_discrepancy(student_logits, teacher_logits)
    return d - torch.log(d + 1)


def _image_shape_of(image_shape: Any) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or any(v < 1 for v in shape):
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes; got {image_shape!r}")
    return shape  # type: ignore[return-value]


# a recipe's ``train:`` keys that these loops do not use (their own schedule, no AMP, the CPU/teacher's device)
_IGNORED_TRAIN_KEYS = ("nesterov", "schedule", "milestones", "gamma", "amp", "grad_clip", "deterministic", "device",
                       "resume", "fingerprint")


def train_settings(who: str, train: dict[str, Any], optimizer: str) -> dict[str, Any]:
    """The keys of a recipe's ``train:`` block (passed by the runner as keywords) that a data-free loop
    uses: ``lr``, ``momentum``, ``weight_decay``; ``optimizer`` must name the loop's own; the keys in
    ``_IGNORED_TRAIN_KEYS`` do not apply and are dropped; anything else is an error."""
    unknown = sorted(set(train) - {"optimizer", "lr", "momentum", "weight_decay", *_IGNORED_TRAIN_KEYS})
    if unknown:
        raise TypeError(f"{who}: unexpected arguments {unknown}")
    if train.get("optimizer", optimizer) != optimizer:
        raise ValueError(f"{who}: the student's optimizer is {optimizer!r} (the authors' code); got "
                         f"optimizer={train['optimizer']!r}")
    return {k: train[k] for k in ("lr", "momentum", "weight_decay") if k in train}


def _need_teacher(teacher: Any, who: str) -> nn.Module:
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{who}: teacher must be a trained nn.Module (the data-free strategies synthesise their "
                        f"inputs from it); got {teacher!r}")
    return teacher


@register_strategy("dfad", "data-free", DFAD_PAPER)
def dfad(student: Any, train_loader: Any = None, val_loader: Any = None, *, teacher: nn.Module,
         generator: nn.Module | None = None, image_shape: tuple[int, int, int] = (1, 32, 32),
         generator_width: int = 128, iterations: int = 2000, student_steps: int = 5, generator_steps: int = 1,
         batch_size: int = 512, latent_dim: int = 100, lr_student: float | None = None, lr_generator: float = 1e-3,
         weight_decay: float | None = None, momentum: float | None = None, objective: str = "mae",
         eval_every: int = 50, epochs: int | None = None, seed: int = 0, progress: bool = True, run_dir: Any = None,
         **train: Any) -> FitResult:
    """Data-Free Adversarial Distillation (Fang et al. 2019, arXiv 1912.11006).

    Per iteration: ``student_steps`` student steps minimising :func:`dfad_discrepancy` on fresh
    generated batches ``G(z)``, ``z ~ N(0, I)`` of shape ``(batch_size, latent_dim)`` (detached),
    then ``generator_steps`` generator steps maximising it. The teacher stays frozen in eval mode.

    Defaults (MNIST, LeNet-5 -> LeNet-5-half) are the authors' ``DFAD_mnist.py`` (the paper's
    experiment section could not be read here): batch 512, ``nz=100``, 5 student steps per
    generator step, 40 epochs x 50 iterations = 2000 iterations, student SGD lr 0.01 (momentum 0.9,
    weight decay 1e-4), generator Adam lr 1e-3, DFAD's generator (``dfad_generator``), images 32x32
    (MNIST resized, as both DAFL's and DFAD's code do). ``objective="log"`` makes the generator
    minimise ``-log(L_MAE + 1)`` instead of ``-L_MAE`` (:func:`dfad_generator_objective`).

    From a recipe: ``epochs`` (the recipe's ``train.epochs``) sets ``iterations = 50 * epochs`` (the
    authors' 50 iterations per epoch), and ``train.lr`` / ``momentum`` / ``weight_decay`` the
    student's SGD unless ``lr_student`` / ``momentum`` / ``weight_decay`` are given
    (:func:`train_settings`).

    Args:
        student: the student module (or a zero-argument factory).
        train_loader: never read (the strategy convention's slot).
        val_loader: the test split, for evaluation every ``eval_every`` iterations.
        teacher: the trained teacher (logits ``(B, K)``).
        generator: a module mapping ``(B, latent_dim)`` to ``(B, *image_shape)``; default the zoo's
            ``dfad_generator`` for ``image_shape`` with ``generator_width`` channels (the authors': 128;
            a narrower one costs ~width^2 less, what a CPU run may need).
    Returns: the :class:`~distill.train.FitResult` of :func:`adversarial_distill`.
    """
    teacher = _need_teacher(teacher, "dfad")
    student = as_model(student, "dfad")
    c, h, w = _image_shape_of(image_shape)
    if h != w:
        raise ValueError(f"dfad: the default generator makes square images; got image_shape {image_shape!r}")
    if objective not in ("mae", "log"):
        raise ValueError(f"dfad: objective must be 'mae' or 'log'; got {objective!r}")
    opt = train_settings("dfad", train, "sgd")
    if epochs is not None:
        iterations = 50 * epochs
    lr_student = lr_student if lr_student is not None else opt.get("lr", 0.01)
    momentum = momentum if momentum is not None else opt.get("momentum", 0.9)
    weight_decay = weight_decay if weight_decay is not None else opt.get("weight_decay", 1e-4)
    torch.manual_seed(seed)
    if generator is None:
        generator = create("dfad_generator", latent_dim=latent_dim, image_size=h, channels=c, width=generator_width)
    return adversarial_distill(teacher, student, generator, iterations=iterations, student_steps=student_steps,
                               generator_steps=generator_steps, batch_size=batch_size, latent_dim=latent_dim,
                               discrepancy=dfad_discrepancy, generator_loss=_log_form if objective == "log" else None,
                               lr_student=lr_student, lr_generator=lr_generator, weight_decay=weight_decay,
                               momentum=momentum, val_loader=val_loader, eval_every=eval_every, seed=seed,
                               progress=progress, run_dir=run_dir)


# ----------------------------------------------------------------------------- RDSKD


def rdskd_generator_loss(teacher_logits_1: Tensor, teacher_logits_2: Tensor, images_1: Tensor, images_2: Tensor,
                         previous: tuple[float, float] = (0.0, 0.0)) -> tuple[Tensor, dict[str, float]]:
    """RDSKD's generator loss on a batch generated as two halves ``x^1 = G(z^1)``, ``x^2 = G(z^2)``:

    ``L_G = exp(L_oh - L_oh_prev) + exp(L_ie - L_ie_prev) + L_ds`` where, with ``t = [t^1; t^2]``
    the teacher's logits ``(B, K)`` and ``p = softmax(t)``,

    * ``L_oh = (1/B) sum_i CE(t_i, argmax_c t_ic)`` (authenticity: confident teacher outputs),
    * ``L_ie = sum_c pbar_c log pbar_c``, ``pbar = (1/B) sum_i p_i`` (class diversity: the batch's
      mean prediction near uniform, i.e. minus its entropy),
    * ``L_ds = ||p^2 - p^1||_F / ||x^2 - x^1||_F`` (inter-sample diversity: images far apart for
      outputs that are close; Frobenius norms over the whole halves),

    and ``(L_oh_prev, L_ie_prev) = previous``, the terms' values at a reference step: an
    *increment* of either term is penalised exponentially (the paper's robustness device), a decrease
    costs less than linearly. Forms read from the authors' code (``generator-train.py``), which
    matches the abstract's three terms and exponential penalty; the method section could not be read
    here. Their code computes ``1 / (||x^2 - x^1|| / ||p^2 - p^1|| + 1e-20)``; we divide directly.

    Args:
        teacher_logits_1, teacher_logits_2: ``(B/2, K)`` each.
        images_1, images_2: ``(B/2, C, H, W)`` each.
        previous: the reference values ``(L_oh_prev, L_ie_prev)``.
    Returns: ``(loss, parts)``, ``parts`` the floats "oh", "ie", "ds".
    """
    if teacher_logits_1.shape != teacher_logits_2.shape or images_1.shape != images_2.shape:
        raise ValueError(f"rdskd_generator_loss: the two halves must have equal shapes; got logits "
                         f"{tuple(teacher_logits_1.shape)} / {tuple(teacher_logits_2.shape)} and images "
                         f"{tuple(images_1.shape)} / {tuple(images_2.shape)}")
    t = torch.cat([teacher_logits_1, teacher_logits_2])
    oh = F.cross_entropy(t, t.argmax(1))
    pbar = F.softmax(t, 1).mean(0)
    ie = (pbar * torch.log(pbar)).sum()
    p1, p2 = F.softmax(teacher_logits_1, 1), F.softmax(teacher_logits_2, 1)
    ds = torch.linalg.norm(p2 - p1) / torch.linalg.norm(images_2 - images_1).clamp_min(1e-12)
    loss = torch.exp(oh - previous[0]) + torch.exp(ie - previous[1]) + ds
    return loss, {"oh": float(oh.detach()), "ie": float(ie.detach()), "ds": float(ds.detach())}


def _kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, batch mean (Hinton et al.; RDSKD's student loss)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                    reduction="batchmean") * temperature ** 2


def _eval_row(student: nn.Module, teacher: nn.Module, val_loader: Any, step: int, t0: float,
              extra: dict[str, float]) -> dict[str, Any]:
    metrics = evaluate(Distiller(student, teacher, {"ce": 1.0}), val_loader)
    return {"epoch": step, "time_s": time.perf_counter() - t0, **extra, **metrics}


@register_strategy("rdskd", "data-free", RDSKD_PAPER)
def rdskd(student: Any, train_loader: Any = None, val_loader: Any = None, *, teacher: nn.Module,
          generator: nn.Module | None = None, image_shape: tuple[int, int, int] = (1, 32, 32),
          generator_width: int = 128, generator_iterations: int = 2400, student_iterations: int = 120_000,
          reference_every: int = 120, batch_size: int = 512, latent_dim: int = 100, lr_generator: float = 1e-3,
          lr_student: float | None = None,
          temperature: float = 10.0, eval_every: int = 1200, epochs: int | None = None, seed: int = 0,
          progress: bool = True, run_dir: Any = None, **train: Any) -> FitResult:
    """Robustness and Diversity Seeking Data-Free KD (Han et al., ICASSP 2021, arXiv 2011.03749).

    Stage 1: ``generator_iterations`` Adam steps of the generator on :func:`rdskd_generator_loss`
    (the teacher alone judges its images; the student plays no part), the reference values
    ``previous`` set to the current terms after iteration ``i`` with ``i % reference_every == 1``
    (0 before: the authors' code refreshes them at the second iteration of each 120-iteration epoch).
    Stage 2: ``student_iterations`` Adam steps of the student on ``T^2 KL(p_t^T || p_s^T)`` on fresh
    images of the frozen generator (eval mode).

    Defaults from the authors' code (``generator-train.py``, ``student-train.py``, MNIST): batch 512,
    ``latent_dim`` 100, generator Adam lr 1e-3 for 20 x 120 iterations, student Adam lr 2e-3 (no weight
    decay) for 1000 x 120 iterations, ``T = 10``; the generator is DAFL's (``dafl_generator``), the
    images 32x32 (``generator_width``: the default generator's width, the authors' 128).

    From a recipe: ``epochs`` sets ``student_iterations = 120 * epochs`` (the code's 120 iterations
    per epoch), ``train.lr`` the student's Adam lr unless ``lr_student`` is given, ``train.optimizer``
    must be ``adam`` and ``train.weight_decay`` 0 (the authors' code; :func:`train_settings`).

    Returns a :class:`~distill.train.FitResult` whose ``history`` has one row per evaluation
    (``epoch`` = student iterations done, ``time_s`` since the start, the generator-stage terms, and
    :func:`~distill.train.evaluate`'s metrics); ``run_dir`` is not used (no checkpoints).
    """
    teacher = _need_teacher(teacher, "rdskd")
    student = as_model(student, "rdskd")
    opt = train_settings("rdskd", train, "adam")
    if opt.get("weight_decay", 0.0):
        raise ValueError(f"rdskd: the student's Adam has no weight decay (the authors' code); got "
                         f"weight_decay={opt['weight_decay']!r}")
    if epochs is not None:
        student_iterations = 120 * epochs
    lr_student = lr_student if lr_student is not None else opt.get("lr", 2e-3)
    c, h, w = _image_shape_of(image_shape)
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"rdskd: batch_size must be even (the batch is generated as two halves); got {batch_size}")
    for name, v in (("generator_iterations", generator_iterations), ("student_iterations", student_iterations),
                    ("reference_every", reference_every), ("eval_every", eval_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "generator_iterations" else 1):
            raise ValueError(f"rdskd: {name} must be a positive int; got {v!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if generator is None:
        generator = create("dafl_generator", latent_dim=latent_dim, image_size=h, channels=c, width=generator_width)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    result = FitResult(run_dir=None)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_generator)
    previous = (0.0, 0.0)
    parts: dict[str, float] = {}
    half = batch_size // 2
    with StepProgress(progress, "rdskd generator", generator_iterations) as bar:
        generator.train()
        for i in range(generator_iterations):
            z = torch.randn(batch_size, latent_dim, generator=g)
            x = generator(z)
            x1, x2 = x[:half], x[half:]
            loss, parts = rdskd_generator_loss(teacher(x1), teacher(x2), x1, x2, previous)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            if i % reference_every == 1:
                previous = (parts["oh"], parts["ie"])
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"rdskd: the generator loss became {value} at iteration {i}")
            bar.advance(f"L_G {value:.3f}")
    generator.eval()
    opt_s = torch.optim.Adam(student.parameters(), lr=lr_student)
    gen_parts = {f"gen_{k}": v for k, v in parts.items()}
    with StepProgress(progress, "rdskd student", student_iterations) as bar:
        for i in range(1, student_iterations + 1):
            student.train()
            with torch.no_grad():
                x = generator(torch.randn(batch_size, latent_dim, generator=g))
                t = teacher(x)
            loss = _kd_kl(student(x), t, temperature)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            bar.advance(f"kd {float(loss.detach()):.4f}")
            if val_loader is not None and (i % eval_every == 0 or i == student_iterations):
                row = _eval_row(student, teacher, val_loader, i, t0, {"loss": float(loss.detach()), **gen_parts})
                result.history.append(row)
    student.eval()
    accs = [r["student_acc"] for r in result.history]
    if accs:
        result.last_acc = accs[-1]
        result.best_acc = max(accs)
        result.best_epoch = result.history[accs.index(result.best_acc)]["epoch"]
    result.time_s = time.perf_counter() - t0
    return result
