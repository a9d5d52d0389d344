"""Internal-representation distillation of transformer encoders: self-attention distributions by
KL divergence, [CLS] activations by cosine distance, and the uniform layer map between a deep
teacher and a shallow student.

Aguilar, Ling, Zhang, Yao, Fan, Guo, "Knowledge Distillation from Internal Representations",
AAAI 2020, arXiv 1910.03723.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = ["attention_kl_loss", "cls_cosine_loss", "uniform_layer_map"]

_ROWS = ("all", "cls")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """The paper's layer map: student layer j (1-based) learns teacher layer j·N_t/N_s.

    ``student_layers`` N_s, ``teacher_layers`` N_t, with N_s ≤ N_t and N_s dividing N_t (the paper
    compresses 12-layer BERT-base into 6 layers, skipping every other teacher layer: 1→2, 2→4,
    ..., 6→12; the last student layer always learns the last teacher layer) →
    ``[(1, k), (2, 2k), ..., (N_s, N_t)]`` with k = N_t / N_s.
    """
    for name, v in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if student_layers > teacher_layers or teacher_layers % student_layers:
        raise ValueError(
            f"the uniform layer map needs the student's layer count to divide the teacher's, got "
            f"student_layers={student_layers}, teacher_layers={teacher_layers}; give an explicit layer_map"
        )
    k = teacher_layers // student_layers
    return [(j, j * k) for j in range(1, student_layers + 1)]


def _query_mask(mask: Tensor | None, b: int, length: int, rows: str, device: torch.device,
                dtype: torch.dtype) -> Tensor:
    """(B, L') float weights of the query rows that count: real tokens, or only row 0 for ``"cls"``."""
    if mask is None:
        keep = torch.ones(b, length, device=device, dtype=dtype)
    else:
        if tuple(mask.shape) != (b, length):
            raise ValueError(f"attention_mask must be (B, L) = {(b, length)}, got {tuple(mask.shape)}")
        keep = (mask > 0).to(dtype)
    return keep[:, :1] if rows == "cls" else keep


def attention_kl_loss(student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None,
                      rows: str = "all", eps: float = 1e-12) -> Tensor:
    r"""KL divergence of the student's self-attention distributions from the teacher's, per head.

    .. math::
        L_{att} = \frac{1}{B}\sum_{b} \frac{1}{|T_b|} \sum_{t \in T_b} \sum_{a=1}^{A}
        \sum_{j} x^{b}_{a,t,j} \log \frac{x^{b}_{a,t,j}}{y^{b}_{a,t,j}}

    x = teacher attention probabilities, y = student's; a runs over the A heads, t over the query
    rows T_b of sample b (every real token for ``rows="all"``; only the [CLS] row t = 0 for
    ``rows="cls"``), j over the key positions. Heads are summed and query rows averaged, as in the
    paper's equation (1/T Σ_t Σ_a KL); the batch is averaged.

    Args:
        student: ``(B, A, L, L)`` attention probabilities (rows sum to 1), e.g. a Hugging Face
            ``output.attentions[i]`` (eager attention).
        teacher: ``(B, A, L, L)``, the same heads and length.
        attention_mask: ``(B, L)``, 1 for real tokens, 0 for padding (padding query rows do not
            count; padding keys already have probability 0 in both); ``None``: every row counts.
        rows: ``"all"`` (every query row) or ``"cls"`` (the first row only).
        eps: floor of the student probability inside the log (a teacher zero contributes 0).

    Returns:
        A scalar.
    """
    if rows not in _ROWS:
        raise ValueError(f"rows must be one of {_ROWS}, got {rows!r}")
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"attention_kl_loss needs student and teacher attentions of one (B, A, L, L) shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    b, _, length, _ = student.shape
    s, t = fp32(student), fp32(teacher)
    if rows == "cls":
        s, t = s[:, :, :1], t[:, :, :1]
    # sum over keys j, then over heads a: (B, L')
    kl = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(eps))).sum(-1).sum(1)
    keep = _query_mask(attention_mask, b, length, rows, kl.device, kl.dtype)
    per_sample = (kl * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    return per_sample.mean()


def cls_cosine_loss(student: Tensor, teacher: Tensor, position: int = 0) -> Tensor:
    r"""Cosine distance between the student's and the teacher's [CLS] activations.

    .. math:: L_{cos} = \frac{1}{B}\sum_b \Big(1 - \frac{\langle h^S_b, h^T_b\rangle}
        {\lVert h^S_b\rVert\,\lVert h^T_b\rVert}\Big), \qquad h_b = H_{b,\,position,\,:}

    ``student`` and ``teacher``: hidden states ``(B, L, H)`` of one width H (project the student
    first when widths differ) → scalar in [0, 2]. ``position`` 0 is BERT's [CLS] token.
    """
    if student.dim() != 3 or student.shape != teacher.shape:
        raise ValueError(f"cls_cosine_loss needs student and teacher hidden states of one (B, L, H) shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if not -student.shape[1] <= position < student.shape[1]:
        raise ValueError(f"position must index the {student.shape[1]} tokens, got {position}")
    cos = F.cosine_similarity(fp32(student[:, position]), fp32(teacher[:, position]), dim=-1, eps=1e-8)
    return (1.0 - cos).mean()
