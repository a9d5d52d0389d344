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
