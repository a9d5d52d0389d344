"""Float32 for softmaxes: the losses' probabilities are computed in float32 whatever autocast gives them.

Under float16 autocast a model's logits arrive in float16, whose largest finite value is 65504:
dividing them by a temperature below 1, or exponentiating them, overflows to ``inf`` and the
softmax to ``nan``; bfloat16 keeps the range but has 8 bits of mantissa, too few for
log-probabilities of confident predictions. Every loss in :mod:`distill.functional` that takes a
softmax or log-softmax of logits casts them with :func:`fp32` first (before dividing by ``T``).
Float32 and float64 inputs are left as they are (gradient checks run in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__: list[str] = []  # an internal helper: not re-exported by distill.functional

_HALF = (torch.float16, torch.bfloat16)


def fp32(x: Tensor) -> Tensor:
    """``x`` cast to float32 when it is float16 or bfloat16, else ``x`` itself; the cast is
    differentiable, so gradients flow back in the input's dtype."""
    return x.float() if x.dtype in _HALF else x
