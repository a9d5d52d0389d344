"""Knowledge distillation from internal representations (Aguilar et al., AAAI 2020): a BERT-style
student learns the teacher's self-attention distributions (KL, per head) and [CLS] activations
(cosine) at mapped layers, then the teacher's soft labels, all at once or layer by layer.

``forward`` returns the *unweighted* loss; the math lives in
:mod:`distill.functional.internal_reps`. It reads Hugging Face output taps (``attentions.N``,
``hidden_states.N``): load both encoders with ``attn_implementation="eager"`` (sdpa and flash
attention return no attention weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.functional.internal_reps import attention_kl_loss, cls_cosine_loss, uniform_layer_map
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

_SCHEDULES = ("all", "progressive", "stacked")
_ROWS = ("all", "cls")


def _layer_pairs(layer_map: Sequence[Sequence[int]] | None, student_layers: int,
                 teacher_layers: int) -> list[tuple[int, int]]:
    if layer_map is None:
        return uniform_layer_map(student_layers, teacher_layers)
    pairs = []
    for pair in layer_map:
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
            raise ValueError(f"layer_map entries must be (student_layer, teacher_layer) pairs of 1-based layer "
                             f"numbers, got {pair!r} in {list(layer_map)!r}")
        pairs.append((int(pair[0]), int(pair[1])))
    if not pairs:
        raise ValueError("layer_map is empty: give at least one (student_layer, teacher_layer) pair")
    if len({s for s, _ in pairs}) != len(pairs):
        raise ValueError(f"layer_map maps a student layer twice: {pairs}")
    return sorted(pairs)


def _check_distribution(attn: Tensor, who: str) -> None:
    """Attention rows must be probabilities: Hugging Face's eager attention returns the weights *after*
    attention dropout, which in training mode are neither normalised nor a distribution."""
    with torch.no_grad():
        worst = (attn.detach().float().sum(-1) - 1.0).abs().max().item() if attn.numel() else 0.0
    if worst > 1e-3:
        raise ValueError(
            f"internal_reps: the {who} attention rows do not sum to 1 (off by up to {worst:.3g}): Hugging Face returns "
            "attention weights after attention dropout, so train the student with attention_probs_dropout_prob=0 "
            "(config) for the KL to compare distributions")


@register(
    "internal_reps",
    "transformer",
    Paper(
        title="Knowledge Distillation from Internal Representations",
        authors="G. Aguilar, Y. Ling, Y. Zhang, B. Yao, X. Fan, C. Guo",
        year=2020,
        arxiv="1910.03723",
        venue="AAAI",
    ),
)
class InternalReps(Method):
    """Self-attention KL and [CLS] cosine at mapped layers, plus soft labels, on a layer schedule.

    For each mapped pair (student layer j, teacher layer g(j)):

    .. math::
        L_j = w_{att}\\,\\frac{1}{|T|}\\sum_{t}\\sum_{a=1}^{A} \\mathrm{KL}\\big(x^{g(j)}_{a,t}\\,\\|\\,y^{j}_{a,t}\\big)
            + w_{cos}\\,\\big(1 - \\cos(h^{S,j}_{[CLS]},\\,h^{T,g(j)}_{[CLS]})\\big)

    x, y: the teacher's and student's attention rows (``attentions.{g(j)-1}``, ``attentions.{j-1}``,
    each ``(B, A, L, L)``, same head count A); h: the hidden states after the layer
    (``hidden_states.{j}``, ``(B, L, H)``), at the [CLS] position 0. When the student's width
    differs from the teacher's, a trainable linear map (built by :meth:`prepare`) projects the
    student's [CLS] vector first (the paper keeps BERT's width, so it has none). The soft-label term
    is Hinton KD on the logits ``(B, K)``, ``kd_weight · T² KL(softmax(t/T) ‖ softmax(s/T))``.

    ``schedule`` (the paper's algorithms; the epoch comes from ``Distiller.set_epoch``/``fit``):

    - ``"all"``: every mapped layer and the soft labels at once, Σ_j L_j + L_KD;
    - ``"progressive"`` (PID): bottom-up, one layer at a time — stage k (epochs
      k·E … (k+1)·E − 1, E = ``epochs_per_layer``) trains L_k alone; after the last mapped layer,
      the soft labels alone;
    - ``"stacked"`` (SID): bottom-up, accumulating — stage k trains Σ_{j≤k} L_j; then the soft
      labels alone.

    Used outside ``fit`` without ``set_epoch`` (epoch unknown), the staged schedules act as ``"all"``.

    The student's attention dropout must be 0 (``attention_probs_dropout_prob=0.0``): Hugging Face's
    eager attention returns the weights after dropout, which in training mode are not
    distributions; the method raises a clear error when a row does not sum to 1.

    Defaults: the layer map skips uniformly (``student_layers=6``, ``teacher_layers=12``: student
    layer j learns teacher layer 2j, the paper's BERT-base → 6-layer setting); attention KL on all
    query rows, summed over heads (``attention_rows="all"``; ``"cls"`` keeps only the [CLS] row);
    cosine on the [CLS] vector. Source note: the arXiv id, title, authors and the two losses
    (attention-probability KL and [CLS]-activation cosine, bottom-up PID/SID algorithms) are checked
    against the abstract and summaries; the full text could not be read offline, so the equation's
    normalisation (1/T Σ_t Σ_a) and the last-layer-to-last-layer map are as recalled from the paper,
    while ``epochs_per_layer=1``, ``T=1`` and the unit weights are ours (the paper's stage lengths
    and loss weights are not given here).

    Args:
        student_layers, teacher_layers: layer counts for the default uniform map.
        layer_map: explicit ``[(student_layer, teacher_layer), ...]`` (1-based), overriding the above.
        attention_weight, hidden_weight, kd_weight: weights of the three terms (0 switches one off).
        attention_rows: ``"all"`` or ``"cls"``.
        schedule: ``"all"``, ``"progressive"`` or ``"stacked"``.
        epochs_per_layer: epochs per stage of the staged schedules.
        T: temperature of the soft-label term.
    """

    requires_prepare = True  # the projection, when widths differ

    def __init__(
        self,
        student_layers: int = 6,
        teacher_layers: int = 12,
        layer_map: Sequence[Sequence[int]] | None = None,
        attention_weight: float = 1.0,
        hidden_weight: float = 1.0,
        kd_weight: float = 1.0,
        attention_rows: str = "all",
        schedule: str = "all",
        epochs_per_layer: int = 1,
        T: float = 1.0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        if attention_rows not in _ROWS:
            raise ValueError(f"attention_rows must be one of {_ROWS}, got {attention_rows!r}")
        if isinstance(epochs_per_layer, bool) or not isinstance(epochs_per_layer, int) or epochs_per_layer < 1:
            raise ValueError(f"epochs_per_layer must be an int >= 1, got {epochs_per_layer!r}")
        if not T > 0 or T == float("inf"):
            raise ValueError(f"temperature T must be a finite number > 0, got {T}")
        terms = {"attention_weight": attention_weight, "hidden_weight": hidden_weight, "kd_weight": kd_weight}
        for name, w in terms.items():
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        if not any(terms.values()):
            raise ValueError(f"at least one of {sorted(terms)} must be > 0, got {terms}")
        self.pairs = _layer_pairs(layer_map, student_layers, teacher_layers)
        self.attention_weight, self.hidden_weight = float(attention_weight), float(hidden_weight)
        self.kd_weight, self.T = float(kd_weight), float(T)
        self.attention_rows, self.schedule, self.epochs_per_layer = attention_rows, schedule, epochs_per_layer
        s_taps, t_taps = [], []
        for s, t in self.pairs:
            if self.attention_weight:
                s_taps.append(f"attentions.{s - 1}")
                t_taps.append(f"attentions.{t - 1}")
            if self.hidden_weight:
                s_taps.append(f"hidden_states.{s}")
                t_taps.append(f"hidden_states.{t}")
        self.student_taps, self.teacher_taps = s_taps, t_taps
        self.proj: nn.Module | None = None

    def stage(self) -> int | None:
        """The current stage of a staged schedule: k < len(pairs) trains layer k's terms (0-based in
        the map's order), len(pairs) the soft labels; ``None`` for ``"all"`` or an unknown epoch."""
        if self.schedule == "all" or self.epoch is None:
            return None
        return min(self.epoch // self.epochs_per_layer, len(self.pairs))

    def active_pairs(self) -> list[tuple[int, int]]:
        """The (student_layer, teacher_layer) pairs trained now."""
        k = self.stage()
        if k is None:
            return list(self.pairs)
        if k >= len(self.pairs):
            return []
        return [self.pairs[k]] if self.schedule == "progressive" else list(self.pairs[: k + 1])

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.proj is not None or not self.hidden_weight:
            return
        s_layer, t_layer = self.pairs[0]
        s = _tap(student_view, f"hidden_states.{s_layer}", "student")
        t = _tap(teacher_view, f"hidden_states.{t_layer}", "teacher")
        if s.dim() != 3 or t.dim() != 3:
            raise ShapeMismatchError(f"internal_reps needs (B, L, H) hidden states, got student {tuple(s.shape)}, "
                                     f"teacher {tuple(t.shape)}")
        self.proj = (nn.Identity() if s.shape[-1] == t.shape[-1]
                     else nn.Linear(s.shape[-1], t.shape[-1], bias=False).to(device=s.device, dtype=s.dtype))

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        mask = getattr(batch, "attention_mask", None)
        terms: list[Tensor] = []
        for s_layer, t_layer in self.active_pairs():
            if self.attention_weight:
                ys = _tap(student_view, f"attentions.{s_layer - 1}", "student")
                xt = _tap(teacher_view, f"attentions.{t_layer - 1}", "teacher").detach()
                if ys.shape != xt.shape:
                    raise ShapeMismatchError(
                        f"internal_reps compares attentions head by head: student layer {s_layer} "
                        f"{tuple(ys.shape)} vs teacher layer {t_layer} {tuple(xt.shape)} (B, heads, L, L); give "
                        "the student as many heads as the teacher and feed both the same tokens")
                _check_distribution(ys, f"student layer {s_layer}")
                terms.append(self.attention_weight * attention_kl_loss(ys, xt, mask, self.attention_rows))
            if self.hidden_weight:
                if self.proj is None:
                    raise RuntimeError("InternalReps.prepare() must be called on an example batch before the first "
                                       "forward (Distiller.prepare / fit do it)")
                hs = _tap(student_view, f"hidden_states.{s_layer}", "student")
                ht = _tap(teacher_view, f"hidden_states.{t_layer}", "teacher").detach()
                terms.append(self.hidden_weight * cls_cosine_loss(self.proj(hs[:, :1]), ht[:, :1]))
        k = self.stage()
        if self.kd_weight and (k is None or k >= len(self.pairs)):
            s_logits = _tap(student_view, "logits", "student")
            t_logits = _tap(teacher_view, "logits", "teacher").detach()
            terms.append(self.kd_weight * DF.kd_loss(s_logits, t_logits, self.T))
        if not terms:  # a stage whose terms are all switched off: zero, but still on the graph
            return _tap(student_view, "logits", "student").sum() * 0.0
        return torch.stack(terms).sum()

    def extra_repr(self) -> str:
        return (f"pairs={self.pairs}, attention_weight={self.attention_weight}, hidden_weight={self.hidden_weight}, "
                f"kd_weight={self.kd_weight}, attention_rows={self.attention_rows!r}, schedule={self.schedule!r}, "
                f"epochs_per_layer={self.epochs_per_layer}, T={self.T}, weight={self.weight}")
