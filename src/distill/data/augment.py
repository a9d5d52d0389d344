"""Batched, tensor-side image augmentation whose random parameters can be replayed per sample.

Every transform works on a whole batch ``x`` of shape ``(B, C, H, W)`` at once, with no Python
loop over samples. Randomness is split from application:

* ``params_for(keys)`` draws the per-sample parameters from :class:`SampleKeys`, counter-based
  random numbers where sample ``i``'s draws are a pure function of ``(seed, epoch, i)``: the
  same sample gets the same crop and flip in an epoch whatever batch it lands in, so a teacher
  cache can store the teacher's outputs for the exact views the student will see (FKD, Shen &
  Xing, ECCV 2022, arXiv 2112.01528). :class:`~distill.data.loader.InMemoryLoader` uses this.
* ``sample_params(batch_size, generator)`` draws them from a ``torch.Generator`` instead (for
  use outside the loader);
* ``apply(x, params)`` applies them deterministically.

Parameters are tensors whose first axis is the batch (on the CPU), so they slice per sample
(``params[i]``) like any other tensor (:class:`MixupParams` slices the same way).

:class:`Mixup` is the one transform that reads other samples: it mixes each view with the view of
a partner drawn from the whole data set, so it needs the data (:func:`augmented_views`, which
:class:`~distill.data.loader.InMemoryLoader` and the teacher cache call) and must come last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Augment",
    "Compose",
    "Mixup",
    "MixupParams",
    "RandomCropPad",
    "RandomHorizontalFlip",
    "SampleKeys",
    "augmented_views",
    "beta_draw",
    "mix_seed",
    "split_mixup",
]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
KEY_DERIVATION = "splitmix64(seed, epoch, 1, index)/v1"
"""Names the per-sample key scheme; a teacher cache records it so a future change is detected."""


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """:func:`_splitmix64` on a ``uint64`` array (NumPy array arithmetic wraps modulo 2**64)."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    return x ^ (x >> np.uint64(31))


def _chain(*parts: int) -> int:
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers ``parts``.

    Used so that (seed, epoch) and (seed, epoch, batch) give unrelated, reproducible streams;
    plain ``seed + epoch`` would make run ``seed=1, epoch=0`` replay ``seed=0, epoch=1``.
    """
    return _chain(*parts) >> 1  # torch.Generator.manual_seed accepts any non-negative 64-bit value; keep margin


class SampleKeys:
    """Counter-based random numbers, one independent stream per sample.

    Sample ``i``'s key is ``splitmix64`` chained over ``(seed, epoch, 1, i)`` (the tag ``1`` keeps
    these draws apart from the loader's permutation, tag ``0``); draw number ``slot`` of a
    transform is ``splitmix64(key ^ splitmix64(slot))``. Nothing depends on the batch a sample is
    in or on how many samples came before it, which is what lets a cache replay one sample's
    view exactly (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011, for the
    counter-based idea).

    Build with :meth:`of`; transforms read :meth:`uniform` and :meth:`integers` and give each
    sub-transform its own stream with :meth:`child`. ``num_samples`` (the size of the data set the
    indices point into, or ``None``) is what :class:`Mixup` draws partners from; it does not
    change the keys.
    """

    __slots__ = ("keys", "num_samples")

    def __init__(self, keys: np.ndarray, num_samples: int | None = None) -> None:
        self.keys = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
        self.num_samples = num_samples

    @classmethod
    def of(cls, seed: int, epoch: int, index: Tensor | np.ndarray | Sequence[int],
           num_samples: int | None = None) -> SampleKeys:
        """Keys of the samples ``index`` ``(B,)`` (positions in a data set of ``num_samples``) in ``epoch``."""
        if isinstance(index, Tensor):
            index = index.detach().cpu().numpy()
        idx = np.asarray(index)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"SampleKeys.of expects a 1-d integer index; got shape {idx.shape}, dtype {idx.dtype}")
        if idx.size and int(idx.min()) < 0:
            raise ValueError(f"SampleKeys.of expects sample indices >= 0; got {int(idx.min())}")
        if num_samples is not None and idx.size and int(idx.max()) >= num_samples:
            raise ValueError(f"SampleKeys.of: sample index {int(idx.max())} is outside the data set of {num_samples}")
        prefix = np.uint64(_chain(seed, epoch, 1))
        return cls(_splitmix64_np(idx.astype(np.uint64) ^ prefix), num_samples)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def child(self, tag: int) -> SampleKeys:
        """An independent stream per sample for sub-transform ``tag`` (``Compose`` item ``tag``)."""
        return SampleKeys(_splitmix64_np(self.keys ^ np.uint64(_splitmix64(0x5EED0000 + int(tag)))), self.num_samples)

    def bits(self, slot: int = 0) -> np.ndarray:
        """64 random bits per sample ``(B,)`` ``uint64`` for draw number ``slot``."""
        return _splitmix64_np(self.keys ^ np.uint64(_splitmix64(int(slot))))

    def uniform(self, slot: int = 0) -> Tensor:
        """Uniform numbers in ``[0, 1)``, float64 ``(B,)``: the top 53 bits of :meth:`bits`."""
        return torch.from_numpy((self.bits(slot) >> np.uint64(11)).astype(np.float64) * 2.0**-53)

    def integers(self, high: int, slot: int = 0) -> Tensor:
        """Integers in ``[0, high)``, int64 ``(B,)``, by a 32-bit multiply-shift (bias < high / 2**32)."""
        if not 1 <= high <= 2**32:
            raise ValueError(f"SampleKeys.integers: high must be in [1, 2**32]; got {high}")
        top = self.bits(slot) >> np.uint64(32)
        return torch.from_numpy(((top * np.uint64(high)) >> np.uint64(32)).astype(np.int64))

    def batch_seed(self) -> int:
        """One seed from all keys, in order: a batch-level stream for transforms without per-sample draws."""
        if not len(self):
            return 0
        positions = _splitmix64_np(np.arange(len(self), dtype=np.uint64))
        return _splitmix64(int(np.bitwise_xor.reduce(_splitmix64_np(self.keys ^ positions)))) >> 1


def _check_images(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} expects images of shape (B, C, H, W); got {shape}")


def _check_params_batch(params: Tensor, x: Tensor, who: str) -> None:
    if params.shape[0] != x.shape[0]:
        raise ValueError(
            f"{who}: parameters are for a batch of {params.shape[0]} samples but x has {x.shape[0]}"
        )


class Augment:
    """Base class: subclasses implement :meth:`sample_params`, :meth:`apply` and, to be replayable
    per sample (what the loader and the teacher cache rely on), :meth:`params_for`."""

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> Any:
        """Draw the random parameters for ``batch_size`` samples from ``generator``."""
        raise NotImplementedError

    def params_for(self, keys: SampleKeys) -> Any:
        """Per-sample parameters for ``len(keys)`` samples, each a pure function of its key.

        The default (for subclasses that only implement :meth:`sample_params`) seeds one
        generator from the whole batch's keys: reproducible per batch, not per sample, so such a
        transform cannot be cached per view (:attr:`per_sample` is ``False``).
        """
        return self.sample_params(len(keys), torch.Generator().manual_seed(keys.batch_seed()))

    @property
    def per_sample(self) -> bool:
        """Whether :meth:`params_for` draws each sample's parameters from its own key."""
        return type(self).params_for is not Augment.params_for

    def spec(self) -> dict[str, Any]:
        """A JSON-able description of the transform and its settings (recorded by teacher caches)."""
        return {"type": type(self).__qualname__, "repr": repr(self)}

    def apply(self, x: Tensor, params: Any) -> Tensor:
        """Apply parameters from :meth:`sample_params` or :meth:`params_for` to ``x`` ``(B, C, H, W)``."""
        raise NotImplementedError

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``x`` ``(B, C, H, W)`` with fresh draws from ``generator``; same shape out."""
        _check_images(x, type(self).__name__)
        return self.apply(x, self.sample_params(x.shape[0], generator))


class RandomCropPad(Augment):
    """Pad each side by ``padding`` pixels of ``fill``, then crop a random ``H x W`` window.

    ``fill`` is the padding value in the space of ``x``: inputs that were normalised with
    ``(x - mean) / std`` get mean-coloured padding from the default ``0.0``; pass
    ``-mean / std`` for black padding.

    Params: integer offsets ``(B, 2)`` as ``(row, col)``, each in ``[0, 2 * padding]``; offset
    ``(padding, padding)`` is the identity crop.
    """

    def __init__(self, padding: int, fill: float = 0.0) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"RandomCropPad padding must be an int >= 0; got {padding!r}")
        self.padding = padding
        self.fill = float(fill)

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else None
        return torch.randint(0, 2 * self.padding + 1, (batch_size, 2), generator=generator, device=device)

    def params_for(self, keys: SampleKeys) -> Tensor:
        span = 2 * self.padding + 1
        return torch.stack([keys.integers(span, 0), keys.integers(span, 1)], dim=1)

    def spec(self) -> dict[str, Any]:
        return {"type": "RandomCropPad", "padding": self.padding, "fill": self.fill}

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        _check_images(x, "RandomCropPad")
        _check_params_batch(params, x, "RandomCropPad")
        if self.padding == 0:
            return x
        b, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p), value=self.fill)  # (B, C, H+2p, W+2p)
        offsets = params.to(device=x.device, dtype=torch.long)
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
        # one gather over the flattened padded plane: ~4x faster on CPU than 4-d advanced indexing
        flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)

    def __repr__(self) -> str:
        return f"RandomCropPad(padding={self.padding}, fill={self.fill})"


class RandomHorizontalFlip(Augment):
    """Mirror each image left-right with probability ``p``.

    Params: a boolean mask ``(B,)``, ``True`` where the sample is flipped.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"RandomHorizontalFlip p must be in [0, 1]; got {p!r}")
        self.p = float(p)

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else None
        return torch.rand(batch_size, generator=generator, device=device) < self.p

    def params_for(self, keys: SampleKeys) -> Tensor:
        return keys.uniform(0) < self.p

    def spec(self) -> dict[str, Any]:
        return {"type": "RandomHorizontalFlip", "p": self.p}

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        _check_images(x, "RandomHorizontalFlip")
        _check_params_batch(params, x, "RandomHorizontalFlip")
        mask = params.to(device=x.device, dtype=torch.bool)[:, None, None, None]
        return torch.where(mask, x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose(Augment):
    """Apply transforms in order. Params: a tuple with one entry per transform."""

    def __init__(self, transforms: Sequence[Augment]) -> None:
        transforms = list(transforms)
        for i, t in enumerate(transforms):
            if not isinstance(t, Augment):
                raise TypeError(
                    f"Compose item {i} is a {type(t).__name__}; expected an Augment "
                    "(RandomCropPad, RandomHorizontalFlip, ...)"
                )
            if _has_mixup(t) and (i != len(transforms) - 1 or not isinstance(t, Mixup)):
                # Mixup mixes finished views, and augmented_views looks for it at the top level only
                raise ValueError(f"Compose item {i} is or holds a Mixup: Mixup must be the last item of the "
                                 "outermost Compose (it mixes the finished views of two samples)")
        self.transforms = transforms

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Any, ...]:
        # Drawn in order, so a fixed generator state gives the same parameters for every transform.
        return tuple(t.sample_params(batch_size, generator) for t in self.transforms)

    def params_for(self, keys: SampleKeys) -> tuple[Any, ...]:
        # each transform reads its own stream, so adding a transform never changes another's draws
        return tuple(t.params_for(keys.child(i)) for i, t in enumerate(self.transforms))

    @property
    def per_sample(self) -> bool:
        return all(t.per_sample for t in self.transforms)

    def spec(self) -> dict[str, Any]:
        return {"type": "Compose", "transforms": [t.spec() for t in self.transforms]}

    def apply(self, x: Tensor, params: Sequence[Any]) -> Tensor:
        if len(params) != len(self.transforms):
            raise ValueError(
                f"Compose has {len(self.transforms)} transforms but got {len(params)} parameter sets"
            )
        for t, p in zip(self.transforms, params):
            x = t.apply(x, p)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


@dataclass(frozen=True)
class MixupParams:
    """:class:`Mixup`'s per-sample parameters; ``params[i]`` slices both like tensors.

    Attributes:
        partner: the index ``j`` in the data set of each sample's partner, int64 ``(B,)``.
        lam: the weight ``λ`` of the sample itself, float64 ``(B,)`` in ``[0, 1]`` (``1`` for a sample
            that is not mixed, which then ignores its partner).
    """

    partner: Tensor
    lam: Tensor

    def __getitem__(self, i: Any) -> MixupParams:
        return MixupParams(self.partner[i], self.lam[i])

    def __len__(self) -> int:
        return int(self.partner.shape[0])


_GAMMA_ROUNDS = 64  # Marsaglia-Tsang accepts > 95% per round: 64 rounds leave a sample pending w.p. < 1e-83


def _unit(keys: SampleKeys, slot: int) -> np.ndarray:
    """Uniform numbers in ``(0, 1]`` (float64 ``(B,)``), safe to take the log of."""
    return 1.0 - (keys.bits(slot) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _log_gamma_draw(keys: SampleKeys, shape: float) -> np.ndarray:
    """``log G`` with ``G ~ Gamma(shape, 1)``, float64 ``(B,)``, each a pure function of its sample's key.

    Marsaglia & Tsang, "A simple method for generating gamma variables", ACM TOMS 2000: rejection
    from ``d (1 + c z)^3``, ``z`` normal (Box-Muller), with the ``U^(1/a)`` boost for ``a < 1``.
    Each round reads fresh slots of the sample's own stream, so how many rounds *other* samples
    need never changes a sample's draw. The log keeps tiny ``a`` (where ``G`` underflows) usable.
    """
    boost = shape < 1.0
    d = (shape + 1.0 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = np.full(len(keys), math.log(d))  # the mode, for the (never seen) samples still pending at the end
    pending = np.ones(len(keys), dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for r in range(_GAMMA_ROUNDS):
            z = np.sqrt(-2.0 * np.log(_unit(keys, 3 * r))) * np.cos(2.0 * math.pi * _unit(keys, 3 * r + 1))
            v = (1.0 + c * z) ** 3
            log_v = np.log(np.where(v > 0, v, 1.0))
            ok = pending & (v > 0) & (np.log(_unit(keys, 3 * r + 2)) < 0.5 * z * z + d - d * v + d * log_v)
            out[ok] = math.log(d) + log_v[ok]
            pending &= ~ok
            if not pending.any():
                break
    if boost:
        out += np.log(_unit(keys, 3 * _GAMMA_ROUNDS)) / shape
    return out


def beta_draw(keys: SampleKeys, alpha: float, beta: float) -> Tensor:
    """``λ ~ Beta(alpha, beta)``, float64 ``(B,)``, one per sample from its own key:
    ``λ = X / (X + Y)`` with independent ``X ~ Gamma(alpha)`` and ``Y ~ Gamma(beta)``."""
    log_x = _log_gamma_draw(keys.child(0), alpha)
    log_y = _log_gamma_draw(keys.child(1), beta)
    with np.errstate(over="ignore"):
        return torch.from_numpy(1.0 / (1.0 + np.exp(log_y - log_x)))  # X / (X + Y) without overflow


class Mixup(Augment):
    """mixup: each view becomes ``λ·x_i + (1 − λ)·x_j`` with a partner ``j`` and ``λ ~ Beta(α, α)``.

    Paper: H. Zhang, M. Cisse, Y. N. Dauphin, D. Lopez-Paz, "mixup: Beyond Empirical Risk
    Minimization", ICLR 2018, arXiv 1710.09412. The training target is mixed alike,
    ``λ·y_i + (1 − λ)·y_j``: the loader puts ``y_j`` and ``λ`` on the batch
    (:attr:`~distill.batch.Batch.mix_targets`, :attr:`~distill.batch.Batch.mix_lam`) and the
    ``ce`` and ``label_smoothing`` losses use them. A teacher sees the mixed input like the student.

    Per sample ``i`` of epoch ``e``, from its key (:class:`SampleKeys`): the partner ``j`` uniform
    over the **whole data set** (``0 .. N-1``, possibly ``i`` itself), ``λ`` from ``Beta(α, α)``,
    and, with ``p < 1``, whether the sample is mixed at all (``λ = 1`` when not). ``x_i`` and
    ``x_j`` are the finished views of the other transforms, each from its own keys, so a mixed
    view is a pure function of ``(seed, e, i)`` whatever the batch or the shard it lands in, and a
    teacher cache can hold it. Hence Mixup needs the data set (:func:`augmented_views`) and must be
    the last transform; ``apply`` on a batch alone is an error.

    Defaults: ``alpha = 1`` is the paper's CIFAR-10/100 setting (the reference code's ``--alpha 1``);
    the paper uses 0.1–0.4 on ImageNet. ``p = 1`` mixes every sample, as the paper does.

    Differences from the paper and its reference code (facebookresearch/mixup-cifar10): both draw
    one ``λ`` per mini-batch; here every sample has its own ``λ`` (the same distribution, drawn per
    sample so it replays). The paper's listing pairs two independently shuffled loaders, so the
    partner comes from the whole data set as here; the reference code pairs samples inside a
    batch (a random permutation), which would make a view depend on the batch it lands in.
    """

    def __init__(self, alpha: float = 1.0, p: float = 1.0) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"Mixup alpha must be a finite number > 0 (λ ~ Beta(alpha, alpha)); got {alpha!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"Mixup p must be in [0, 1]; got {p!r}")
        self.alpha = float(alpha)
        self.p = float(p)

    def params_for(self, keys: SampleKeys) -> MixupParams:
        if keys.num_samples is None or keys.num_samples < 1:
            raise ValueError("Mixup draws partners from the whole data set, but these keys do not say its size: "
                             "build them with SampleKeys.of(seed, epoch, index, num_samples=N)")
        partner = keys.integers(keys.num_samples, 0)
        lam = beta_draw(keys.child(2), self.alpha, self.alpha)
        if self.p < 1.0:
            lam = torch.where(keys.uniform(1) < self.p, lam, torch.ones_like(lam))
        return MixupParams(partner, lam)

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> MixupParams:
        raise TypeError(_MIXUP_NEEDS_DATA)

    def apply(self, x: Tensor, params: Any) -> Tensor:
        raise TypeError(_MIXUP_NEEDS_DATA)

    @staticmethod
    def mix(x: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
        """``λ·x + (1 − λ)·partner`` per sample: ``x``, ``partner`` ``(B, ...)``, ``lam`` ``(B,)`` → ``(B, ...)``,
        with ``λ`` cast to ``x``'s dtype."""
        if not x.is_floating_point():
            raise TypeError(f"Mixup needs floating-point inputs to mix; got {x.dtype}")
        w = lam.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return w * x + (1 - w) * partner

    def spec(self) -> dict[str, Any]:
        return {"type": "Mixup", "alpha": self.alpha, "p": self.p}

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha}, p={self.p})"


_MIXUP_NEEDS_DATA = ("Mixup mixes each sample with a partner from the whole data set, so it cannot augment a batch "
                     "alone: put it last in an InMemoryLoader's augment, or call "
                     "distill.data.augment.augmented_views(inputs, index, epoch, augment, seed)")


def _has_mixup(t: Augment) -> bool:
    return isinstance(t, Mixup) or (isinstance(t, Compose) and any(_has_mixup(u) for u in t.transforms))


def split_mixup(augment: Augment) -> tuple[Augment | None, Mixup | None]:
    """``(the transforms before Mixup, the Mixup)``: ``(augment, None)`` without one; ``(None, m)``
    for a bare Mixup. The first part, built on the same child streams, draws exactly what
    ``augment`` draws for them."""
    if isinstance(augment, Mixup):
        return None, augment
    if isinstance(augment, Compose) and augment.transforms and isinstance(augment.transforms[-1], Mixup):
        return Compose(augment.transforms[:-1]), augment.transforms[-1]
    return augment, None


def augmented_views(inputs: Tensor, index: Tensor, epoch: int, augment: Augment, seed: int,
                    x: Tensor | None = None) -> tuple[Tensor, MixupParams | None]:
    """The views ``(B, ...)`` of samples ``index`` ``(B,)`` (CPU, int64) of the data set ``inputs``
    ``(N, ...)`` in ``epoch`` with augmentation seed ``seed``, and the :class:`MixupParams` when
    ``augment`` ends with a :class:`Mixup` (else ``None``).

    ``x`` may pass ``inputs[index]`` when the caller has it already. Without Mixup this is
    ``augment.apply(x, augment.params_for(keys))``; with it, the partners' views are built from
    their own keys and mixed in (:meth:`Mixup.mix`).
    """
    n = int(inputs.shape[0])
    params = augment.params_for(SampleKeys.of(seed, epoch, index, num_samples=n))
    if x is None:
        x = inputs[index.to(inputs.device)]
    base, mixup = split_mixup(augment)
    if mixup is None:
        return augment.apply(x, params), None
    mix: MixupParams = params[-1] if base is not None else params
    partner_x = inputs[mix.partner.to(inputs.device)]
    if base is not None:
        x = base.apply(x, params[:-1])
        partner_x = base.apply(partner_x, base.params_for(SampleKeys.of(seed, epoch, mix.partner, num_samples=n)))
    return mixup.mix(x, partner_x, mix.lam), mix
