"""Dark-knowledge transfer from a frame-wise DNN teacher to an RNN student (Tang et al., ICASSP 2016).

Paper: Z. Tang, D. Wang, Z. Zhang, "Recurrent Neural Network Training with Dark Knowledge
Transfer", ICASSP 2016, arXiv 1505.04630. A DNN acoustic model (weaker than the LSTM it teaches)
supplies frame posteriors; the LSTM learns from them, either as pre-training (soft targets first,
then fine-tuning on the hard labels) or jointly with the hard labels as a regulariser.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from distill.data.frames import frame_accuracy
from distill.distiller import Distiller
from distill.methods.frames import TANG_2016, FrameCE, FrameKD
from distill.strategies.chain import ChainResult, ModelSpec, _check_epochs, build_model, check_model_spec
from distill.strategies.registry import register_strategy
from distill.train.loop import FitResult, fit

__all__ = ["REGIMES", "DarkKnowledgeResult", "fit_dark_knowledge"]

REGIMES = ("pretrain", "joint", "soft")


@dataclass
class DarkKnowledgeResult(ChainResult):
    """:class:`~distill.strategies.chain.ChainResult` plus ``frame_accs``: the validation frame accuracy
    (%) after each stage (``last_acc`` is the last of them; ``None`` without a validation loader)."""

    frame_accs: list[float] = field(default_factory=list)


@register_strategy("dark_knowledge", "sequence", TANG_2016)
def fit_dark_knowledge(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int,
    finetune_epochs: int | None = None,
    regime: str = "pretrain",
    T: float = 2.0,
    ce: float = 1.0,
    kd: float = 1.0,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> DarkKnowledgeResult:
    """Train a frame-labelling RNN student from a DNN teacher's frame posteriors.

    Regimes (logits ``(B, T, K)``, labels ``(B, T)``, ``-100`` for frames without a label):

    * ``"pretrain"`` -- the paper's dark-knowledge pre-training: ``epochs`` epochs on the teacher's
      soft targets only (``frame_kd`` at temperature ``T``), then ``finetune_epochs`` epochs on the
      hard labels only (``frame_ce``), from the pre-trained weights.
    * ``"joint"`` -- soft targets as a regulariser: ``epochs`` epochs of
      ``ce·frame_ce + kd·frame_kd``.
    * ``"soft"`` -- soft targets only, no fine-tuning.

    Args:
        student: the RNN student (a model, a factory, a zoo name such as ``"frame_lstm"`` or a zoo spec).
        teacher: the trained frame-wise teacher (e.g. :class:`~distill.models.sequence.FrameDNN`).
        T: the soft targets' temperature. Only the abstract could be read here; ``T = 2`` is our
            choice, not a value taken from the paper (which compares temperatures).
        ce, kd: the joint regime's weights of the hard- and soft-target terms (ignored otherwise).
        finetune_epochs: the fine-tuning stage's length (``"pretrain"`` only; default ``epochs``).
        run_dir: stage ``k`` writes to ``run_dir/stageK``.
        **fit_kwargs: passed to every :func:`distill.fit` call (optimizer, lr, schedule...).

    Evaluation is per frame (:func:`~distill.data.frames.frame_accuracy`) after each stage, on the
    test frames the strategy is given; ``fit`` itself runs without a validation loader (its
    evaluation also counts each labelled frame of ``(B, T, K)`` logits as one sample, for users who
    call ``fit`` on frame tasks directly).
    """
    epochs = _check_epochs(epochs)
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}; got {regime!r}")
    if finetune_epochs is not None and regime != "pretrain":
        raise ValueError(f"finetune_epochs applies to the 'pretrain' regime only; got regime={regime!r}")
    finetune = _check_epochs(epochs if finetune_epochs is None else finetune_epochs)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a trained nn.Module, got {type(teacher).__name__}")
    kd_loss = FrameKD(T=T)  # validates T before any work
    for name, w in (("ce", ce), ("kd", kd)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"{name} must be a weight >= 0; got {w!r}")
    check_model_spec(student, "student")
    if "val_loader" in fit_kwargs:
        raise TypeError("pass val_loader positionally/by name to fit_dark_knowledge, not in fit_kwargs")
    model = build_model(student, "student")
    root = Path(run_dir) if run_dir is not None else None

    if regime == "joint":
        plan = [{"frame_ce": FrameCE(weight=ce), "frame_kd": FrameKD(T=T, weight=kd)}]
        lengths = [epochs]
    elif regime == "soft":
        plan, lengths = [{"frame_kd": kd_loss}], [epochs]
    else:
        plan, lengths = [{"frame_kd": kd_loss}, {"frame_ce": FrameCE()}], [epochs, finetune]

    stages: list[FitResult] = []
    accs: list[float] = []
    for k, (losses, n) in enumerate(zip(plan, lengths), start=1):
        uses_teacher = any(m.needs_teacher for m in losses.values())
        d = Distiller(model, teacher if uses_teacher else None, losses)
        stages.append(fit(d, train_loader, None, epochs=n, run_dir=root / f"stage{k}" if root else None,
                          seed=seed + k - 1, progress=progress, **fit_kwargs))
        if val_loader is not None:
            accs.append(frame_accuracy(model, val_loader))
    last = stages[-1]
    return DarkKnowledgeResult(history=last.history, best_acc=max(accs) if accs else None,
                               best_epoch=None, last_acc=accs[-1] if accs else None, run_dir=last.run_dir,
                               stages=stages, models=[model], frame_accs=accs)
