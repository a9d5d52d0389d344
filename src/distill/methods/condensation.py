"""Knowledge Condensation Distillation: KD that records each sample's knowledge value online."""

from __future__ import annotations

import torch
from torch import Tensor

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods.base import Method, Paper, register


@register(
    "kcd",
    "condensation",
    Paper(
        title="Knowledge Condensation Distillation",
        authors="C. Li, M. Lin, Z. Ding, N. Lin, Y. Zhuang, Y. Huang, X. Ding, L. Cao",
        year=2022,
        arxiv="2207.05409",
        venue="ECCV",
    ),
)
class KCD(Method):
    """Hinton KD (T^2 KL, batchmean) that also records each sample's value V = H(softmax(s)) online.

    The loss is the M-step of KCD (Eq. 11, KD on the condensed knowledge set); the value record is
    OGVE's online recording (Eqs. 7 and 12): after every training step the student's prediction
    entropy (temperature 1, no gradient) is folded into a running mean per sample, found by
    ``batch.index``, and the visit count ``F(x)`` grows. :func:`distill.strategies.condense.fit_condensed`
    reads :meth:`scores` to condense the set between stages; on its own, in any loop, the method is
    plain KD plus the record.

    Args:
        T: KD temperature (4, the reference code's ``--kd_T``).
        num_samples: the training set's size; otherwise taken from :meth:`bind_data` (``fit`` and
            ``fit_condensed`` call it).

    Buffers ``value`` (N,) float32 and ``count`` (N,) int64 hold the record (saved in checkpoints).
    Records are made in training mode only. The batch must carry ``index`` (e.g.
    ``InMemoryLoader(..., return_index=True)``).
    """

    def __init__(self, T: float = 4.0, num_samples: int | None = None, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if T <= 0:
            raise ValueError(f"temperature must be > 0, got {T}")
        self.T = float(T)
        self.register_buffer("value", None)  # (N,) running mean of the prediction entropy, Eq. 12
        self.register_buffer("count", None)  # (N,) F(x): how often each sample was trained on
        self._epoch_visits = 0
        if num_samples is not None:
            self.bind_data(num_samples, None)

    @property
    def num_samples(self) -> int | None:
        return None if self.value is None else int(self.value.numel())

    def bind_data(self, num_samples: int, targets: Tensor | None) -> None:
        """Size the record for ``num_samples`` samples; an existing record of that size is kept."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if self.value is None or self.value.numel() != num_samples:
            device = self.value.device if self.value is not None else None
            self.value = torch.zeros(num_samples, device=device)
            self.count = torch.zeros(num_samples, dtype=torch.long, device=device)

    def reset_values(self) -> None:
        """Forget every recorded value (start a new estimate)."""
        if self.value is not None:
            self.value.zero_()
            self.count.zero_()

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self._epoch_visits = 0

    def scores(self, alpha: float = 0.03) -> Tensor:
        """The cost-aware ranking score of every sample (Eq. 13), (N,)."""
        if self.value is None:
            raise RuntimeError("kcd has no value record yet: it was never told the training set's size")
        return DF.kcd_score(self.value, self.count, alpha)

    def log_values(self) -> dict[str, float]:
        """``samples``: samples trained on this epoch; ``value``: mean recorded value over the seen samples."""
        out: dict[str, float] = {"samples": float(self._epoch_visits)}
        if self.value is not None and bool((self.count > 0).any()):
            out["value"] = float(self.value[self.count > 0].mean())
        return out

    @torch.no_grad()
    def record(self, student_logits: Tensor, index: Tensor | None) -> None:
        """Fold the values of one batch into the record (Eq. 12)."""
        if index is None:
            raise ValueError(
                "kcd records each sample's value by its index, but the batch has none: use "
                "InMemoryLoader(..., return_index=True) or distill.strategies.condense.fit_condensed"
            )
        if self.value is None:
            raise RuntimeError(
                "kcd does not know the training set's size: pass KCD(num_samples=N), or call "
                "distiller.bind_data(N, targets) (fit does when the loader has .targets)"
            )
        if self.value.device != student_logits.device:  # bound before fit moved the models: follow them once
            self.value, self.count = self.value.to(student_logits.device), self.count.to(student_logits.device)
        index = index.to(self.value.device).reshape(-1)
        values = DF.kcd_value(student_logits.detach())
        self.value, self.count = DF.kcd_update_value(self.value, self.count, index, values)
        self._epoch_visits += int(index.numel())

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t = student_view["logits"], teacher_view["logits"].detach()
        if self.training:
            self.record(s, batch.index)
        return DF.kd_loss(s, t, self.T)

    def extra_repr(self) -> str:
        return f"T={self.T}, num_samples={self.num_samples}, weight={self.weight}"
