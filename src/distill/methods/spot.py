"""Spot-adaptive knowledge distillation (SAKD): a policy picks, per sample, the spots to distill at."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call

from distill import functional as DF
from distill.adapters import build_adapter
from distill.batch import Batch, View
from distill.methods._views import check_maps, module_key, tap, tap_pairs
from distill.methods.base import Method, Paper, register
from distill.taps import resolve
from distill.teachers import FrozenTeacher, TeacherSource, freeze

StageSpec = str | Sequence[str]

ZOO_STAGES: tuple[StageSpec, ...] = (("stem", "stage1"), "stage2", "stage3", ("head", "avgpool", "pool", "fc"))
"""The stages of every 3-stage network of the CIFAR zoo (:mod:`distill.models.cifar`: ResNets, WRNs,
ShuffleNets): stem + stage 1, stage 2, stage 3, then the head (1x1 conv or identity), global
average pooling, flatten and classifier. Their outputs are the taps ``stage1..3`` and the logits."""


class StageSplit:
    """A model run stage by stage: ``stages`` lists, in forward order, the module paths that make
    up each stage (a path, or a sequence of paths run one after the other).

    Running every stage in turn must reproduce the model's forward (``model(x)``); only models
    whose forward is such a chain of submodules can be split (the CIFAR zoo: :data:`ZOO_STAGES`).
    The model is held by reference, not registered as a submodule, so a method holding a split
    does not save, move or switch the mode of the model.

    A stage call casts a floating input to the dtype and device of the model's first parameter
    and its output back, so a teacher kept in another dtype or on another device (see
    :class:`~distill.teachers.FrozenTeacher`) can still be routed through.
    """

    def __init__(self, model: nn.Module, stages: Sequence[StageSpec], *, model_name: str = "model") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"the {model_name} must be an nn.Module to split into stages, got {type(model).__name__}")
        self.model = model
        self.model_name = model_name
        self.stages = normalise_stages(stages, model_name)
        for paths in self.stages:
            for path in paths:
                if ":" in path:
                    raise ValueError(f"{model_name} stage path {path!r}: give module paths, without ':input'/':output'")
        self.modules = [[resolve(model, p, model_name=model_name) for p in paths] for paths in self.stages]

    def __len__(self) -> int:
        return len(self.stages)

    def __call__(self, k: int, x: Tensor, *, detach_params: bool = False) -> Tensor:
        """Stage ``k`` (0-based) on ``x``. ``detach_params``: the stage's parameters take no
        gradient (the input still does), so a loss through it does not train this model."""
        ref = next(self.model.parameters(), None)
        back = None
        if ref is not None and x.is_floating_point() and (x.dtype != ref.dtype or x.device != ref.device):
            back = (x.dtype, x.device)
            x = x.to(device=ref.device, dtype=ref.dtype)
        for module in self.modules[k]:
            if detach_params:
                params = {n: p.detach() for n, p in module.named_parameters()}
                x = functional_call(module, params, (x,), strict=False)
            else:
                x = module(x)
        if back is not None and x.is_floating_point():
            x = x.to(dtype=back[0], device=back[1])
        return x

    def outputs(self, x: Tensor) -> list[Tensor]:
        """Every stage's output, in order (the last is the model's output)."""
        outs = []
        for k in range(len(self)):
            x = self(k, x)
            outs.append(x)
        return outs

    def describe(self, k: int) -> str:
        return f"{self.model_name} stage {k} ({' -> '.join(self.stages[k])})"


def normalise_stages(stages: Sequence[StageSpec], what: str) -> list[tuple[str, ...]]:
    """Stage specs as tuples of module paths; a clear error for an empty list or stage."""
    if isinstance(stages, str) or not stages:
        raise ValueError(f"{what} stages must be a non-empty list of module paths (or lists of them), got {stages!r}")
    out = []
    for k, spec in enumerate(stages):
        paths = (spec,) if isinstance(spec, str) else tuple(spec)
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"{what} stage {k} must be a module path or a non-empty list of them, got {spec!r}")
        out.append(paths)
    return out


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each module's own mode restored after."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@register(
    "spot_adaptive",
    "features",
    Paper(
        title="Spot-adaptive Knowledge Distillation",
        authors="J. Song, Y. Chen, J. Ye, M. Song",
        year=2022,
        arxiv="2205.02399",
        venue="IEEE Transactions on Image Processing",
    ),
)
class SpotAdaptive(Method):
    """Spot-adaptive KD: per-sample Gumbel decisions route a teacher/student multi-path network and gate the spot losses.

    Candidate spots are ``pairs`` of (student_tap, teacher_tap) feature maps (B, C, H, W); each has
    a FitNets regressor r_k (``adapter``, 1x1 conv + BN by default) and the per-sample hint loss
    ℓ_bk = ½‖T_k(x_b) − r_k(S_k(x_b))‖². A policy network (global average pooling of the spot
    features, concatenated: the student's only, or with the teacher's when ``policy_input="both"``;
    then one Linear layer, or Linear-ReLU-Linear with ``hidden`` > 0 units) emits per-sample
    two-way logits {0: student / skip, 1: teacher / distill} per decision; decisions d_bk are
    drawn by Gumbel-softmax (straight-through hard by default) with noise from a generator owned
    by the method (``seed``), at a temperature going linearly from ``tau_start`` (epoch 0) to
    ``tau_end`` (last epoch) (:meth:`on_epoch_start`). In eval mode, or with
    ``deterministic=True``, a decision is the policy's argmax. :attr:`last_decisions` holds the
    latest (B, N) decisions; :meth:`set_decisions` injects fixed ones (tests, ablations).

    ``routing=True`` (the paper's method). Teacher and student are split into the same number
    N = K + 1 of stages (``student_stages`` / ``teacher_stages``: module paths, see
    :class:`StageSplit`; the default :data:`ZOO_STAGES` fits the 3-stage CIFAR zoo), stage k
    ending at spot k (its output must be the tap ``pairs[k]``) and the last stage in the logits.
    The N decisions per sample route the multi-path network :func:`~distill.functional.spot_route`
    (stage k through the teacher when d_bk = 1), whose adapters A^k_{s→t}, A^k_{t→s} (built like
    r_k, then a ReLU) convert features between the networks at the spots. The returned loss is

        L = hint · (1/B) Σ_b Σ_{k<N} d_bk ℓ_bk  +  kd · (1/B) Σ_b d_bN T² KL(p_t^T ‖ p_s^T)_b
            + route · L_route(y),

    where d in the first two terms is detached (a decision switches distillation at a spot on or
    off: the hint losses at the spots and Hinton KD of the student's logits at the output spot),
    and L_route = CE(y, targets) + max(0, ½B − Σ_b d_bN) (:func:`~distill.functional.spot_route_loss`)
    is the routed network's task loss. Only the policy and the routing adapters learn from
    L_route: the student's stages run with detached parameters and in eval mode (their BatchNorm
    statistics are untouched), the teacher's are frozen (eval mode, no parameter gradient); the
    student learns from the gated hint and KD terms (plus the Distiller's other losses, e.g.
    ``"ce"``). The method needs the two networks, which ``Distiller.prepare`` hands it
    (:meth:`bind_models`; the teacher must be one frozen model), and batches with targets.

    ``routing=False``: no multi-path network. The N = K decisions weight the spot losses with
    their straight-through gradient, which is then the policy's only training signal (it pushes
    decisions towards "skip"): L = hint · (1/B) Σ_b Σ_k d_bk ℓ_bk. With ``tau_end=0.5``,
    ``policy_input="student"`` and ``hidden=64`` this is the earlier version of this method.

    Defaults. The paper's text beyond its abstract was not available to check here; the structure
    and defaults follow the authors' code (zju-vipa/spot-adaptive-pytorch: ``train.py``,
    ``models/classifier.py``, ``configs/cifar-100``): Gumbel temperature fixed at 5
    (``tau_start = tau_end = 5``); decisions thresholded at ½ for the gates (hard decisions here:
    their Gumbel helper ``models/gs.py`` is not in the copy read); the policy is one Linear layer
    on the teacher's and student's pooled features; adapters in both directions are ``ConvReg``
    (conv + BN + ReLU; a 1x1 conv at equal resolution); the student runs the routed pass in eval
    mode and the routed loss updates only the policy and adapters; loss weights 1 for the gated
    logit KD (T = 4), the hint losses and the routed CE; the output hinge at ½B; ``distill_bias``
    = 10 added to the initial "teacher" logits in their homogeneous-pair configs, 0 in the
    heterogeneous ones (default here). Differences from that code: it pools only the
    penultimate features for the policy (here every spot's); it scales the routed CE by a factor
    γ (1 or 2) up or down depending on whether it beats the student's own CE (not done here); its
    FitNets term is MSE (mean over elements) at one spot (here ½‖·‖² per sample at every spot);
    and it trains the policy and adapters with a separate optimizer (lr/2, weight decay 1e-3),
    whereas here they share the Distiller's optimizer.
    """

    requires_prepare = True

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")),
        adapter: str = "conv1x1_bn",
        hidden: int = 0,
        policy_input: str = "both",
        tau_start: float = 5.0,
        tau_end: float = 5.0,
        hard: bool = True,
        deterministic: bool = False,
        seed: int = 0,
        routing: bool = True,
        student_stages: Sequence[StageSpec] | None = None,
        teacher_stages: Sequence[StageSpec] | None = None,
        hint: float = 1.0,
        kd: float = 1.0,
        T: float = 4.0,
        route: float = 1.0,
        min_teacher_frac: float = 0.5,
        distill_bias: float = 0.0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = tap_pairs(pairs, "spot_adaptive")
        if policy_input not in ("student", "both"):
            raise ValueError(f"policy_input must be 'student' or 'both', got {policy_input!r}")
        if not (tau_start > 0 and tau_end > 0):
            raise ValueError(f"temperatures must be > 0, got tau_start={tau_start}, tau_end={tau_end}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: one Linear layer), got {hidden}")
        if not T > 0:
            raise ValueError(f"the KD temperature T must be > 0, got {T}")
        for name, value in (("hint", hint), ("kd", kd), ("route", route)):
            if value < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {value}")
        if not 0.0 <= min_teacher_frac <= 1.0:
            raise ValueError(f"min_teacher_frac must be in [0, 1], got {min_teacher_frac}")
        self.adapter_kind, self.hidden, self.policy_input = adapter, int(hidden), policy_input
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.tau = self.tau_start
        self.hard, self.deterministic, self.seed = bool(hard), bool(deterministic), int(seed)
        self.routing = bool(routing)
        self.hint, self.kd, self.T, self.route_weight = float(hint), float(kd), float(T), float(route)
        self.min_teacher_frac, self.distill_bias = float(min_teacher_frac), float(distill_bias)
        self.student_stages = normalise_stages(ZOO_STAGES if student_stages is None else student_stages, "student")
        self.teacher_stages = normalise_stages(ZOO_STAGES if teacher_stages is None else teacher_stages, "teacher")
        if self.routing:
            for side, stages in (("student", self.student_stages), ("teacher", self.teacher_stages)):
                if len(stages) != len(self.pairs) + 1:
                    raise ValueError(
                        f"{side}_stages has {len(stages)} stages, but {len(self.pairs)} spots need "
                        f"{len(self.pairs) + 1}: one ending at each spot, then one ending in the logits"
                    )
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]
        self.adapters: nn.ModuleDict | None = None
        self.route_adapters: nn.ModuleDict | None = None
        self.policy: nn.Module | None = None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_decisions: Tensor | None = None
        self.last_losses: dict[str, Tensor] = {}
        self._injected: Tensor | None = None
        self._splits: tuple[StageSplit, StageSplit] | None = None

    @property
    def num_decisions(self) -> int:
        """N: one decision per spot, plus the output's when routing."""
        return len(self.pairs) + int(self.routing)

    # ------------------------------------------------------------------ models

    def bind_models(self, student: nn.Module, teacher: nn.Module | TeacherSource | None,
                    example: Batch | None = None) -> None:
        """Take the two networks the multi-path network is built from (``Distiller.prepare`` calls
        this before :meth:`prepare`; call it yourself only when using the method without a Distiller).

        ``teacher``: the teacher module, or the :class:`~distill.teachers.FrozenTeacher` wrapping
        it; ``None`` (an ensemble or cached teacher) cannot be routed through. The teacher is frozen
        here as the Distiller freezes it (eval mode, no parameter gradient). Neither model becomes
        a submodule of the method (not saved, moved or switched to train mode with it). The stage
        paths are checked now. A no-op with ``routing=False``; ``example`` is not used.
        """
        if not self.routing:
            return
        if isinstance(teacher, FrozenTeacher):
            teacher = teacher.model
        if teacher is None or isinstance(teacher, TeacherSource):
            kind = "no teacher module" if teacher is None else f"a {type(teacher).__name__}"
            raise TypeError(
                f"spot-adaptive routing runs the teacher's stages, so it needs one teacher network; got {kind} "
                "(an ensemble or cached teacher cannot be routed through: use routing=False)"
            )
        freeze(teacher)
        self._splits = (
            StageSplit(student, self.student_stages, model_name="student"),
            StageSplit(teacher, self.teacher_stages, model_name="teacher"),
        )

    def _bound(self) -> tuple[StageSplit, StageSplit]:
        if self._splits is None:
            raise RuntimeError(
                "SpotAdaptive(routing=True) routes through the student's and teacher's stages: it gets them from "
                "Distiller.prepare (or call method.bind_models(student, teacher) first), or use routing=False"
            )
        return self._splits

    # ------------------------------------------------------------------ parts

    def _features(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        ss, ts = [], []
        for s_path, t_path in self.pairs:
            s = tap(student_view, s_path, "student")
            t = tap(teacher_view, t_path, "teacher").detach()
            check_maps(s, t, f"student:{s_path}", f"teacher:{t_path}", "spot-adaptive KD")
            ss.append(s)
            ts.append(t)
        return ss, ts

    def _check_stages(self, student_view: View, teacher_view: View, batch: Batch) -> list[tuple[Tensor, Tensor]]:
        """Run both splits on the example batch; each stage must end at its spot's tap (and the
        last in the logits). Returns the (student, teacher) outputs at the spots."""
        splits = self._bound()
        with torch.no_grad(), _eval_mode(splits[0].model, splits[1].model):
            outs = [split.outputs(batch.inputs) for split in splits]
        names = [[s for s, _ in self.pairs] + ["logits"], [t for _, t in self.pairs] + ["logits"]]
        for split, view, got, taps in zip(splits, (student_view, teacher_view), outs, names):
            for k, (out, name) in enumerate(zip(got, taps)):
                want = tap(view, name, split.model_name).detach()
                same = out.shape == want.shape and torch.allclose(
                    out.float(), want.float(), rtol=1e-3, atol=1e-4 * (1.0 + float(want.abs().max()))
                )
                if not same:
                    raise ValueError(
                        f"{split.describe(k)} does not end at the {split.model_name}'s tap {name!r}: its output "
                        f"{tuple(out.shape)} differs from the tapped {tuple(want.shape)}"
                        f"{'' if out.shape != want.shape else ' in value'}. The stages must chain into the "
                        "model's forward, stage k ending at spot k and the last at the logits (views from an "
                        "eval-mode forward, as Distiller.prepare makes them)"
                    )
        return list(zip(outs[0][:-1], outs[1][:-1]))

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        ss, ts = self._features(student_view, teacher_view)
        spots = self._check_stages(student_view, teacher_view, batch) if self.routing else []
        if self.adapters is None:
            adapters = nn.ModuleDict()
            for (s_path, t_path), s, t in zip(self.pairs, ss, ts):
                adapters[f"{module_key(s_path)}__{module_key(t_path)}"] = build_adapter(
                    s, t, student_name=f"student:{s_path}", teacher_name=f"teacher:{t_path}", kind=self.adapter_kind
                ).to(device=s.device, dtype=s.dtype)
            self.adapters = adapters
        if self.routing and self.route_adapters is None:
            routes = nn.ModuleDict()
            for k, ((s_path, t_path), (s, t)) in enumerate(zip(self.pairs, spots)):
                for key, a, b, a_name, b_name in (("to_teacher", s, t, f"student:{s_path}", f"teacher:{t_path}"),
                                                  ("to_student", t, s, f"teacher:{t_path}", f"student:{s_path}")):
                    conv = build_adapter(a, b, student_name=a_name, teacher_name=b_name, kind=self.adapter_kind)
                    layers = list(conv) if isinstance(conv, nn.Sequential) else [conv]
                    # ReLU as the authors' ConvReg: the stage outputs it stands in for are post-activation
                    routes[f"{key}_{k}"] = nn.Sequential(*layers, nn.ReLU()).to(device=a.device, dtype=a.dtype)
            self.route_adapters = routes
        if self.policy is None:
            dim = sum(s.shape[1] for s in ss)
            if self.policy_input == "both":
                dim += sum(t.shape[1] for t in ts)
            out = 2 * self.num_decisions
            layers = [nn.Linear(dim, out)] if self.hidden == 0 else [
                nn.Linear(dim, self.hidden), nn.ReLU(inplace=True), nn.Linear(self.hidden, out)]
            policy = nn.Sequential(*layers).to(device=ss[0].device, dtype=ss[0].dtype)
            with torch.no_grad():  # odd output units are the "teacher / distill" logits of each decision
                policy[-1].bias[1::2] += self.distill_bias
            self.policy = policy

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self.tau = DF.spot_gumbel_temperature(epoch, total_epochs, self.tau_start, self.tau_end)

    def set_decisions(self, decisions: Tensor | None) -> None:
        """Use these (B, N) decisions instead of the policy's (``None`` restores the policy)."""
        self._injected = decisions

    def policy_logits(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        """The policy's (B, N, 2) logits {student / skip, teacher / distill} from the detached, pooled spot features."""
        if self.policy is None:
            raise RuntimeError("SpotAdaptive.prepare() must be called on an example batch before the first forward")
        feats = [s.detach().mean(dim=(2, 3)) for s in student_feats]
        if self.policy_input == "both":
            feats += [t.detach().mean(dim=(2, 3)) for t in teacher_feats]
        return self.policy(torch.cat(feats, dim=1)).view(-1, self.num_decisions, 2)

    def decisions(self, logits: Tensor) -> Tensor:
        """(B, N) decisions: Gumbel-softmax in training, the argmax when deterministic or in eval."""
        noisy = self.training and not self.deterministic
        return DF.gumbel_softmax_decisions(
            logits, self.tau, hard=self.hard or not noisy, noise=noisy, generator=self.generator
        )

    # ------------------------------------------------------------------ routing

    def route(self, inputs: Tensor, decisions: Tensor) -> Tensor:
        """The multi-path network's output (B, K) for inputs (B, ...) and decisions (B, N), 1 = teacher.

        Both networks run in eval mode, the student's stages with detached parameters: gradients
        reach the decisions, the routing adapters and the inputs, never a model's parameters.
        """
        if self.route_adapters is None:
            raise RuntimeError("SpotAdaptive.prepare() must be called on an example batch before routing")
        student, teacher = self._bound()
        n = len(self.pairs)
        with _eval_mode(student.model, teacher.model):
            return DF.spot_route(
                inputs,
                [partial(student, k, detach_params=True) for k in range(n + 1)],
                [partial(teacher, k) for k in range(n + 1)],
                [self.route_adapters[f"to_teacher_{k}"] for k in range(n)],
                [self.route_adapters[f"to_student_{k}"] for k in range(n)],
                decisions,
            )

    # ------------------------------------------------------------------ loss

    def spot_losses(self, student_view: View, teacher_view: View) -> Tensor:
        """Per-sample hint loss at each spot, (B, K)."""
        if self.adapters is None:
            raise RuntimeError("SpotAdaptive.prepare() must be called on an example batch before the first forward")
        ss, ts = self._features(student_view, teacher_view)
        regressed = [a(s) for a, s in zip(self.adapters.values(), ss)]
        return DF.spot_hint_losses(regressed, ts)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.adapters is None or self.policy is None:
            raise RuntimeError("SpotAdaptive.prepare() must be called on an example batch before the first forward")
        if self.routing and self.route_weight > 0 and batch.targets is None:
            raise ValueError("spot-adaptive routing trains its policy with the routed network's cross-entropy: "
                             "the batch needs targets (or set route=0)")
        ss, ts = self._features(student_view, teacher_view)
        losses = self.spot_losses(student_view, teacher_view)
        if self._injected is not None:
            d = self._injected.to(device=losses.device, dtype=losses.dtype)
            if d.shape != (losses.shape[0], self.num_decisions):
                raise ValueError(f"injected decisions must be (B, N) = ({losses.shape[0]}, {self.num_decisions}), "
                                 f"got {tuple(d.shape)}")
        else:
            d = self.decisions(self.policy_logits(ss, ts))
        self.last_decisions = d.detach()
        if not self.routing:
            loss = DF.spot_adaptive_loss(losses, d)
            self.last_losses = {"hint": loss.detach()}
            return loss * self.hint if self.hint != 1.0 else loss
        gate = d.detach()  # with routing, the policy learns from the routed network only
        hint = DF.spot_adaptive_loss(losses, gate[:, :-1])
        loss = self.hint * hint
        self.last_losses = {"hint": hint.detach()}
        if self.kd > 0:
            s_logits, t_logits = tap(student_view, "logits", "student"), tap(teacher_view, "logits", "teacher")
            kd = (gate[:, -1] * DF.kd_per_sample(s_logits, t_logits.detach(), self.T)).mean()
            loss = loss + self.kd * kd
            self.last_losses["kd"] = kd.detach()
        if self.route_weight > 0:
            assert batch.targets is not None
            routed = DF.spot_route_loss(self.route(batch.inputs, d), batch.targets, d[:, -1], self.min_teacher_frac)
            loss = loss + self.route_weight * routed
            self.last_losses["route"] = routed.detach()
        return loss

    def extra_repr(self) -> str:
        return (
            f"pairs={self.pairs}, routing={self.routing}, adapter={self.adapter_kind}, "
            f"policy_input={self.policy_input}, tau={self.tau:g} ({self.tau_start:g}->{self.tau_end:g}), "
            f"hard={self.hard}, hint={self.hint:g}, kd={self.kd:g} (T={self.T:g}), route={self.route_weight:g}, "
            f"weight={self.weight}"
        )


__all__ = ["ZOO_STAGES", "SpotAdaptive", "StageSplit"]
