"""Teacher sources: what turns a batch into the teacher's view ``{"logits": (B, K), tap: tensor, ...}``.

A teacher source is an ``nn.Module`` with ``forward(batch) -> View``. This module has the
frozen model and the ensemble; the cache (:class:`distill.cache.CachedTeacher`), the EMA copy,
peers and the student's own deeper exit plug into the same interface (:class:`TeacherSource`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import Batch, View
from distill.taps import Taps, logits_of, run_tapped


class TeacherSource(nn.Module):
    """Base class of teacher sources.

    Subclasses implement :meth:`forward`. ``supports_taps`` says whether :meth:`require_taps`
    may ask for feature taps (a cache of logits cannot give features).
    ``metadata`` carries what is known of how the teacher was trained (e.g. ``label_smoothing``),
    which runs report (Chandrasegaran et al., ICML 2022, arXiv 2206.14532: a teacher trained
    with label smoothing interacts with the KD temperature).
    """

    supports_taps: bool = False
    kind: str = "teacher"
    static: bool = False  # True when the same input always gives the same view (no EMA, no peers)

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.metadata: dict[str, Any] = dict(metadata or {})

    def require_taps(self, paths: Sequence[str]) -> None:
        """Ask the source to return these taps in its view; sources without taps refuse any."""
        if paths and not self.supports_taps:
            raise ValueError(
                f"the {self.kind} teacher source cannot provide feature taps {list(paths)}; "
                "only methods that read the teacher's logits can use it"
            )

    def on_epoch_start(self, epoch: int) -> None:
        """Called at each epoch start (EMA or checkpoint-following sources use it)."""

    def on_step_end(self, student: nn.Module) -> None:
        """Called after each optimizer step with the updated student (an EMA teacher updates here)."""

    def forward(self, batch: Batch) -> View:  # pragma: no cover - abstract
        raise NotImplementedError


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with every parameter's ``requires_grad`` off."""
    model.eval()
    model.requires_grad_(False)
    return model


class FrozenTeacher(TeacherSource):
    """A trained model used as teacher: eval mode, no gradients, optionally another dtype/device.

    Args:
        model: the teacher network; its output is logits ``(B, K)`` (or has ``.logits``).
        dtype: run the teacher in this dtype (e.g. ``torch.bfloat16``); its outputs are cast
            back to float32.
        device: keep the teacher on this device; inputs are moved there and outputs back.
        metadata: what is known of its training, e.g. ``{"label_smoothing": 0.1}``.

    The teacher stays in eval mode whatever ``.train()`` is called on an enclosing module, so
    its BatchNorm statistics and dropout never change (a pitfall of some peer libraries). Under
    float16 autocast it runs outside autocast (:func:`outside_fp16_autocast`): its logits keep
    their float32 range whatever the student's mixed precision.
    """

    supports_taps = True
    kind = "frozen"
    static = True

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(metadata or getattr(model, "distill_metadata", None))
        self.model = freeze(model)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self._pin()
        self._taps: Taps | None = None

    def _pin(self) -> None:
        if self.dtype is not None or self.device is not None:
            self.model.to(device=self.device, dtype=self.dtype)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FrozenTeacher:
        super()._apply(fn, *args, **kwargs)
        self._pin()  # an explicit dtype/device outlives .to() on the enclosing Distiller
        return self

    def train(self, mode: bool = True) -> FrozenTeacher:
        self.training = mode
        self.model.eval()
        return self

    def require_taps(self, paths: Sequence[str]) -> None:
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        if paths:
            self._taps = Taps(self.model, paths, model_name="teacher")

    def forward(self, batch: Batch) -> View:
        x = batch.inputs
        out_device = x.device
        if self.device is not None:
            batch = batch.to(self.device)
            x = batch.inputs
        if self.dtype is not None and x.is_floating_point():
            batch = replace(batch, inputs=x.to(self.dtype))
        with torch.no_grad(), outside_fp16_autocast(x.device.type):
            output, store = run_tapped(self.model, batch, self._taps)
            view: View = {"logits": logits_of(output), **store}
        if self.dtype is not None or self.device is not None:
            view = {k: v.to(device=out_device, dtype=torch.float32) if v.is_floating_point() else v.to(out_device)
                    for k, v in view.items()}
        return view


class EnsembleTeacher(TeacherSource):
    """Several frozen teachers combined into one target distribution.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015, arXiv
    1503.02531 (distilling an ensemble into one net); Zeng & Martinez, "Using a Neural Network
    to Approximate an Ensemble of Classifiers", Neural Processing Letters 2000.

    Args:
        models: the members; each must output logits ``(B, K)`` with the same ``K``.
        combine: ``"probs"``: arithmetic mean of the members' softened distributions,
            ``p̄ = Σ_i w_i softmax(z_i / T)``; ``"logits"``: weighted mean of logits, which is the
            normalised geometric mean of the members' distributions at any temperature.
        temperature: ``T`` used for ``"probs"``. The view's logits are ``T · log p̄``, so that a
            method applying ``softmax(logits / T)`` with the same ``T`` sees exactly ``p̄``.
        weights: member weights (default uniform), normalised to sum to 1.

    Feature taps are not combined (members' features need not match): the ensemble gives logits.
    """

    kind = "ensemble"
    static = True

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        combine: str = "probs",
        temperature: float = 1.0,
        weights: Sequence[float] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(metadata)
        if len(models) < 1:
            raise ValueError("an ensemble needs at least one model")
        if combine not in ("probs", "logits"):
            raise ValueError(f"combine must be 'probs' or 'logits', got {combine!r}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        w = torch.ones(len(models)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if (w.shape != (len(models),) or not bool(torch.isfinite(w).all()) or bool((w < 0).any())
                or float(w.sum()) <= 0):
            raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum, got {weights}")
        self.members = nn.ModuleList(
            m if isinstance(m, FrozenTeacher) else FrozenTeacher(m) for m in models
        )
        self.combine = combine
        self.temperature = float(temperature)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def forward(self, batch: Batch) -> View:
        views = [m(batch)["logits"] for m in self.members]
        if len({v.shape for v in views}) > 1:
            raise ValueError("the ensemble's members disagree on the logits' shape: "
                             + ", ".join(f"member {i}: {tuple(v.shape)}" for i, v in enumerate(views))
                             + "; every member must predict the same classes")
        logits = torch.stack(views)  # (M, B, K), or (M, B, L, V) for language models
        w = self.weights.to(device=logits.device, dtype=logits.dtype).view(-1, *([1] * (logits.dim() - 1)))
        if self.combine == "logits":
            return {"logits": (w * logits).sum(0)}
        T = self.temperature
        mean_probs = (w * F.softmax(logits / T, dim=-1)).sum(0)
        return {"logits": T * torch.log(mean_probs.clamp_min(torch.finfo(mean_probs.dtype).tiny))}


def as_teacher_source(teacher: Any) -> TeacherSource | None:
    """Accept a model, a list of models (an ensemble), a :class:`TeacherSource` or ``None``."""
    if teacher is None or isinstance(teacher, TeacherSource):
        return teacher
    if isinstance(teacher, nn.Module):
        return FrozenTeacher(teacher)
    if isinstance(teacher, (list, tuple)) and all(isinstance(m, nn.Module) for m in teacher):
        return EnsembleTeacher(teacher)
    raise TypeError(
        f"teacher must be an nn.Module, a list of nn.Modules or a TeacherSource, got {type(teacher).__name__}"
    )


def outside_fp16_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Switch autocast off where it would run in float16 (a no-op otherwise, bf16 included).

    A confident teacher's logits exceed float16's range (largest finite 65504): under fp16
    autocast they become ``inf`` and every softmax of them ``nan`` at the first step. Teacher
    sources run their model inside this context, so the teacher computes in its own dtype (float32,
    or the ``dtype`` it was given) while the student trains under fp16 autocast.
    """
    try:
        fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    except RuntimeError:  # a device type autocast does not know (meta): no autocast to leave
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False) if fp16 else contextlib.nullcontext()


def check_logits(view: View, who: str) -> Tensor:
    logits = view.get("logits")
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = None if not isinstance(logits, Tensor) else tuple(logits.shape)
        raise ValueError(f"{who} logits must be a (B, K) tensor, got shape {shape}")
    return logits


# ----------------------------------------------------------------------------------- devices
# where a model runs is chosen here, beside the teacher sources: the loop, the runner and the
# recipes (above) all validate a device the same way

DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(spec: str | torch.device, key: str = "device") -> torch.device:
    """A device from ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``; a clear error naming ``key`` otherwise.

    Only the spelling is checked here (a recipe may be validated on another machine than the one
    that runs it); :func:`require_device` checks that the device exists.
    """
    if isinstance(spec, torch.device):
        dev = spec
    else:
        if not isinstance(spec, str):
            raise ValueError(f"{key} must be a string such as 'cpu', 'cuda' or 'cuda:0', got {spec!r}")
        hint = " (PyTorch calls a GPU 'cuda')" if spec.strip().lower().startswith("gpu") else ""
        try:
            dev = torch.device(spec)
        except (RuntimeError, ValueError):
            raise ValueError(f"{key}: {spec!r} is not a device; expected one of 'cpu', 'cuda', 'cuda:N' (N a GPU "
                             f"index) or 'mps'{hint}") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"{key}: {str(spec)!r} is not a device distill trains on; expected one of 'cpu', 'cuda', "
                         "'cuda:N' or 'mps'")
    return dev


def require_device(spec: str | torch.device, key: str = "device") -> torch.device:
    """:func:`parse_device`, then check that this machine has the device; raises ``RuntimeError`` naming
    ``key`` when it does not (call it before any work: a CPU-only torch build, a GPU index too high)."""
    dev = parse_device(spec, key)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA support" if torch.version.cuda is None else \
                "no CUDA GPU is visible (torch.cuda.is_available() is False)"
            raise RuntimeError(f"{key}: {str(spec)!r} was asked for, but {build} (torch {torch.__version__}); "
                               "use 'cpu', or run where a GPU is available")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise RuntimeError(f"{key}: {str(spec)!r} was asked for, but this machine has {count} CUDA GPU(s) "
                               f"(indices 0..{count - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError(f"{key}: {str(spec)!r} was asked for, but MPS (Apple GPU) is not available here; use 'cpu'")
    return dev
