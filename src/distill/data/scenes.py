"""Dense-prediction scenes from real images: digits or clothes pasted on a blank canvas.

:func:`make_scenes` builds a detection / instance / semantic segmentation data set from MNIST,
Fashion-MNIST or scikit-learn's 8x8 digits, with no annotation beyond the images' class labels:

1. Per scene, ``n ~ U{objects[0] .. objects[1]}`` source images of the split are drawn, each resized
   (bilinear, antialiased) from its 28x28 (digits: 8x8) to a square of side
   ``round(28 · u)``, ``u ~ U(scale)`` pixels.
2. The *ink* of an object is its pixels with intensity ``> ink_threshold``; its instance mask is
   that ink, its box the tight box of the mask.
3. Objects are pasted one after the other at a uniform position where the whole resized square
   fits. A position is refused when the new box overlaps an object already placed by more than
   ``max_overlap`` of the smaller box's area (intersection over the smaller box), or when it
   would leave an earlier object with less than ``min_visible`` of its own ink (or no pixel) visible; after
   ``max_tries`` refused positions the object is left out (so a crowded scene may hold fewer
   than ``objects[1]`` objects).
4. **Occlusion rule: a later paste covers an earlier one.** On the later object's ink the canvas
   takes the later object's pixels; elsewhere in its square the canvas keeps the brighter of the
   two (``max``), so a faint antialiased rim never erases ink below it. A pixel belongs to the
   last object whose ink covers it: an earlier object's instance mask loses the covered pixels
   and its box is the tight box of what stays visible.

Hence, for every scene: the instance masks are disjoint; each box is the tight box of its mask;
the semantic mask is ``class + 1`` exactly on the instance masks and ``0`` (background)
elsewhere, so a segmenter has ``K_seg = 11`` classes; and a pixel lies in some mask exactly when
its intensity is ``> ink_threshold`` (pixels outside every mask are background, at most a faint
rim). The scenes are a pure function of ``(source, split, options, seed)``: numpy's PCG64
generators seeded with ``(seed, split)`` draw everything, so the same call gives the same scenes
on every machine, and the ``train`` and ``test`` splits use different layouts as well as
different source images.

Box convention: ``(x1, y1, x2, y2)`` in pixels with pixel ``(row r, column c)`` covering
``[c, c + 1) × [r, r + 1)``, so a mask's tight box is ``(min col, min row, max col + 1,
max row + 1)`` and its area is ``width · height`` (COCO's convention for ``[x, y, w, h]``).

Images stay pixels in [0, 1] (``SceneSet.images``); the loaders yield ``(x − mean) / std`` with
the set's ``mean`` / ``std``: ``(0,)`` / ``(1,)`` (pixels as they are) from :func:`make_scenes`,
the *train* split's statistics from ``get_dataset("mnist_scenes", normalize=True)`` (the
default; the mean and standard deviation of all pixels of 500 train scenes made with the same
options), as for the classification data sets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.batch import DenseBatch
from distill.data.augment import mix_seed
from distill.data.loader import GlobalBatchShards
from distill.data.sources import get_dataset, register_dataset

__all__ = ["SCENE_SOURCES", "Scene", "SceneLoader", "SceneSet", "make_scenes", "tight_boxes"]

SCENE_SOURCES = ("mnist", "fashion_mnist", "digits")
"""What :func:`make_scenes` pastes: MNIST digits, Fashion-MNIST clothes, scikit-learn's 8x8 digits."""

BASE_SIDE = 28
"""The side in pixels of an object at ``scale = 1`` (MNIST's size; the 8x8 digits are upscaled to it)."""

_SPLITS = {"mnist": ("train", "test"), "fashion_mnist": ("train", "test"), "digits": ("train", "val", "test")}
_SPLIT_CODE = {"train": 0, "test": 1, "val": 1}  # digits' "test" is its "val" part: the same scenes
_DEFAULT_SCENES = {"train": 2000, "test": 500, "val": 500}


class Scene(NamedTuple):
    """One scene: ``image`` (1, H, W) pixels in [0, 1]; ``boxes`` (n, 4) xyxy pixels; ``labels``
    (n,) long in [0, 10); ``instance_masks`` (n, H, W) bool; ``semantic`` (H, W) long, 0 =
    background, class + 1 on objects; ``sources`` (n,) long, the index of each object's image in
    the source split; ``placements`` (n, 3) long, each object's ``(top, left, side)`` square."""

    image: Tensor
    boxes: Tensor
    labels: Tensor
    instance_masks: Tensor
    semantic: Tensor
    sources: Tensor
    placements: Tensor


def tight_boxes(masks: Tensor) -> Tensor:
    """The tight box of each mask: ``masks`` (n, H, W) bool → (n, 4) float ``(x1, y1, x2, y2)``
    with ``x2 = rightmost column + 1`` and ``y2 = lowest row + 1`` (pixel edges). An empty mask
    raises ``ValueError`` (it has no box)."""
    if masks.dim() != 3:
        raise ValueError(f"tight_boxes expects masks (n, H, W), got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)  # (n, H), (n, W)
    empty = (~rows.any(1)).nonzero()
    if len(empty):
        raise ValueError(f"tight_boxes: mask {int(empty[0])} is empty, so it has no box")
    h, w = masks.shape[1:]
    r = torch.arange(h)
    c = torch.arange(w)
    y1 = torch.where(rows, r, h).min(1).values
    y2 = torch.where(rows, r, -1).max(1).values + 1
    x1 = torch.where(cols, c, w).min(1).values
    x2 = torch.where(cols, c, -1).max(1).values + 1
    return torch.stack([x1, y1, x2, y2], 1).float()


@dataclass
class SceneSet:
    """A split of scenes in memory (built by :func:`make_scenes`).

    Attributes:
        images: ``(N, 1, H, W)`` float pixels in [0, 1] (not normalised).
        boxes: per scene ``(n_i, 4)`` float ``(x1, y1, x2, y2)`` pixels, the tight box of each instance mask.
        labels: per scene ``(n_i,)`` long classes in ``[0, num_classes)``.
        instance_masks: per scene ``(n_i, H, W)`` bool, disjoint.
        semantic: ``(N, H, W)`` uint8: 0 background, ``class + 1`` on each object's mask.
        sources: per scene ``(n_i,)`` long: which image of the source split each object is.
        placements: per scene ``(n_i, 3)`` long: each object's pasted square ``(top, left, side)``.
        source, split, name: the source data set, its split, the registry name (``"mnist_scenes"``...).
        mean, std: per-channel normalisation the loaders apply, ``(x − mean) / std``.
        ink_threshold: the intensity above which a pixel is an object's ink.
    """

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    instance_masks: list[Tensor]
    semantic: Tensor
    sources: list[Tensor]
    placements: list[Tensor]
    source: str
    split: str
    name: str
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    ink_threshold: float = 0.25
    num_classes: int = 10

    @property
    def num_seg_classes(self) -> int:
        """Classes of the semantic masks: background + one per object class (11)."""
        return self.num_classes + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(1, H, W)``."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> Scene:
        return Scene(self.images[i], self.boxes[i], self.labels[i], self.instance_masks[i],
                     self.semantic[i].long(), self.sources[i], self.placements[i])

    def normalize(self, x: Tensor) -> Tensor:
        """Pixels ``(B, 1, H, W)`` → model inputs ``(x − mean) / std``."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model inputs ``(B, 1, H, W)`` → pixels in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def with_normalization(self, mean: Sequence[float], std: Sequence[float]) -> SceneSet:
        """The same scenes with loaders that yield ``(x − mean) / std``."""
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 1 or len(std) != 1 or not std[0] > 0:
            raise ValueError(f"scene images have 1 channel: mean and std need one value each, std > 0; got {mean}, {std}")
        return replace(self, mean=mean, std=std)

    def subset(self, index: Sequence[int] | Tensor) -> SceneSet:
        """The scenes at ``index`` (in that order), e.g. a labelled part for semi-supervised training."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"subset: indices must lie in [0, {len(self)}), got [{int(idx.min())}, {int(idx.max())}]")
        pick = idx.tolist()
        return replace(self, images=self.images[idx], semantic=self.semantic[idx],
                       boxes=[self.boxes[i] for i in pick], labels=[self.labels[i] for i in pick],
                       instance_masks=[self.instance_masks[i] for i in pick],
                       sources=[self.sources[i] for i in pick], placements=[self.placements[i] for i in pick])

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0, *, drop_last: bool = False,
               masks: bool = True) -> SceneLoader:
        """A :class:`SceneLoader` over this split (``masks=False`` leaves the instance masks out)."""
        return SceneLoader(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, masks=masks)


class SceneLoader(GlobalBatchShards):
    """Batches of a :class:`SceneSet` as :class:`~distill.batch.DenseBatch`: ``inputs`` (B, 1, H, W)
    normalised images, ``targets`` (B, H, W) long semantic masks, ``index`` (B,), ``boxes``,
    ``labels`` and ``instance_masks`` lists. The order of epoch ``e`` is a pure function of
    ``(seed, e)`` (``set_epoch``); under ``torchrun`` each rank yields its part of every global batch.
    Holds no ``targets`` tensor attribute, so ``fit`` does not mistake the masks for class labels."""

    def __init__(self, scenes: SceneSet, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, masks: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SceneLoader: batch_size must be an int >= 1, got {batch_size!r}")
        if len(scenes) == 0:
            raise ValueError("SceneLoader: the scene set is empty")
        self.scenes, self.batch_size, self.shuffle, self.seed = scenes, batch_size, bool(shuffle), int(seed)
        self.drop_last, self.masks = bool(drop_last), bool(masks)
        self.epoch = 0
        self.index_space = len(scenes)  # per-sample state (memory banks) has one row per scene

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"SceneLoader.set_epoch expects an int >= 0; got {epoch!r}")
        self.epoch = epoch

    def _global_batches(self) -> list[Tensor]:
        n = len(self.scenes)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))
                 if self.shuffle else torch.arange(n))
        batches = list(order.split(self.batch_size))
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.world_size > 1 and batches and len(batches[-1]) < self.world_size:
            batches.pop()  # a rank would get no sample
        return batches

    def __len__(self) -> int:
        return len(self._global_batches())

    def __iter__(self) -> Iterator[DenseBatch]:
        s = self.scenes
        for idx in self._global_batches():
            pick = idx.tolist()
            batch = DenseBatch(s.normalize(s.images[idx]), s.semantic[idx].long(), idx,
                               boxes=[s.boxes[i] for i in pick], labels=[s.labels[i] for i in pick],
                               instance_masks=[s.instance_masks[i] for i in pick] if self.masks else None)
            yield self._shard(batch)

    def __repr__(self) -> str:
        s = self.scenes
        return f"SceneLoader({s.name} {s.split}, {len(s)} scenes, batch_size={self.batch_size}, shuffle={self.shuffle})"


def _check_pair(name: str, value: Any, lo: float, integer: bool) -> tuple[Any, Any]:
    kind = int if integer else (int, float)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, kind) for v in value)
            or not lo <= value[0] <= value[1]):
        raise ValueError(f"make_scenes: {name} must be a pair (min, max) of {'ints' if integer else 'numbers'} with "
                         f"{lo} <= min <= max, got {value!r}")
    return value[0], value[1]


def _source_split(source: str, split: str, root: str | os.PathLike[str] | None) -> tuple[Tensor, Tensor]:
    data = get_dataset(source, root if source != "digits" else None, split=split, normalize=False)
    return data.inputs.float(), data.targets.long()


def _resize(images: Tensor, index: np.ndarray, sides: np.ndarray) -> list[np.ndarray]:
    """Each ``images[index[k]]`` (1, h, w) resized to ``sides[k]`` x ``sides[k]``; one call per side."""
    out: list[np.ndarray] = [np.empty(0)] * len(index)
    for side in np.unique(sides):
        where = np.nonzero(sides == side)[0]
        picked = images[torch.from_numpy(index[where])]
        resized = F.interpolate(picked, size=(int(side), int(side)), mode="bilinear", align_corners=False,
                                antialias=True).clamp_(0.0, 1.0)[:, 0].numpy()
        for k, patch in zip(where.tolist(), resized):
            out[k] = patch
    return out


def _compose(patches: list[np.ndarray], canvas: int, rng: np.random.Generator, *, threshold: float,
             max_overlap: float, min_visible: float, max_tries: int) -> tuple[np.ndarray, np.ndarray, list[int],
                                                                              list[tuple[int, int, int]]]:
    """Paste ``patches`` on one canvas; returns the image (H, W), the owner map (H, W) (-1 background,
    else the position in the kept list), which patches were kept and where."""
    image = np.zeros((canvas, canvas), np.float32)
    owner = np.full((canvas, canvas), -1, np.int64)
    kept: list[int] = []
    where: list[tuple[int, int, int]] = []
    boxes: list[list[int]] = []  # visible tight boxes (x1, y1, x2, y2)
    visible: list[int] = []  # visible ink pixels per kept object
    full: list[int] = []  # own ink pixels per kept object
    for p, patch in enumerate(patches):
        ink = patch > threshold
        if not ink.any():
            continue
        side = patch.shape[0]
        rows, cols = np.nonzero(ink.any(1))[0], np.nonzero(ink.any(0))[0]
        own = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        count = int(ink.sum())
        for top, left in rng.integers(0, canvas - side + 1, size=(max_tries, 2)).tolist():
            box = (left + own[0], top + own[1], left + own[2], top + own[3])
            area = (box[2] - box[0]) * (box[3] - box[1])
            if any(max(0, min(box[2], b[2]) - max(box[0], b[0])) * max(0, min(box[3], b[3]) - max(box[1], b[1]))
                   > max_overlap * min(area, (b[2] - b[0]) * (b[3] - b[1])) for b in boxes):
                continue
            under = owner[top:top + side, left:left + side][ink]
            covered = np.bincount(under[under >= 0], minlength=len(kept))
            if any(visible[k] - covered[k] < max(min_visible * full[k], 1) for k in np.nonzero(covered)[0]):
                continue
            region = image[top:top + side, left:left + side]
            region[...] = np.where(ink, patch, np.maximum(region, patch))
            owner[top:top + side, left:left + side][ink] = len(kept)
            for k in np.nonzero(covered)[0]:
                visible[k] -= int(covered[k])
                r, c = np.nonzero(owner == k)
                boxes[k] = [int(c.min()), int(r.min()), int(c.max()) + 1, int(r.max()) + 1]
            kept.append(p)
            where.append((top, left, side))
            boxes.append(list(box))
            visible.append(count)
            full.append(count)
            break
    return image, owner, kept, where


def make_scenes(
    source: str = "mnist",
    split: str = "train",
    *,
    n_scenes: int | None = None,
    canvas: int = 64,
    objects: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = (0.6, 1.2),
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    max_overlap: float = 0.2,
    min_visible: float = 0.6,
    ink_threshold: float = 0.25,
    max_tries: int = 20,
) -> SceneSet:
    """Build ``n_scenes`` scenes of real images pasted on a ``canvas`` x ``canvas`` black canvas.

    The procedure, the occlusion rule and the box convention are in the module docstring.

    Args:
        source: ``"mnist"``, ``"fashion_mnist"`` or ``"digits"`` (scikit-learn's, embedded).
        split: the source split the objects come from: ``"train"`` / ``"test"`` (digits: ``"train"``
            / ``"val"``, ``"test"`` meaning ``"val"``).
        n_scenes: how many scenes (default 2,000 for ``"train"``, 500 otherwise).
        canvas: side of the square image in pixels (64 or 96 suit the detectors; any >= 16).
        objects: ``(min, max)`` objects per scene, the count uniform in between.
        scale: ``(lo, hi)``: each object's square side is ``round(28 · u)``, ``u ~ U(lo, hi)``;
            ``28 · hi`` must fit the canvas.
        seed: with ``source``, ``split`` and the options, fixes every scene.
        root: the source's IDX folder (default as :func:`~distill.data.sources.get_dataset`).
        max_overlap: the most a new object's box may overlap an earlier one's, as a fraction of the
            smaller box's area (0: boxes never overlap).
        min_visible: the least fraction of its own ink an object keeps visible when later ones cover it.
        ink_threshold: intensity above which a pixel is ink (instance masks, boxes).
        max_tries: positions tried per object before it is left out.

    Returns:
        a :class:`SceneSet` with pixel images (mean 0, std 1: no normalisation).

    Raises:
        ValueError: an unknown source or split, or an option out of range (names it and what is expected).
        FileNotFoundError: the MNIST / Fashion-MNIST files are missing (from the loader).
    """
    if source not in SCENE_SOURCES:
        raise ValueError(f"make_scenes: source must be one of {SCENE_SOURCES}, got {source!r}")
    if split not in _SPLITS[source]:
        raise ValueError(f"make_scenes: source {source!r} has splits {list(_SPLITS[source])}, got split={split!r}")
    if n_scenes is None:
        n_scenes = _DEFAULT_SCENES[split]
    for name, value, lo in (("n_scenes", n_scenes, 1), ("canvas", canvas, 16), ("max_tries", max_tries, 1),
                            ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"make_scenes: {name} must be an int >= {lo}, got {value!r}")
    n_min, n_max = _check_pair("objects", objects, 0, integer=True)
    lo, hi = _check_pair("scale", scale, 1e-9, integer=False)
    if round(BASE_SIDE * hi) > canvas or round(BASE_SIDE * lo) < 2:
        raise ValueError(f"make_scenes: scale={tuple(scale)} gives objects of {round(BASE_SIDE * lo)} to "
                         f"{round(BASE_SIDE * hi)} pixels; they must be >= 2 and fit the canvas of {canvas}")
    for name, value in (("max_overlap", max_overlap), ("min_visible", min_visible), ("ink_threshold", ink_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"make_scenes: {name} must be a number in [0, 1], got {value!r}")
    if ink_threshold >= 1.0:
        raise ValueError("make_scenes: ink_threshold must be < 1 (no pixel is brighter than 1)")

    images, classes = _source_split(source, split, root)
    code = _SPLIT_CODE[split]
    draw = np.random.default_rng([seed, code, 0])  # counts, source images, sizes
    place = np.random.default_rng([seed, code, 1])  # positions
    counts = draw.integers(n_min, n_max + 1, size=n_scenes)
    picks = draw.integers(0, len(images), size=int(counts.sum()))
    sides = np.rint(BASE_SIDE * draw.uniform(lo, hi, size=len(picks))).astype(np.int64)
    patches = _resize(images, picks, sides)

    out_images = np.zeros((n_scenes, 1, canvas, canvas), np.float32)
    owners = np.full((n_scenes, canvas, canvas), -1, np.int32)  # per pixel: which object of all scenes
    kept_all: list[int] = []  # position in `picks` of each object kept, scene after scene
    where_all: list[tuple[int, int, int]] = []
    per_scene: list[int] = []
    start = 0
    for i, n in enumerate(counts.tolist()):
        image, owner, kept, where = _compose(patches[start:start + n], canvas, place, threshold=ink_threshold,
                                             max_overlap=max_overlap, min_visible=min_visible, max_tries=max_tries)
        out_images[i, 0] = image
        np.add(owner, len(kept_all), out=owners[i], where=owner >= 0)
        kept_all += [start + k for k in kept]
        where_all += where
        per_scene.append(len(kept))
        start += n
    # every scene's masks, boxes and semantic map at once
    src = torch.as_tensor(picks[kept_all], dtype=torch.long).reshape(-1)
    lab = classes[src]
    owner_t = torch.from_numpy(owners)
    inst = torch.empty((len(src), canvas, canvas), dtype=torch.bool)  # (M, H, W)
    offset = 0
    for i, n in enumerate(per_scene):
        torch.eq(owner_t[i][None], torch.arange(offset, offset + n, dtype=torch.int32)[:, None, None], out=inst[offset:offset + n])
        offset += n
    semantic = torch.where(owner_t >= 0, (lab + 1).to(torch.uint8)[owner_t.clamp_min(0)] if len(lab) else 0,
                           0).to(torch.uint8)
    boxes = tight_boxes(inst)
    place_t = torch.tensor(where_all, dtype=torch.long).reshape(-1, 3)
    return SceneSet(torch.from_numpy(out_images), list(boxes.split(per_scene)), list(lab.split(per_scene)),
                    list(inst.split(per_scene)), semantic, list(src.split(per_scene)), list(place_t.split(per_scene)),
                    source=source, split=split, name=_NAMES[source], ink_threshold=float(ink_threshold))


# --------------------------------------------------------------------------------------------
# get_dataset("mnist_scenes" | "fashion_scenes" | "digits_scenes", ...)
# --------------------------------------------------------------------------------------------

_NAMES = {"mnist": "mnist_scenes", "fashion_mnist": "fashion_scenes", "digits": "digits_scenes"}
STATS_SCENES = 500
"""How many train scenes (made with the same options) give the normalisation statistics of ``get_dataset``."""
_STATS: dict[tuple[Any, ...], tuple[float, float]] = {}


def _stats_key(source: str, root: Any, options: dict[str, Any]) -> tuple[Any, ...]:
    return source, None if root is None else str(root), tuple(sorted(options.items()))


def _registered(source: str) -> Any:
    def build(root: str | os.PathLike[str] | None, split: str, normalize: bool, **options: Any) -> SceneSet:
        split = "val" if source == "digits" and split == "test" else split
        scenes = make_scenes(source, split, root=root, **options)
        if not normalize:
            return scenes
        common = {k: v for k, v in options.items() if k != "n_scenes"}
        key = _stats_key(source, root, common)
        if key not in _STATS:  # the train split's statistics (of its first STATS_SCENES), shared by every split
            same = split == "train" and options.get("n_scenes") == STATS_SCENES
            train = scenes if same else make_scenes(source, "train", root=root, n_scenes=STATS_SCENES, **common)
            x = train.images.double()
            _STATS[key] = float(x.mean()), max(float(x.std()), 1e-8)
        mean, std = _STATS[key]
        return scenes.with_normalization((mean,), (std,))

    build.__doc__ = f"get_dataset({_NAMES[source]!r}, ...): :func:`make_scenes` of {source!r}; options pass through."
    return build


for _source in SCENE_SOURCES:
    register_dataset(_NAMES[_source], _registered(_source))
