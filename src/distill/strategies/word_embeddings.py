"""Distilling word embeddings by encoding them (Mou et al., CIKM 2016).

Paper: L. Mou, R. Jia, Y. Xu, G. Li, L. Zhang, Z. Jin, "Distilling Word Embeddings: An Encoding
Approach", CIKM 2016, arXiv 1506.04488. A non-linear encoding layer maps a teacher's large word
embeddings to a small space; the layer and the small network above it are trained with the task's
labels (optionally also matching a teacher network's softmax); afterwards every word's encoded
vector is computed once and the large table and the encoder are discarded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.distiller import Distiller
from distill.methods.base import Paper
from distill.methods.logits import KD, CrossEntropy
from distill.models.sequence import EmbeddingEncoder
from distill.strategies.chain import ChainResult, _check_epochs
from distill.strategies.registry import register_strategy
from distill.train.loop import fit

__all__ = ["MOU_2016", "fit_embedding_encoding"]

MOU_2016 = Paper(
    title="Distilling Word Embeddings: An Encoding Approach",
    authors="L. Mou, R. Jia, Y. Xu, G. Li, L. Zhang, Z. Jin",
    year=2016,
    arxiv="1506.04488",
    venue="CIKM",
)


@register_strategy("embedding_encoding", "embedding", MOU_2016)
def fit_embedding_encoding(
    student: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher_table: Tensor,
    epochs: int,
    embedding: str = "embedding",
    dim: int | None = None,
    activation: str = "tanh",
    teacher: nn.Module | None = None,
    kd: float = 0.0,
    T: float = 1.0,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> ChainResult:
    """Train ``student`` with its word embedding replaced by an encoding of ``teacher_table``, then bake
    the encoded table into a plain ``nn.Embedding``.

    The submodule ``embedding`` of ``student`` (ids ``(B, L)`` -> ``(B, L, d)``) becomes an
    :class:`~distill.models.sequence.EmbeddingEncoder`: ``e = f(E_teacher[id] W^T + b)`` with ``E_teacher``
    ``(V, D)`` frozen and ``W`` ``(d, D)``, ``b`` trained with the student's other parameters on the
    task's cross-entropy (``ce``) -- plus, when ``teacher`` is given and ``kd > 0``, ``kd`` times
    Hinton's soft-target loss at temperature ``T`` (the paper's combination with matching softmax).
    After ``epochs`` epochs of :func:`distill.fit`, the encoder is replaced by
    :meth:`~distill.models.sequence.EmbeddingEncoder.export`, so the delivered student holds only
    the ``(V, d)`` table.

    Args:
        student: a text classifier whose ``embedding`` submodule maps ids to vectors (e.g.
            :class:`~distill.models.sequence.BagOfEmbeddings`); ``dim`` defaults to that module's
            ``embedding_dim``.
        teacher_table: the teacher's word embeddings ``(V, D)``, rows indexed by the student's ids.
        activation: the encoding layer's non-linearity. Only the abstract and summaries of the paper
            could be read here: they say a non-linear layer, not which one; ``tanh`` is our choice.

    Returns:
        a :class:`~distill.strategies.chain.ChainResult`; ``models`` holds the student (with the
        baked table) and the trained encoder. The student's accuracy is ``fit``'s evaluation of the
        encoder-equipped student, which the baked table reproduces exactly.

    Departure: the paper's teacher embeddings are the task-tuned embeddings of a cumbersome model;
    here any table can be given (the example uses all-MiniLM-L6-v2's pretrained table as it is).
    """
    epochs = _check_epochs(epochs)
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module with an embedding submodule, got {type(student).__name__}")
    try:
        old = student.get_submodule(embedding)
    except AttributeError:
        raise ValueError(f"student has no submodule {embedding!r} to replace with the encoding layer") from None
    if dim is None:
        dim = getattr(old, "embedding_dim", None)
        if dim is None:
            raise ValueError(f"give dim: the submodule {embedding!r} has no embedding_dim")
    vocab = getattr(old, "num_embeddings", None)
    if vocab is not None and isinstance(teacher_table, Tensor) and teacher_table.dim() == 2 \
            and teacher_table.shape[0] != vocab:
        raise ValueError(f"teacher_table has {teacher_table.shape[0]} rows but the student's embedding has {vocab} "
                         f"words; rows must be indexed by the student's token ids")
    if kd > 0 and teacher is None:
        raise ValueError("kd > 0 matches a teacher's softmax: give teacher=")
    losses: dict[str, Any] = {"ce": CrossEntropy()}
    if kd > 0:
        losses["kd"] = KD(T=T, weight=kd)
    encoder = EmbeddingEncoder(teacher_table, dim, activation)
    device = next(student.parameters()).device
    encoder.to(device)
    _replace(student, embedding, encoder)
    result = fit(Distiller(student, teacher if kd > 0 else None, losses), train_loader, val_loader, epochs=epochs,
                 run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)
    _replace(student, embedding, encoder.export().to(device))
    return ChainResult(history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch,
                       last_acc=result.last_acc, run_dir=result.run_dir, time_s=result.time_s,
                       stages=[result], models=[student, encoder])


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
