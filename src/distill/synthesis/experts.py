"""Expert trajectories for Matching Training Trajectories (MTT), buffered to disk.

Paper: G. Cazenavette, T. Wang, A. Torralba, A. A. Efros, J.-Y. Zhu, "Dataset Distillation by
Matching Training Trajectories", CVPR 2022, arXiv 2203.11932 (reference code:
github.com/GeorgeCazenavette/mtt-distillation, ``buffer.py``).

An *expert* is a network (ConvNet-3 by default) trained from a random initialisation on the real
data with plain SGD for ``epochs`` epochs; its flattened parameters are recorded at the start and
after every epoch, ``theta*_0 ... theta*_E`` (``E + 1`` points). The paper trains experts with
differentiable siamese augmentation (DSA) on every real batch, as the reference code does
(``buffer.py``: 50 epochs, lr 0.01, no momentum, no weight decay, batch 256, 100 experts; those are
our defaults).

On disk (one folder; nothing read back executes code)::

    buffer.json              settings, parameter names and shapes, format tag
    expert_000.safetensors   {"trajectory": (E + 1, P) float32}
    expert_001.safetensors   ...

:func:`buffer_experts` reuses a folder whose settings match (training only the experts still
missing, so an interrupted buffer resumes) and refuses one whose settings differ, naming each
difference. Our own layout, not the reference code's (which pickles lists of tensors with
``torch.save``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import create
from distill.synthesis._checks import check_int
from distill.synthesis._real import check_real_set
from distill.synthesis.progress import StepProgress

__all__ = ["BUFFER_FORMAT", "ExpertBuffer", "ParamLayout", "buffer_experts", "data_fingerprint", "load_experts"]

BUFFER_FORMAT = "distill.mtt_buffer/1"
_SETTINGS_FILE = "buffer.json"


def _expert_file(k: int) -> str:
    return f"expert_{k:03d}.safetensors"


@dataclass(frozen=True)
class ParamLayout:
    """How a model's parameters map to one flat vector ``(P,)`` (in ``named_parameters`` order)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        """``P``: the number of scalars."""
        return sum(self.numels)

    def flatten(self, model: nn.Module) -> Tensor:
        """The model's parameters as one detached float32 vector ``(P,)``."""
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``(P,)`` -> ``{name: tensor of its shape}`` (views: gradients flow back into ``flat``),
        for ``torch.func.functional_call``."""
        if flat.dim() != 1 or flat.numel() != self.size:
            raise ValueError(f"expected flattened parameters ({self.size},); got shape {tuple(flat.shape)}")
        pieces = torch.split(flat, self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, pieces, self.shapes)}


def data_fingerprint(images: Tensor, labels: Tensor) -> str:
    """sha256 over the shapes and float32 / int64 bytes of ``images (N, C, H, W)`` and ``labels (N,)``."""
    h = hashlib.sha256()
    for t, dtype in ((images, torch.float32), (labels, torch.int64)):
        t = t.detach().to("cpu", dtype).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class ExpertBuffer:
    """A folder of expert trajectories; points are read lazily (one slice of one file at a time).

    Attributes:
        directory: the folder.
        settings: what the experts were trained with (model, model_kwargs, epochs, lr, momentum,
            weight_decay, batch_size, dsa, seed, data fingerprint).
        layout: the parameters' names and shapes.
        num_experts: how many expert files are complete.
    """

    directory: Path
    settings: dict[str, Any]
    layout: ParamLayout
    num_experts: int

    @property
    def epochs(self) -> int:
        """``E``: each trajectory holds ``E + 1`` points (epoch 0 = the initialisation)."""
        return int(self.settings["epochs"])

    def points(self, expert: int, epochs: Sequence[int]) -> Tensor:
        """``theta*_e`` of expert ``expert`` for each ``e`` in ``epochs``: ``(len(epochs), P)``."""
        from safetensors import safe_open

        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range: the buffer at {str(self.directory)!r} holds "
                             f"{self.num_experts}")
        for e in epochs:
            if not 0 <= e <= self.epochs:
                raise IndexError(f"epoch {e} out of range: trajectories hold epochs 0..{self.epochs}")
        with safe_open(str(self.directory / _expert_file(expert)), framework="pt") as f:
            sl = f.get_slice("trajectory")
            return torch.stack([sl[e] for e in epochs])

    def trajectory(self, expert: int) -> Tensor:
        """The whole trajectory of one expert ``(E + 1, P)``."""
        return self.points(expert, range(self.epochs + 1))


def _read_settings(folder: Path) -> dict[str, Any] | None:
    path = folder / _SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); not an expert buffer written by buffer_experts") from None
    if not isinstance(data, dict) or data.get("format") != BUFFER_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: format {got!r}, expected {BUFFER_FORMAT!r}")
    return data


def _complete_experts(folder: Path) -> int:
    k = 0
    while (folder / _expert_file(k)).is_file():
        k += 1
    return k


def load_experts(directory: str | os.PathLike[str]) -> ExpertBuffer:
    """Open a buffer written by :func:`buffer_experts`.

    Raises:
        FileNotFoundError: no ``buffer.json`` or no complete expert in ``directory``.
        ValueError: a ``buffer.json`` of another format.
    """
    folder = Path(directory)
    data = _read_settings(folder)
    if data is None:
        raise FileNotFoundError(f"no expert buffer at {str(folder)!r} (expected {_SETTINGS_FILE} written by "
                                "buffer_experts)")
    n = _complete_experts(folder)
    if n == 0:
        raise FileNotFoundError(f"the expert buffer at {str(folder)!r} holds no complete expert yet")
    layout = ParamLayout(tuple(data["param_names"]), tuple(tuple(s) for s in data["param_shapes"]))
    return ExpertBuffer(folder, data["settings"], layout, n)


def _dsa_module(dsa: bool | str) -> Any:
    if dsa is False or dsa is None:
        return None
    from distill.synthesis.dsa import DSA

    return DSA() if dsa is True else DSA(strategy=dsa)


def _train_expert(model: nn.Module, layout: ParamLayout, images: Tensor, labels: Tensor, *, epochs: int,
                  lr: float, momentum: float, weight_decay: float, batch_size: int, dsa: Any,
                  generator: torch.Generator, advance: Any) -> Tensor:
    """Plain SGD on the real data; returns the trajectory ``(epochs + 1, P)``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    points = [layout.flatten(model)]
    n = images.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx.to(images.device)], labels[idx.to(labels.device)]
            if dsa is not None:
                x = dsa(x, generator=generator)  # a fresh draw per image, as the reference DiffAugment
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            advance(float(loss.detach()))
        flat = layout.flatten(model)
        if not bool(torch.isfinite(flat).all()):
            raise FloatingPointError(f"expert training diverged (non-finite parameters) with lr={lr}: lower it")
        points.append(flat)
    return torch.stack(points)


def buffer_experts(
    images: Tensor,
    labels: Tensor,
    directory: str | os.PathLike[str],
    *,
    num_classes: int,
    num_experts: int = 100,
    epochs: int = 50,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    model: str = "convnet3",
    model_kwargs: dict[str, Any] | None = None,
    dsa: bool | str = True,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> ExpertBuffer:
    """Train (or reuse) ``num_experts`` expert trajectories on the real data and buffer them.

    Args:
        images: real training images ``(N, C, H, W)`` (normalised as the synthetic set will be).
        labels: their classes ``(N,)`` int64 in ``[0, num_classes)``.
        directory: the buffer folder (created if absent).
        num_classes: ``K``.
        num_experts: experts to have in the buffer (the paper: 100).
        epochs: ``E``, epochs per expert (the reference code: 50).
        lr, momentum, weight_decay, batch_size: the experts' SGD (the reference code's defaults:
            0.01, 0, 0, 256).
        model: a model-zoo name, built as ``create(model, num_classes=K, in_channels=C,
            image_size=H, **model_kwargs)``.
        model_kwargs: extra arguments of the model (e.g. ``{"width": 64}``).
        dsa: True for DSA with the default strategy on every real batch (as the paper), a DSA
            strategy string, or False for none.
        seed: expert ``k`` is initialised and shuffled from seed ``seed + k``.
        progress: a rich progress bar.
        device: where the experts train (None: the CPU); the buffer holds CPU tensors either way.

    Returns:
        The :class:`ExpertBuffer`; its first ``num_experts`` experts are the ones asked for.

    Raises:
        ValueError: a bad argument, or ``directory`` holds a buffer trained with other settings
            (each differing key is named) or on other data.
    """
    check_real_set(images, labels, None, num_classes, "buffer_experts", min_classes=2)
    for name, value in (("num_experts", num_experts), ("epochs", epochs), ("batch_size", batch_size)):
        check_int(name, value, who="buffer_experts")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"buffer_experts: lr must be a positive number; got {lr!r}")
    c, h = int(images.shape[1]), int(images.shape[2])
    kwargs = {"num_classes": num_classes, "in_channels": c, "image_size": h, **(model_kwargs or {})}
    settings = {
        "model": model, "model_kwargs": kwargs, "epochs": epochs, "lr": float(lr), "momentum": float(momentum),
        "weight_decay": float(weight_decay), "batch_size": batch_size,
        "dsa": dsa if isinstance(dsa, str) else bool(dsa), "seed": int(seed),
        "data": data_fingerprint(images, labels),
    }
    settings = json.loads(json.dumps(settings))  # the form it has once read back (tuples -> lists)
    dsa_mod = _dsa_module(dsa)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"buffer_experts: {str(folder)!r} is a file, not a folder")
    existing = _read_settings(folder)
    probe = create(model, **kwargs)
    layout = ParamLayout.of(probe)
    if existing is not None:
        diffs = [f"{k}: buffer has {existing['settings'].get(k)!r}, asked {settings[k]!r}"
                 for k in settings if existing["settings"].get(k) != settings[k]]
        diffs += [f"{k}: buffer has {existing['settings'][k]!r}, asked nothing"
                  for k in existing["settings"] if k not in settings]
        if diffs:
            raise ValueError(f"buffer_experts: the buffer at {str(folder)!r} was made with other settings "
                             f"({'; '.join(diffs)}); use another folder or delete this one")
        if [list(s) for s in layout.shapes] != existing["param_shapes"]:
            raise ValueError(f"buffer_experts: the buffer at {str(folder)!r} holds parameters of other shapes")
    else:
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"buffer_experts: {str(folder)!r} holds files but no {_SETTINGS_FILE}; "
                                  "expected an empty or new folder")
        from distill.files import atomic_write_json

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / _SETTINGS_FILE, {
            "format": BUFFER_FORMAT, "settings": settings, "param_names": list(layout.names),
            "param_shapes": [list(s) for s in layout.shapes], "num_params": layout.size,
        })
    dev = torch.device(device) if device is not None else torch.device("cpu")
    done = _complete_experts(folder)
    todo = list(range(done, num_experts))
    if todo:
        from safetensors.torch import save as st_save

        from distill.files import atomic_write_bytes

        steps = len(todo) * epochs * math.ceil(images.shape[0] / batch_size)
        with StepProgress(progress, "experts", steps) as bar:
            for k in todo:
                generator = torch.Generator().manual_seed(int(seed) + k)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seed) + k)
                    net = create(model, **kwargs).to(dev)
                traj = _train_expert(net, layout, images.to(dev), labels.to(dev), epochs=epochs, lr=float(lr), momentum=momentum,
                                     weight_decay=weight_decay, batch_size=batch_size, dsa=dsa_mod,
                                     generator=generator, advance=lambda loss, k=k: bar.advance(f"expert {k}  loss {loss:.4f}"))
                atomic_write_bytes(folder / _expert_file(k), st_save({"trajectory": traj.contiguous()}))
    buf = load_experts(folder)
    buf.num_experts = min(buf.num_experts, num_experts)
    return buf
