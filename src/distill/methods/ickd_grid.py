"""Grid-level ICKD for dense maps (segmentation): ICKD's channel correlation per spatial cell.

A method of its own rather than a ``grid`` argument on :class:`~distill.methods.relations.ICKD`:
it belongs to the segmentation family (so ``distill methods --family segmentation`` and the dense
benchmark find it), reads the segmenter's ``"feat"`` map by default instead of a classifier's
``"stage3"``, and carries three settings of its own; the channel adapter and tap handling are
ICKD's, inherited. The math is :func:`distill.functional.ickd_grid_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from distill import functional as DF
from distill.batch import Batch, View
from distill.functional.ickd_grid import PARTITIONS, REDUCTIONS, parse_grid
from distill.methods.base import register
from distill.methods.relations import ICKD, ICKD_PAPER


@register("ickd_grid", "segmentation", ICKD_PAPER)
class ICKDGrid(ICKD):
    """Grid-level ICKD: mean over an n x m grid of cells of (1/c^2) ||G_T - G_S||^2, G the channel correlation of a cell.

    The student's map passes through ICKD's 1x1 conv + BN adapter to the teacher's c channels
    (built by :meth:`prepare`); both maps are then cut into ``grid = (n, m)`` cells and compared
    cell by cell (:func:`distill.functional.ickd_grid_loss`; ``grid=(1, 1)`` is image-level ICKD).
    Only the paper's abstract and the authors' segmentation README (Pascal VOC, "mxn" 1x1 to
    32x32) could be read: the default grid (4, 4), ``partition="even"`` (cells differ by at most
    one row/column when the size does not divide), ``reduction="mean"`` and the ``"feat"`` taps
    (the segmenter's last map before the classifier) are ours; weight 1 as :class:`ICKD` (the
    official CIFAR code's 2.5 on a c-times larger loss is ``weight = 2.5·c``).
    """

    def __init__(
        self,
        student_tap: str = "feat",
        teacher_tap: str = "feat",
        grid: int | Sequence[int] = (4, 4),
        partition: str = "even",
        reduction: str = "mean",
        adapter: str = "conv1x1_bn",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(student_tap=student_tap, teacher_tap=teacher_tap, adapter=adapter, weight=weight,
                         warmup_epochs=warmup_epochs)
        self.grid = parse_grid(grid)  # the function's own validation, before any work
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.partition, self.reduction = partition, reduction

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.adapter is None:
            raise RuntimeError("ICKDGrid.prepare() must be called on an example batch before the first forward")
        s, t = self._pair(student_view, teacher_view)
        return DF.ickd_grid_loss(self.adapter(s), t, self.grid, self.partition, self.reduction)

    def extra_repr(self) -> str:
        return (f"{self.student_tap} -> {self.teacher_tap}, grid={self.grid}, partition={self.partition}, "
                f"reduction={self.reduction}, adapter={self.adapter_kind}, weight={self.weight}")


__all__ = ["ICKDGrid"]
