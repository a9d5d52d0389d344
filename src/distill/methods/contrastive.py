"""Contrastive methods: CRD (contrastive representation distillation, with memory banks).

Each ``forward`` returns the *unweighted* loss; the math lives in
:mod:`distill.functional.contrastive`. Teacher tensors are detached here.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.data.loader import mix_seed
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

_NEGATIVES = ("other_class", "random")
_PENDING_WARN = 64  # queued bank updates that mean step_end() is never called




@register(
    "crd",
    "contrastive",
    Paper(
        title="Contrastive Representation Distillation",
        authors="Y. Tian, D. Krishnan, P. Isola",
        year=2020,
        arxiv="1910.10699",
        venue="ICLR",
    ),
)
class CRD(Method):
    r"""Contrastive representation distillation: NCE between student and teacher embeddings with memory banks.

    What is computed (one step, batch of B samples with data-set positions ``batch.index``):

    1. ``v_s = normalize(W_s f_s)``, ``v_t = normalize(W_t f_t)``: the flattened ``student_tap``
       / ``teacher_tap`` features (default the pooled ``"pool"`` features) through trainable
       linear embeddings to ``feat_dim`` = 128 dimensions, L2-normalised. *Both* embeddings are
       trained (the teacher's feature is detached, its embedding is not), as in the paper (the
       critic's :math:`g^T` is learned) and RepDistiller (``embed_t`` is in the trainable list).
    2. Indices (B, K + 1): column 0 the sample itself, K negatives
       (:func:`distill.functional.crd_sample_indices`).
    3. Two memory banks (M × ``feat_dim`` buffers, saved in the state dict): ``memory_s`` holds
       student embeddings, ``memory_t`` teacher embeddings, initialised uniformly on
       :math:`\pm 1/\sqrt{d/3}` as the reference does. The student embedding is contrasted with
       teacher-bank rows and the teacher embedding with student-bank rows; the loss is the sum of
       the two NCE losses (:func:`distill.functional.crd_nce_loss`), τ = ``nce_t``.
    4. After the optimizer step (:meth:`on_step_end`) each bank's rows of the batch's own
       indices become ``normalize(m * row + (1 - m) * v)``, m = ``nce_m``, with v the embeddings
       this step's forward computed (detached; the pre-step weights, exactly what the reference
       writes, which updates inside its forward right after the scores). Forwards in eval mode
       queue no update; several training forwards before one step (gradient accumulation) are
       all applied, in order. In your own loop call ``distiller.step_end()`` after each
       ``optimizer.step()`` (``fit`` does), or the banks never change.

    Args:
        num_samples: M, the number of training samples (rows of the banks). Required;
            :meth:`prepare` raises if it is missing.
        student_tap, teacher_tap: the features to embed (any shape; flattened per sample).
        feat_dim: embedding size (paper / reference: 128).
        nce_k: negatives per anchor (paper / reference: 16384), clamped to ``num_samples - 1``.
        nce_t: temperature τ (RepDistiller's default ``--nce_t 0.07``).
        nce_m: momentum of the bank update (RepDistiller's default ``--nce_m 0.5``).
        negatives: ``"other_class"`` (default, the reference's CIFAR setting: its
            ``CIFAR100InstanceSample`` with ``mode='exact'`` draws the K negatives of a sample
            from samples of *other* classes, without replacement) or ``"random"`` (uniform over
            all samples with replacement, the reference's ``ContrastMemory`` fallback).
            ``"other_class"`` needs the training labels: ``labels=`` or :meth:`set_labels`.
        labels: the training set's labels ``(M,)``, indexed like ``batch.index`` (e.g.
            ``loader.targets`` of an :class:`~distill.data.InMemoryLoader`). Not saved in the state
            dict: pass them again when resuming.
        estimate_z: divide :math:`e^{\langle\cdot\rangle/\tau}` by the NCE constant Z estimated
            from the first training batch, as the reference does (``Z = M * mean(exp)`` over that
            batch's B(K + 1) scores, one Z per side, then fixed; buffers ``log_z_s``/``log_z_t``,
            saved in the state dict). ``False`` uses the critic as printed in the paper (Z = 1);
            with unit vectors and τ = 0.07 it saturates, so the reference's Z is the default.
        seed: seeds the method's own generators: the banks' initialisation (CPU) and the
            negative sampling (on the banks' device), so runs are reproducible.
        weight: the Distiller's multiplier; RepDistiller's CIFAR-100 runs use ``-b 0.8`` (with CE
            weight 1 and no KD term): ``Distiller(s, t, losses={"ce": 1.0, "crd": (0.8, CRD(...))})``.

    The sampling generator's state is saved in the state dict (as this module's extra state) and
    restored on load when the generator lives on the same device type; loaded on another device
    type it restarts from ``seed``. Cost: the gathers are (B, K + 1, ``feat_dim``) per side and
    "other_class" sampling is (B, M) work per step; on a CPU use small ``nce_k``.

    Differences from RepDistiller: the logs of the NCE loss are evaluated exactly (no
    ``eps = 1e-7``); the bank initialisation and the sampling use the method's own seeded
    generators instead of the global RNG and data-loader workers; the positive's own index is
    column 0 in both negative modes (the reference's ``mode='relax'`` is not offered); the
    embeddings and scores are computed in float32 with autocast off.
    """

    requires_prepare = True  # the embeddings and banks are built from example shapes, before the optimizer

    def __init__(
        self,
        num_samples: int | None = None,
        student_tap: str = "pool",
        teacher_tap: str = "pool",
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        negatives: str = "other_class",
        labels: Tensor | None = None,
        estimate_z: bool = True,
        seed: int = 0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) != num_samples
                                        or num_samples < 2):
            raise ValueError(f"num_samples must be an int >= 2 (the training-set size), got {num_samples!r}")
        if int(feat_dim) != feat_dim or feat_dim < 1:
            raise ValueError(f"feat_dim must be an int >= 1, got {feat_dim}")
        if int(nce_k) != nce_k or nce_k < 1:
            raise ValueError(f"nce_k must be an int >= 1, got {nce_k}")
        if nce_t <= 0:
            raise ValueError(f"nce_t must be > 0, got {nce_t}")
        if not 0.0 <= nce_m < 1.0:
            raise ValueError(f"nce_m must be in [0, 1), got {nce_m}")
        if negatives not in _NEGATIVES:
            raise ValueError(f"negatives must be one of {_NEGATIVES}, got {negatives!r}")
        self.num_samples = None if num_samples is None else int(num_samples)
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.feat_dim, self.nce_k = int(feat_dim), int(nce_k)
        self.nce_t, self.nce_m = float(nce_t), float(nce_m)
        self.negatives, self.estimate_z, self.seed = negatives, bool(estimate_z), int(seed)
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        self.register_buffer("memory_s", None)  # (M, feat_dim) student embeddings, built by prepare()
        self.register_buffer("memory_t", None)  # (M, feat_dim) teacher embeddings
        self.register_buffer("log_z_s", torch.tensor(float("nan")))  # log Z of the student-anchor side; nan: unset
        self.register_buffer("log_z_t", torch.tensor(float("nan")))  # log Z of the teacher-anchor side
        self._layout: DF.CRDClassLayout | None = None  # the labels' class structure (CPU)
        self._layout_on: DF.CRDClassLayout | None = None  # ... on the banks' device
        self._generator: torch.Generator | None = None
        self._loaded_generator: tuple[str, Tensor] | None = None  # (device type, state) from a state dict
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (index, v_s, v_t) awaiting on_step_end
        if labels is not None:
            self.set_labels(labels)

    # ----------------------------------------------------------------- set-up
    @property
    def num_negatives(self) -> int:
        """K actually used: ``nce_k`` clamped to ``num_samples - 1``."""
        if self.num_samples is None:
            raise ValueError("CRD needs num_samples (the training-set size)")
        return min(self.nce_k, self.num_samples - 1)

    def bind_data(self, num_samples: int, targets: Tensor | None) -> None:
        """Take ``num_samples`` and the labels from the training loader when they were not given."""
        if self.num_samples is None:
            self.num_samples = int(num_samples)
        if targets is not None and getattr(self, "_layout", None) is None and self.negatives == "other_class":
            self.set_labels(targets)

    def set_labels(self, targets: Tensor) -> CRD:
        """Give the training labels ``(M,)`` (position i = the sample with ``batch.index == i``).

        Needed by ``negatives="other_class"``; may be called before or after :meth:`prepare`.
        """
        if not isinstance(targets, Tensor):
            targets = torch.as_tensor(targets)
        targets = targets.detach().reshape(-1).long().cpu()
        if self.num_samples is not None and targets.numel() != self.num_samples:
            raise ValueError(f"CRD got {targets.numel()} labels for num_samples={self.num_samples}")
        self._layout = DF.crd_class_layout(targets)
        self._layout_on = None
        return self

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.num_samples is None:
            raise ValueError(
                "CRD needs num_samples, the number of training samples (its memory banks have one row per "
                "sample): CRD(num_samples=len(train_set), ...)"
            )
        if self.negatives == "other_class" and self._layout is None:
            raise ValueError(
                "CRD(negatives='other_class') needs the training labels to draw negatives from other classes: "
                "pass labels=train_targets or call crd.set_labels(train_targets) before prepare "
                "(or use negatives='random')"
            )
        s, t = self._features(student_view, teacher_view)
        if batch.index is not None:
            self._check_index(batch.index)
        if self.embed_s is not None:
            return  # idempotent: never rebuild trained parts
        device, dtype = s.device, s.dtype if s.is_floating_point() else torch.get_default_dtype()
        self.embed_s = nn.Linear(s.shape[1], self.feat_dim).to(device=device, dtype=dtype)
        self.embed_t = nn.Linear(t.shape[1], self.feat_dim).to(device=device, dtype=dtype)
        init = torch.Generator().manual_seed(mix_seed(self.seed, 0))
        self.memory_s = DF.crd_init_memory(self.num_samples, self.feat_dim, init, dtype).to(device)
        self.memory_t = DF.crd_init_memory(self.num_samples, self.feat_dim, init, dtype).to(device)

    def _features(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        if s.shape[0] != t.shape[0]:
            raise ShapeMismatchError(
                f"batch sizes differ: student:{self.student_tap} {tuple(s.shape)}, "
                f"teacher:{self.teacher_tap} {tuple(t.shape)}"
            )
        return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)

    def _check_index(self, index: Tensor) -> None:
        assert self.num_samples is not None
        if index.dim() != 1:
            raise ValueError(f"batch.index must be (B,), got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise IndexError(
                f"batch.index holds positions outside [0, num_samples={self.num_samples}): "
                f"min {int(index.min())}, max {int(index.max())}"
            )

    def _sampler(self, device: torch.device) -> torch.Generator:
        g = self._generator
        if g is None or g.device.type != device.type or (device.index is not None and g.device != device):
            g = torch.Generator(device=device).manual_seed(mix_seed(self.seed, 1))
            if self._loaded_generator is not None and self._loaded_generator[0] == device.type:
                g.set_state(self._loaded_generator[1])
            self._loaded_generator = None
            self._generator = g
        return g

    def _class_layout(self, device: torch.device) -> DF.CRDClassLayout | None:
        if self.negatives != "other_class":
            return None
        if self._layout is None:
            raise ValueError("CRD(negatives='other_class') needs the training labels: call crd.set_labels(targets)")
        if self._layout_on is None or self._layout_on.labels.device != device:
            self._layout_on = self._layout.to(device)
        return self._layout_on

    # ----------------------------------------------------------------- step
    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.embed_s is None or self.embed_t is None or self.memory_s is None or self.memory_t is None:
            raise RuntimeError("CRD.prepare() must be called on an example batch before the first forward")
        if batch.index is None:
            raise ValueError(
                "CRD needs each sample's position in the training set (batch.index) to address its memory "
                "banks: use InMemoryLoader(..., return_index=True), or a loader yielding (inputs, targets, index)"
            )
        assert self.num_samples is not None
        s, t = self._features(student_view, teacher_view)
        device = self.memory_s.device
        index = batch.index.to(device).long()
        with torch.no_grad():
            idx = DF.crd_sample_indices(index, self.num_negatives, self.num_samples,
                                        generator=self._sampler(device), layout=self._class_layout(device))
        with torch.autocast(device.type, enabled=False):
            dtype = self.memory_s.dtype
            v_s = F.normalize(self.embed_s(s.to(dtype)), dim=1)
            v_t = F.normalize(self.embed_t(t.to(dtype)), dim=1)
            logits_s = DF.crd_scores(v_s, self.memory_t, idx, self.nce_t)  # student anchor, teacher bank
            logits_t = DF.crd_scores(v_t, self.memory_s, idx, self.nce_t)  # teacher anchor, student bank
            if self.estimate_z:
                with torch.no_grad():  # set once, from the first batch, without a host sync
                    self.log_z_s.copy_(torch.where(torch.isnan(self.log_z_s),
                                                   DF.crd_log_z(logits_s, self.num_samples), self.log_z_s))
                    self.log_z_t.copy_(torch.where(torch.isnan(self.log_z_t),
                                                   DF.crd_log_z(logits_t, self.num_samples), self.log_z_t))
                log_z_s, log_z_t = self.log_z_s, self.log_z_t
            else:
                log_z_s = log_z_t = 0.0
            loss = DF.crd_nce_loss(logits_s, self.num_samples, log_z_s) \
                + DF.crd_nce_loss(logits_t, self.num_samples, log_z_t)
        if self.training:
            self._pending.append((index, v_s.detach(), v_t.detach()))
            if len(self._pending) == _PENDING_WARN:
                warnings.warn(
                    f"CRD has {_PENDING_WARN} memory-bank updates waiting: the banks are written by "
                    "on_step_end(); in your own loop call distiller.step_end() after each optimizer.step() "
                    "(distill.fit does)",
                    stacklevel=2,
                )
        return loss

    def on_step_end(self) -> None:
        """Momentum-update both banks' rows of the batch's own indices (every queued forward, in order)."""
        if self.memory_s is None or self.memory_t is None:
            self._pending.clear()
            return
        with torch.no_grad():
            for index, v_s, v_t in self._pending:
                for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    rows = memory.index_select(0, index)
                    memory.index_copy_(0, index, DF.crd_memory_update(rows, v, self.nce_m).to(memory.dtype))
        self._pending.clear()

    # ----------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        g = self._generator
        if g is None:
            return {"generator": None} if self._loaded_generator is None else \
                {"generator": self._loaded_generator[1], "device_type": self._loaded_generator[0]}
        return {"generator": g.get_state(), "device_type": g.device.type}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("generator") is None:
            return
        device_type, gen_state = str(state["device_type"]), state["generator"].detach().cpu()
        self._pending.clear()
        if self._generator is not None and self._generator.device.type == device_type:
            self._generator.set_state(gen_state)
        else:
            self._generator = None  # restored when sampling next runs on that device type
            self._loaded_generator = (device_type, gen_state)

    def log_values(self) -> dict[str, float]:
        """The NCE constants once set (logged per epoch by ``fit``)."""
        if not self.estimate_z or bool(torch.isnan(self.log_z_s)):
            return {}
        return {"log_z_s": float(self.log_z_s), "log_z_t": float(self.log_z_t)}

    def extra_repr(self) -> str:
        return (
            f"{self.student_tap} -> {self.teacher_tap}, num_samples={self.num_samples}, feat_dim={self.feat_dim}, "
            f"nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}, negatives={self.negatives!r}, "
            f"weight={self.weight}"
        )
