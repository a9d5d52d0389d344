"""Evaluation: student top-1, teacher top-1, student-teacher agreement and mean KL to the teacher."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from distill.batch import as_batch
from distill.taps import logits_of


@torch.no_grad()
def evaluate(distiller: Any, loader: Iterable[Any], device: torch.device | str | None = None,
             *, with_teacher: bool = True, teacher_cache: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Evaluate the student (and the teacher, when there is one) on ``loader``.

    The student is evaluated through ``distiller.predictor()``: the student itself, or the model
    a method says predicts (SimKD's student trunk → projector → teacher classifier).

    Returns a dict with ``student_acc`` (top-1, %), and with a teacher ``teacher_acc`` (%),
    ``agreement`` (% of samples where the argmaxes agree) and ``kl_to_teacher``
    (mean over samples of KL(p_teacher ‖ p_student) at temperature 1, in nats).

    ``teacher_cache``: a list filled with the teacher's logits per batch on the first call and
    read on later calls; only valid for a teacher that does not change and a loader that
    yields the same batches in the same order (``fit`` checks both).
    """
    # what predicts after training: the student, or a method's predictor (SimKD's reused classifier)
    student = distiller.predictor() if hasattr(distiller, "predictor") else distiller.student
    teacher = distiller.teacher if with_teacher else None
    modes = {m: m.training for m in student.modules()}  # restored per module (a frozen BN stays frozen)
    student.eval()
    n = correct_s = correct_t = agree = 0
    kl_sum = 0.0
    try:
        for i, raw in enumerate(loader):
            batch = as_batch(raw)
            if device is not None:
                batch = batch.to(device)
            s_logits = logits_of(student(batch.inputs)).float()
            n += s_logits.shape[0]
            s_pred = s_logits.argmax(1)
            if batch.targets is not None:
                correct_s += int((s_pred == batch.targets).sum())
            if teacher is not None:
                if teacher_cache is not None and i < len(teacher_cache):
                    t_logits = teacher_cache[i]
                else:
                    t_logits = teacher(batch)["logits"].float()
                    if teacher_cache is not None:
                        teacher_cache.append(t_logits)
                t_pred = t_logits.argmax(1)
                if batch.targets is not None:
                    correct_t += int((t_pred == batch.targets).sum())
                agree += int((t_pred == s_pred).sum())
                kl_sum += float(F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1),
                                         reduction="sum", log_target=True))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if n == 0:
        raise ValueError("evaluation loader yielded no samples")
    out = {"student_acc": 100.0 * correct_s / n}
    if teacher is not None:
        out.update(teacher_acc=100.0 * correct_t / n, agreement=100.0 * agree / n, kl_to_teacher=kl_sum / n)
    return out
