"""Spot-adaptive knowledge distillation (SAKD): a policy picks, per sample, the spots to distill at."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import build_adapter
from distill.batch import Batch, View
from distill.methods._views import check_maps, module_key, tap, tap_pairs
from distill.methods.base import Method, Paper, register


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
    """Spot-adaptive KD: (1/B) sum_b sum_k d_bk * 1/2 ||T_k(x_b) - r_k(S_k(x_b))||^2, d from a Gumbel policy.

    Candidate spots are ``pairs`` of (student_tap, teacher_tap) feature maps; each has a FitNets
    regressor r_k (``adapter``, 1x1 conv + BN by default). A policy network (global average
    pooling of the student's spot features, concatenated, optionally with the teacher's when
    ``policy_input="both"``, then Linear-ReLU-Linear with ``hidden`` units) emits per-sample,
    per-spot two-way logits {skip, distill}; decisions d_bk are drawn by Gumbel-softmax
    (straight-through hard by default) with noise from a generator owned by the method (``seed``),
    at a temperature decayed linearly from ``tau_start`` (epoch 0) to ``tau_end`` (last epoch) in
    :meth:`on_epoch_start`. In eval mode, or with ``deterministic=True``, the decisions are the
    policy's argmax (no noise). :attr:`last_decisions` holds the latest (B, K) decisions;
    :meth:`set_decisions` injects fixed ones (tests, ablations). The noise is drawn on the CPU
    generator and moved to the features' device, so it is the same on every device.

    Not reproduced from the paper: the multi-path routing network, in which each spot's decision
    routes the forward pass through the teacher's or the student's next block (with adapters
    between the two networks) and whose task loss trains the policy. This library's methods see
    tapped features only, so the policy here is trained by this loss alone, through the
    straight-through decisions; the policy input is detached from the student (the student is
    trained by the spot losses only). Left alone this signal pushes decisions towards "skip"
    (lower weighted loss); ``policy_input`` and the temperature schedule are this library's
    choices, not confirmed against the paper's settings.
    """

    requires_prepare = True

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")),
        adapter: str = "conv1x1_bn",
        hidden: int = 64,
        policy_input: str = "student",
        tau_start: float = 5.0,
        tau_end: float = 0.5,
        hard: bool = True,
        deterministic: bool = False,
        seed: int = 0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = tap_pairs(pairs, "spot_adaptive")
        if policy_input not in ("student", "both"):
            raise ValueError(f"policy_input must be 'student' or 'both', got {policy_input!r}")
        if not (tau_start > 0 and tau_end > 0):
            raise ValueError(f"temperatures must be > 0, got tau_start={tau_start}, tau_end={tau_end}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.adapter_kind, self.hidden, self.policy_input = adapter, int(hidden), policy_input
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.tau = self.tau_start
        self.hard, self.deterministic, self.seed = bool(hard), bool(deterministic), int(seed)
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]
        self.adapters: nn.ModuleDict | None = None
        self.policy: nn.Module | None = None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_decisions: Tensor | None = None
        self._injected: Tensor | None = None

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

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        ss, ts = self._features(student_view, teacher_view)
        if self.adapters is None:
            adapters = nn.ModuleDict()
            for (s_path, t_path), s, t in zip(self.pairs, ss, ts):
                key = f"{module_key(s_path)}__{module_key(t_path)}"
                adapters[key] = build_adapter(
                    s, t, student_name=f"student:{s_path}", teacher_name=f"teacher:{t_path}", kind=self.adapter_kind
                ).to(device=s.device, dtype=s.dtype)
            self.adapters = adapters
        if self.policy is None:
            dim = sum(s.shape[1] for s in ss)
            if self.policy_input == "both":
                dim += sum(t.shape[1] for t in ts)
            k = len(self.pairs)
            self.policy = nn.Sequential(
                nn.Linear(dim, self.hidden), nn.ReLU(inplace=True), nn.Linear(self.hidden, 2 * k)
            ).to(device=ss[0].device, dtype=ss[0].dtype)

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self.tau = DF.spot_gumbel_temperature(epoch, total_epochs, self.tau_start, self.tau_end)

    def set_decisions(self, decisions: Tensor | None) -> None:
        """Use these (B, K) decisions instead of the policy's (``None`` restores the policy)."""
        self._injected = decisions

    def policy_logits(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        """The policy's (B, K, 2) logits {skip, distill} from the detached, pooled spot features."""
        if self.policy is None:
            raise RuntimeError("SpotAdaptive.prepare() must be called on an example batch before the first forward")
        feats = [s.detach().mean(dim=(2, 3)) for s in student_feats]
        if self.policy_input == "both":
            feats += [t.detach().mean(dim=(2, 3)) for t in teacher_feats]
        return self.policy(torch.cat(feats, dim=1)).view(-1, len(self.pairs), 2)

    def decisions(self, logits: Tensor) -> Tensor:
        """(B, K) decisions: Gumbel-softmax in training, the argmax when deterministic or in eval."""
        noisy = self.training and not self.deterministic
        return DF.gumbel_softmax_decisions(
            logits, self.tau, hard=self.hard or not noisy, noise=noisy, generator=self.generator
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
        ss, ts = self._features(student_view, teacher_view)
        losses = self.spot_losses(student_view, teacher_view)
        if self._injected is not None:
            d = self._injected.to(device=losses.device, dtype=losses.dtype)
        else:
            d = self.decisions(self.policy_logits(ss, ts))
        self.last_decisions = d.detach()
        return DF.spot_adaptive_loss(losses, d)

    def extra_repr(self) -> str:
        return (
            f"pairs={self.pairs}, adapter={self.adapter_kind}, policy_input={self.policy_input}, "
            f"tau={self.tau:g} ({self.tau_start:g}->{self.tau_end:g}), hard={self.hard}, weight={self.weight}"
        )


__all__ = ["SpotAdaptive"]
