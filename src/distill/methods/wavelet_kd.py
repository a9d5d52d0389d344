"""Wavelet Knowledge Distillation for image-to-image generators (family "generative").

The math is :func:`distill.functional.wavelet_kd_loss`; this module reads the two generators'
output images (the views' ``"logits"``) and detaches the teacher's.
"""

from __future__ import annotations

from torch import Tensor

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods._views import check_maps, tap
from distill.methods.base import Method, Paper, register

WAVELET_KD_PAPER = Paper(
    title="Wavelet Knowledge Distillation: Towards Efficient Image-to-Image Translation",
    authors="L. Zhang, X. Chen, X. Tu, P. Wan, N. Xu, K. Ma",
    year=2022,
    arxiv="2203.06321",
    venue="CVPR",
)


@register("wavelet_kd", "generative", WAVELET_KD_PAPER)
class WaveletKD(Method):
    """Wavelet KD: ``sum_j mean |H_j(G_S(x)) - H_j(G_T(x))|`` over the high-frequency (LH, HL, HH)
    discrete-wavelet bands of ``levels`` levels of the generated images ``(B, C, H, W)``.

    Both views' ``"logits"`` are the generators' output images (an image-to-image model's output).
    The low band is left out (``include_low=True`` distils it too: the paper's "all bands" ablation).

    Defaults: Haar wavelet, 4 levels, zero padding, L1 per level summed over levels: the authors'
    published code (ArchipLab-LinfengZhang/wkd-datasets ``README.md``: ``DWTForward(J=4,
    mode='zero', wave='haar')``, ``l1_loss`` of the high bands per level). The paper's method and
    experiment sections could not be read here (only its abstract, which says the images are
    decomposed by the discrete wavelet transform and only the high-frequency bands are distilled).
    The loss weight is ours (``weight`` 1); :func:`distill.strategies.img2img.train_img2img` adds it to
    pix2pix's L1 (weight 100) and adversarial losses.
    """

    def __init__(self, levels: int = 4, wavelet: str = "haar", mode: str = "zero", include_low: bool = False,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"wavelet_kd: levels must be a positive int; got {levels!r}")
        self.levels, self.wavelet, self.mode, self.include_low = levels, str(wavelet), str(mode), bool(include_low)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s = tap(student_view, "logits", "student")
        t = tap(teacher_view, "logits", "teacher").detach()
        check_maps(s, t, "student:logits", "teacher:logits", "wavelet_kd (the generators' output images)")
        return DF.wavelet_kd_loss(s, t, self.levels, self.wavelet, self.mode, self.include_low)

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, wavelet={self.wavelet!r}, mode={self.mode!r}, include_low={self.include_low}, "
                f"weight={self.weight}")
