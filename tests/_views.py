"""Synthetic student/teacher views shared by the method tests."""

from __future__ import annotations

import torch

from distill.batch import Batch


def cnn_views(batch_size: int, seed: int = 0) -> tuple[dict, dict, Batch]:
    """Leaves for every tap of a 3-stage CNN (student half as wide as the teacher); teacher
    leaves require grad too, so a test can catch any gradient that leaks into them."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(True)

    student = {"logits": leaf(b, 10), "stem": leaf(b, 4, 8, 8), "stage1": leaf(b, 4, 8, 8),
               "stage2": leaf(b, 6, 4, 4), "stage3": leaf(b, 8, 2, 2), "pool": leaf(b, 8)}
    teacher = {"logits": leaf(b, 10), "stem": leaf(b, 8, 8, 8), "stage1": leaf(b, 8, 8, 8),
               "stage2": leaf(b, 12, 4, 4), "stage3": leaf(b, 16, 2, 2), "pool": leaf(b, 16)}
    return student, teacher, Batch(torch.zeros(b, 1, 8, 8), torch.arange(b) % 10)


def _cnn_pair() -> tuple:
    from distill.models import create

    return create("cnn", widths=(4, 8, 8)), create("cnn", widths=(8, 16, 16))


def _digits_pair() -> tuple:
    from distill.models import create

    return create("cnn_digits_student"), create("cnn_digits_teacher")


# (student, teacher) factories of two different families, for end-to-end runs on (B, 1, 8, 8) inputs
CNN_PAIRS = {"cnn": _cnn_pair, "digits": _digits_pair}


def tiny_loader() -> tuple[torch.Tensor, torch.Tensor, object]:
    """16 random 8x8 images with labels, and a shuffled loader of 4 batches of 4."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    return x, y, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True)


def prepare_and_snapshot(distiller, method, loader) -> tuple[list, list]:  # type: ignore[no-untyped-def]
    """Prepare on the first batch; the method's parameters (all seen by the optimizer) and copies of them."""
    distiller.prepare(next(iter(loader)))
    params = list(method.parameters())
    assert params and all(any(p is q for q in distiller.trainable_parameters()) for p in params)
    return params, [p.detach().clone() for p in params]


def prepare_checked(method, student: dict, teacher: dict, batch: Batch) -> list:  # type: ignore[no-untyped-def]
    """Prepare a method that builds parts from the views' shapes, checking it refuses to run before
    and that a second prepare keeps the same parts; returns its named parameters."""
    import pytest

    assert method.requires_prepare
    with pytest.raises(RuntimeError, match="prepare"):
        method(student, teacher, batch)
    with torch.no_grad():
        method.prepare(student, teacher, batch)
    params = list(method.named_parameters())
    method.prepare(student, teacher, batch)  # idempotent: the same parts
    assert [id(p) for _, p in method.named_parameters()] == [id(p) for _, p in params]
    return params
