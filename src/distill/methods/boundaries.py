"""Pre-ReLU feature methods of Heo et al.: activation boundaries (AB) and the overhaul of feature
distillation (OFD).

Both read the pre-activation taps ``"stageK.pre"`` of the two networks and map the student's
feature to the teacher's channels with a connector (1x1 conv + BN) built by :meth:`prepare`.
The math lives in :mod:`distill.functional.boundaries`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError, build_adapter
from distill.batch import Batch, View
from distill.methods._views import tap as _tap, tap_pairs
from distill.methods.base import Method, Paper, register

_STAGES = (("stage1.pre", "stage1.pre"), ("stage2.pre", "stage2.pre"), ("stage3.pre", "stage3.pre"))
_SHORTCUT_NAMES = ("shortcut", "downsample", "skip", "proj", "projection", "residual_conv")




def _key(s: str, t: str) -> str:
    return f"{s}__{t}".replace(".", "_")


def _init_connector(module: nn.Module) -> None:
    """He-normal (fan-out) convs, BN γ = 1, β = 0: the authors' connector initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ConnectedPairs(Method):
    """Shared plumbing: layer pairs, one connector per pair built from example shapes."""

    requires_prepare = True

    def __init__(self, pairs: Sequence[tuple[str, str]], layer_weights: Sequence[float] | None, adapter: str,
                 weight: float, warmup_epochs: int) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = tap_pairs(pairs, type(self).__name__)
        self.layer_weights = None if layer_weights is None else tuple(float(w) for w in layer_weights)
        if self.layer_weights is not None and len(self.layer_weights) != len(self.pairs):
            raise ValueError(f"layer_weights has {len(self.layer_weights)} entries for {len(self.pairs)} pairs")
        self.adapter_kind = adapter
        self.student_taps = list(dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_taps = list(dict.fromkeys(t for _, t in self.pairs))
        self.connectors: nn.ModuleDict | None = None

    def _features(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        ss, ts = [], []
        for s_path, t_path in self.pairs:
            s = _tap(student_view, s_path, "student")
            t = _tap(teacher_view, t_path, "teacher")
            if s.dim() != 4 or t.dim() != 4:
                raise ShapeMismatchError(
                    f"{self.name} needs (B, C, H, W) feature maps: student:{s_path} {tuple(s.shape)}, "
                    f"teacher:{t_path} {tuple(t.shape)}"
                )
            ss.append(s)
            ts.append(t)
        return ss, ts

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        ss, ts = self._features(student_view, teacher_view)
        if self.connectors is not None:  # idempotent: keep (possibly trained) connectors
            return
        connectors = {}
        for (s_path, t_path), s, t in zip(self.pairs, ss, ts):
            c = build_adapter(s, t, student_name=f"student:{s_path}", teacher_name=f"teacher:{t_path}",
                              kind=self.adapter_kind)
            _init_connector(c)
            connectors[_key(s_path, t_path)] = c.to(device=s.device, dtype=s.dtype)
        self.connectors = nn.ModuleDict(connectors)

    def hint_parameters(self) -> list[nn.Parameter]:
        """The connectors' parameters (empty before :meth:`prepare`)."""
        return [] if self.connectors is None else list(self.connectors.parameters())

    def _connected(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        if self.connectors is None:
            raise RuntimeError(
                f"{type(self).__name__}.prepare() must be called on an example batch before the first forward "
                "(it builds the connectors; Distiller.prepare / fit do this)"
            )
        ss, ts = self._features(student_view, teacher_view)
        rs = [self.connectors[_key(sp, tp)](s) for (sp, tp), s in zip(self.pairs, ss)]
        return rs, [t.detach() for t in ts]


@register(
    "ab",
    "features",
    Paper(
        title="Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons",
        authors="B. Heo, M. Lee, S. Yun, J. Y. Choi",
        year=2019,
        arxiv="1811.03233",
        venue="AAAI",
    ),
)
class AB(_ConnectedPairs):
    """Activation-boundary distillation: hinge-squared loss on the sign of connected pre-ReLU features.

    For each pair j, ``L_j = 1/B Σ_b ||ρ(T) ⊙ σ(μ − r(S)) + (1 − ρ(T)) ⊙ σ(μ + r(S))||²``
    (:func:`distill.functional.ab_alternative_loss`), summed over pairs with ``layer_weights``
    (default all 1). ``r`` is a connector (1x1 conv + BN) per pair, built by :meth:`prepare`.

    The paper uses this loss to *initialise* the student (and connectors) before ordinary
    training: run that stage with ``distill.fit_hint_stage(distiller, loader, method="ab",
    epochs=...)``, which trains with this loss alone (only the student layers below the deepest
    tapped position and the connectors move), then ``fit`` the same Distiller with CE/KD and
    ``ab`` removed or weighted 0. RepDistiller runs 30 init epochs (``--init_epochs``) on all
    feature modules, then KD.

    Defaults follow the paper: μ = 1, weight 1, equal layer weights. The authors' CIFAR code (and
    RepDistiller) scales the layers 1/4, 1/2, 1 and the total by 3/1000: ``AB(layer_weights=(0.25,
    0.5, 1.0), weight=3e-3)`` reproduces it. With the paper's unscaled sum over all neurons, use a
    small learning rate for the init stage (the loss grows with C·H·W).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = _STAGES,
        margin: float = 1.0,
        layer_weights: Sequence[float] | None = None,
        adapter: str = "conv1x1_bn",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(pairs, layer_weights, adapter, weight, warmup_epochs)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        rs, ts = self._connected(student_view, teacher_view)
        return DF.ab_loss(rs, ts, self.margin, self.layer_weights)

    @torch.no_grad()
    def agreement(self, student_view: View, teacher_view: View) -> list[float]:
        """Per pair, the fraction of neurons whose activation (r(S) > 0) agrees with the teacher's."""
        rs, ts = self._connected(student_view, teacher_view)
        return [float(DF.activation_agreement(r, t)) for r, t in zip(rs, ts)]

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, margin={self.margin}, layer_weights={self.layer_weights}, weight={self.weight}"


# --------------------------------------------------------------------------------------------
# OFD
# --------------------------------------------------------------------------------------------


def _unwrap_model(teacher: Any) -> nn.Module:
    from distill.teachers import TeacherSource

    if isinstance(teacher, TeacherSource):
        model = getattr(teacher, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the teacher source {type(teacher).__name__} holds no single model to read BNs from")
        return model
    if isinstance(teacher, nn.Module):
        return teacher
    raise TypeError(f"expected the teacher nn.Module (or a FrozenTeacher), got {type(teacher).__name__}")


def _example_input(model: nn.Module) -> Tensor:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError("cannot guess an input shape for a model without Conv2d layers: pass example=")
    p = next(model.parameters())
    return torch.zeros(2, first_conv.in_channels, 32, 32, device=p.device, dtype=p.dtype)


def find_bn_before(model: nn.Module, taps: Sequence[str], example: Tensor | None = None) -> list[str]:
    """For each tap path, the name of the BatchNorm whose output produces the tap's input.

    Runs one forward (eval mode, no grad) with hooks on every BatchNorm and on the taps. A BN
    whose output tensor *is* the tap's input wins (plain conv-BN stages, WRN's ``stageK.norm``).
    Otherwise (a residual sum ``bn2(...) + shortcut(x)``) the last BN executed before the tap
    with the tap's channel count, outside a shortcut/downsample branch, is taken: the residual
    branch's last BN, as the OFD authors do. Raises ``ValueError`` when none qualifies.
    """
    example = _example_input(model) if example is None else example
    bn_names = {m: n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    calls: list[tuple[str, Tensor]] = []
    tap_inputs: dict[str, tuple[int, Tensor]] = {}
    handles = []

    def bn_hook(mod: nn.Module, inp: Any, out: Tensor) -> None:
        calls.append((bn_names[mod], out))

    def tap_hook(path: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            if path not in tap_inputs:
                x = inp[0] if isinstance(inp, tuple) and inp else out
                tap_inputs[path] = (len(calls), x)
        return hook

    try:
        for m in bn_names:
            handles.append(m.register_forward_hook(bn_hook))
        for path in taps:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                raise KeyError(f"the teacher has no module {path!r} to tap") from None
            handles.append(mod.register_forward_hook(tap_hook(path)))
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                model(example)
        finally:
            for m, mode in modes.items():
                m.training = mode
    finally:
        for h in handles:
            h.remove()

    found = []
    for path in taps:
        if path not in tap_inputs:
            raise ValueError(f"tap {path!r} was not executed in the teacher's forward")
        n_before, x = tap_inputs[path]
        before = calls[:n_before]
        exact = [name for name, out in before if out is x]
        if exact:
            found.append(exact[-1])
            continue
        channels = x.shape[1] if x.dim() >= 2 else None
        candidates = [
            name for name, out in before
            if out.dim() >= 2 and out.shape[1] == channels
            and not any(part in _SHORTCUT_NAMES for part in name.split("."))
        ]
        if not candidates:
            raise ValueError(
                f"no BatchNorm with {channels} channels runs before teacher tap {path!r}: pass bn_paths= "
                "(the BN producing the pre-ReLU feature) or precomputed margins="
            )
        found.append(candidates[-1])
    return found


@register(
    "ofd",
    "features",
    Paper(
        title="A Comprehensive Overhaul of Feature Distillation",
        authors="B. Heo, J. Kim, S. Yun, H. Park, N. Kwak, J. Y. Choi",
        year=2019,
        arxiv="1904.01866",
        venue="ICCV",
    ),
)
class OFD(_ConnectedPairs):
    """Overhaul of feature distillation: margin-ReLU teacher, connected student, partial L2, pre-ReLU.

    ``L = Σ_j w_j 1/B Σ_b d_p(σ_{m_j}(T_j), r_j(S_j))`` (:func:`distill.functional.ofd_loss`):
    ``T_j`` the teacher's pre-ReLU feature, ``σ_m(x) = max(x, m)`` with the per-channel margin
    ``m = E[x | x < 0]`` of the teacher BN's Gaussian (:func:`distill.functional.ofd_margin`),
    ``r_j`` a 1x1 conv + BN connector, ``d_p`` the partial L2 that skips ``S ≤ T ≤ 0``.

    The margins come from the teacher's BatchNorm layers: given none, the Distiller's
    :meth:`prepare` finds the BN before each teacher tap (:meth:`bind_models`, with one forward
    of two example inputs), so ``{"ofd": {}}`` works in a recipe. Or build with
    :meth:`OFD.from_teacher`, or pass ``margins`` (one ``(C,)`` tensor per pair) or ``teacher_bn``
    (one BatchNorm module, or ``(weight, bias)``, per pair; margins are computed at
    construction, the modules are not kept).

    Defaults: weight α = 1e-3 (the paper's CIFAR setting; 1e-4 on ImageNet), equal layer weights.
    The authors' code also divides position j of n by 2^(n-1-j): ``layer_weights=(0.25, 0.5, 1.0)``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = _STAGES,
        margins: Sequence[Tensor] | None = None,
        teacher_bn: Sequence[Any] | None = None,
        layer_weights: Sequence[float] | None = None,
        adapter: str = "conv1x1_bn",
        weight: float = 1e-3,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(pairs, layer_weights, adapter, weight, warmup_epochs)
        if margins is not None and teacher_bn is not None:
            raise ValueError("pass either margins or teacher_bn, not both")
        if teacher_bn is not None:
            margins = [self._margin_of(bn, i) for i, bn in enumerate(teacher_bn)]
        self.has_margins = margins is not None
        if margins is not None:
            self._set_margins(margins)

    def _set_margins(self, margins: Sequence[Tensor]) -> None:
        margins = list(margins)
        if len(margins) != len(self.pairs):
            raise ValueError(f"got {len(margins)} margins for {len(self.pairs)} pairs")
        for i, m in enumerate(margins):
            m = torch.as_tensor(m, dtype=torch.get_default_dtype()).detach().clone()
            if m.dim() != 1:
                raise ValueError(f"margin {i} must be a (C,) tensor, got shape {tuple(m.shape)}")
            self.register_buffer(f"margin_{i}", m)
        self.has_margins = True

    @staticmethod
    def _teacher_bns(model: nn.Module, pairs: Sequence[tuple[str, str]], bn_paths: Sequence[str] | None,
                     example: Tensor | None) -> tuple[list[str], list[nn.Module]]:
        if bn_paths is None:
            bn_paths = find_bn_before(model, [t for _, t in pairs], example)
        if len(bn_paths) != len(pairs):
            raise ValueError(f"got {len(bn_paths)} bn_paths for {len(pairs)} pairs")
        bns = []
        for p in bn_paths:
            try:
                bns.append(model.get_submodule(p))
            except AttributeError:
                raise KeyError(f"the teacher has no module {p!r}") from None
        return list(bn_paths), bns

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        """Margins from the teacher's BatchNorms when none were given (so recipes need no Python)."""
        if self.has_margins or teacher is None:
            return
        param = next(teacher.parameters(), None)
        x = example.inputs[:2]
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        self.bn_paths, bns = self._teacher_bns(teacher, self.pairs, None, x)
        self._set_margins([self._margin_of(bn, i) for i, bn in enumerate(bns)])

    @staticmethod
    def _margin_of(bn: Any, i: int) -> Tensor:
        if isinstance(bn, str):
            raise TypeError(
                f"teacher_bn[{i}] is a path ({bn!r}); a method cannot see the teacher model: use "
                "OFD.from_teacher(teacher_model, pairs, bn_paths=[...]) or pass the BatchNorm modules"
            )
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            if not bn.affine:
                raise ValueError(f"teacher_bn[{i}] has no affine parameters; pass margins= instead")
            return DF.ofd_margin(bn.weight.detach().float(), bn.bias.detach().float())
        if isinstance(bn, (tuple, list)) and len(bn) == 2:
            return DF.ofd_margin(torch.as_tensor(bn[0]).float(), torch.as_tensor(bn[1]).float())
        raise TypeError(f"teacher_bn[{i}] must be a BatchNorm module or (weight, bias), got {type(bn).__name__}")

    @classmethod
    def from_teacher(
        cls,
        teacher: Any,
        pairs: Sequence[tuple[str, str]] = _STAGES,
        bn_paths: Sequence[str] | None = None,
        example: Tensor | None = None,
        **kwargs: Any,
    ) -> OFD:
        """An OFD whose margins come from ``teacher``'s BatchNorms (a module or a ``FrozenTeacher``).

        ``bn_paths``: the BN module producing each teacher tap's pre-ReLU feature; default: found
        by :func:`find_bn_before` with one forward on ``example`` (default: zeros ``(2, C_in, 32,
        32)``, C_in from the first conv). Other keyword arguments go to ``OFD(...)``.
        """
        model = _unwrap_model(teacher)
        pairs = [(str(s), str(t)) for s, t in pairs]
        paths, bns = cls._teacher_bns(model, pairs, bn_paths, example)
        method = cls(pairs=pairs, teacher_bn=bns, **kwargs)
        method.bn_paths = paths
        return method

    def margin_list(self) -> list[Tensor]:
        """The per-pair ``(C,)`` margins; a clear error when none were given."""
        if not self.has_margins:
            raise RuntimeError(
                "OFD needs the teacher's per-channel margins (from the BN before each teacher tap): build it with "
                "OFD.from_teacher(teacher_model, pairs), or pass margins=[...] or teacher_bn=[...]"
            )
        return [getattr(self, f"margin_{i}") for i in range(len(self.pairs))]

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        margins = self.margin_list()
        for (_, t_path), m in zip(self.pairs, margins):
            t = _tap(teacher_view, t_path, "teacher")
            if t.dim() < 2 or t.shape[1] != m.shape[0]:
                raise ShapeMismatchError(
                    f"the margin for teacher:{t_path} has {m.shape[0]} channels but the tap is {tuple(t.shape)}: "
                    "was it computed from the BN that produces this tap?"
                )
        super().prepare(student_view, teacher_view, batch)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        rs, ts = self._connected(student_view, teacher_view)
        return DF.ofd_loss(rs, ts, self.margin_list(), self.layer_weights)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, layer_weights={self.layer_weights}, weight={self.weight}"


__all__ = ["AB", "OFD", "find_bn_before"]
