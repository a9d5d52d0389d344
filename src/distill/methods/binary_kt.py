"""Knowledge transfer to a binary-weight student (Xu et al., ICRA 2019, arXiv 1804.06332).

The student is the teacher's architecture with binary weights (:func:`distill.models.binary.binarize`);
this method is the transfer loss between their feature maps, to be weighted beside the task loss
(``losses={"ce": 1.0, "binary_kt": ...}``). The math is :func:`distill.functional.binary_kt_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import build_adapter
from distill.batch import Batch, View
from distill.methods._views import tap as _tap, tap_pairs as _pairs
from distill.methods.base import Method, Paper, register

BINARY_KT_PAPER = Paper(
    title="Training a Binary Weight Object Detector by Knowledge Transfer for Autonomous Driving",
    authors="J. Xu, P. Wang, H. Yang, A. M. López",
    year=2018,
    arxiv="1804.06332",
    venue="ICRA 2019",
)


@register("binary_kt", "features", BINARY_KT_PAPER)
class BinaryKT(Method):
    """Binary-weight knowledge transfer: ``sum_pairs 1/2 · mean (r(F_s) - F_t)^2`` between tapped feature maps.

    ``F_s`` ``(B, C_s, H, W)`` is the binary-weight student's map, ``F_t`` ``(B, C_t, H, W)`` the
    full-precision teacher's (detached); ``r`` is the identity when the shapes agree — the paper's
    setting, the student being the teacher's architecture with binary weights — else a 1x1 conv built
    by :meth:`prepare` (ours, so that a narrower binary student can be taught too).

    Defaults (ours: only the paper's abstract could be read here): one pair, the last stage's
    output (``stage3``, the map the zoo's CNNs pool and classify — the detector's analogue is the map
    its detection head reads), weight 1 beside the task loss. The paper trains binary-weight YOLO-v2
    detectors on KITTI; this library's runnable setting is the classification analogue on
    Fashion-MNIST/digits (``benchmarks/compression_binary.py``).
    """

    requires_prepare = True  # the 1x1 conv (when the shapes differ) is built before the optimizer

    def __init__(self, pairs: Sequence[tuple[str, str]] = (("stage3", "stage3"),), weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = _pairs(pairs, "binary_kt")
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]
        self.adapters: nn.ModuleList | None = None

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        adapters = []
        for s_name, t_name in self.pairs:
            s, t = _tap(student_view, s_name, "student"), _tap(teacher_view, t_name, "teacher")
            adapters.append(nn.Identity() if s.shape == t.shape else build_adapter(
                s, t, student_name=f"student:{s_name}", teacher_name=f"teacher:{t_name}", kind="conv1x1"
            ).to(device=s.device, dtype=s.dtype))
        self.adapters = nn.ModuleList(adapters)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.adapters is None:
            raise RuntimeError("binary_kt.prepare() must run on an example batch first (Distiller.prepare)")
        total: Tensor | None = None
        for (s_name, t_name), adapter in zip(self.pairs, self.adapters):
            s = adapter(_tap(student_view, s_name, "student"))
            loss = DF.binary_kt_loss(s, _tap(teacher_view, t_name, "teacher").detach())
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, weight={self.weight}"
