"""Evaluation: student top-1, teacher top-1, student-teacher agreement and mean KL to the teacher
(per sample for classifiers, per labelled token for language models)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from distill.batch import TokenBatch, as_batch, run_model
from distill.taps import logits_of


@torch.no_grad()
def evaluate(distiller: Any, loader: Iterable[Any], device: torch.device | str | None = None,
             *, with_teacher: bool = True, teacher_cache: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Evaluate the student (and the teacher, when there is one) on ``loader``.

    The student is evaluated through ``distiller.predictor()``: the student itself, or the model
    a method says predicts (SimKD's student trunk → projector → teacher classifier).

    Per-frame logits ``(B, T, K)`` with labels ``(B, T)`` (frame labelling; -100: no label) count
    each labelled frame as one sample. Token batches (language models) are evaluated per token.

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
        batches = iter(loader)
        first = next(batches, None)
        batches = itertools.chain([] if first is None else [first], batches)
        if first is not None and isinstance(as_batch(first), TokenBatch):
            return _evaluate_tokens(student, teacher, batches, device)
        for i, raw in enumerate(batches):
            batch = as_batch(raw)
            if device is not None:
                batch = batch.to(device)
            s_logits = logits_of(student(batch.inputs)).float()
            keep = _labelled_frames(s_logits, batch.targets)
            targets = batch.targets if keep is None else batch.targets[keep] if batch.targets is not None else None
            s_logits = s_logits if keep is None else s_logits[keep]
            n += s_logits.shape[0]
            s_pred = s_logits.argmax(1)
            if targets is not None:
                correct_s += int((s_pred == targets).sum())
            if teacher is not None:
                if teacher_cache is not None and i < len(teacher_cache):
                    t_logits = teacher_cache[i]
                else:
                    t_logits = teacher(batch)["logits"].float()
                    if teacher_cache is not None:
                        teacher_cache.append(t_logits)
                t_logits = t_logits if keep is None else t_logits[keep]
                t_pred = t_logits.argmax(1)
                if targets is not None:
                    correct_t += int((t_pred == targets).sum())
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


def _labelled_frames(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """For per-frame logits ``(B, T, K)`` (sequence labelling: one label per frame), the frames that
    count, ``(B, T)`` bool: labels ``(B, T)`` other than -100, or every frame without labels; each
    counted frame is then one sample of the metrics. ``None`` for per-sample logits ``(B, K)``."""
    if logits.dim() != 3:
        return None
    if targets is None:
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"per-frame logits {tuple(logits.shape)} need one label per frame, (B, T) = "
                         f"{tuple(logits.shape[:2])} with -100 for frames without one; got labels {tuple(targets.shape)}")
    return targets != -100


class _TokenTotals:
    """Running sums of the per-token metrics of one model (and of its agreement with the teacher)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.correct = 0
        self.nll = 0.0


def _evaluate_tokens(student: Any, teacher: Any, loader: Iterable[Any], device: torch.device | str | None
                     ) -> dict[str, float]:
    """The language-model metrics, over every token that carries a label (``labels != -100``; the
    logits at ``t`` predict the label at ``t + 1`` unless the student is an encoder-decoder):
    ``student_acc`` (% of tokens whose argmax is the label), ``student_ppl`` (exp of the mean
    cross-entropy), and with a teacher ``teacher_acc``, ``teacher_ppl``, ``agreement`` (% of tokens
    where the two argmaxes agree) and ``kl_to_teacher`` (mean per token of KL(p_teacher ‖
    p_student), nats). The teacher runs live on every call: (B, L, V) logits are too large to keep;
    a cached teacher (:class:`~distill.token_cache.CachedTokenTeacher`) is replaced by the live model
    it was given (``teacher=``), or leaves the teacher's metrics out.
    """
    causal = not getattr(getattr(student, "config", None), "is_encoder_decoder", False)
    if teacher is not None and hasattr(teacher, "fallback"):
        # a teacher cache holds the training sequences only: its live teacher (or none) judges others
        teacher = teacher.fallback
    s_tot, t_tot = _TokenTotals(), _TokenTotals()
    agree = 0
    kl_sum = 0.0
    for raw in loader:
        batch = as_batch(raw)
        if device is not None:
            batch = batch.to(device)
        if not isinstance(batch, TokenBatch) or batch.targets is None:
            raise ValueError("evaluating a language model needs token batches with labels (input_ids, labels)")
        labels = batch.targets
        s_logits = logits_of(run_model(student, batch))
        if causal:
            s_logits, labels = s_logits[:, :-1], labels[:, 1:]
        valid = labels != -100
        s_rows = s_logits[valid].float()  # (N, V): one row per labelled token
        y = labels[valid]
        s_log = F.log_softmax(s_rows, -1)
        s_pred = s_rows.argmax(-1)
        s_tot.tokens += int(y.numel())
        s_tot.correct += int((s_pred == y).sum())
        s_tot.nll += float(-s_log.gather(1, y[:, None]).sum())
        if teacher is not None:
            t_logits = teacher(batch)["logits"]
            t_rows = (t_logits[:, :-1] if causal else t_logits)[valid].float()
            t_log = F.log_softmax(t_rows, -1)
            t_pred = t_rows.argmax(-1)
            t_tot.correct += int((t_pred == y).sum())
            t_tot.nll += float(-t_log.gather(1, y[:, None]).sum())
            agree += int((t_pred == s_pred).sum())
            kl_sum += float(F.kl_div(s_log, t_log, reduction="sum", log_target=True))
    if s_tot.tokens == 0:
        raise ValueError("the evaluation loader yielded no labelled token (every label is -100)")
    n = s_tot.tokens
    out = {"student_acc": 100.0 * s_tot.correct / n, "student_ppl": math.exp(s_tot.nll / n), "tokens": float(n)}
    if teacher is not None:
        out.update(teacher_acc=100.0 * t_tot.correct / n, teacher_ppl=math.exp(t_tot.nll / n),
                   agreement=100.0 * agree / n, kl_to_teacher=kl_sum / n)
    return out
