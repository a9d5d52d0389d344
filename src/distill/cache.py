"""Teacher-output cache: run the teacher once over the training set, read its outputs every epoch.

FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022,
arXiv 2112.01528) and TinyViT (Wu et al., "TinyViT: Fast Pretraining Distillation for Small
Vision Transformers", ECCV 2022, arXiv 2207.10666) store a teacher's soft labels once, for the
exact augmented views the student will see, and drop the teacher from the training loop.

What one cache holds, per sample and per stored view (one view per epoch when the data is
augmented, FKD's region-level soft labels; one in all for ``views="plain"``):

* the logits, ``dense`` ``(K,)``; or ``topk``: the ``k`` largest logits ``(k,)`` with their class
  indices ``(k,)``, plus one number ``fill`` for the ``K - k`` others (below);
* the tapped features a method needs (``taps``), e.g. ``"stage2"`` ``(C, H, W)``;
* a probe of the input ``(2,)`` (a fixed weighted sum, and its scale) that every read compares
  with the batch's inputs, so a row is never served for a sample or view it was not built from.

With a :class:`~distill.data.augment.Mixup` in the augmentation the stored view of sample ``i`` is
the mixed one, ``λ·x_i + (1 − λ)·x_j`` (partner and ``λ`` replayed from ``(seed, epoch, i)``), and
the manifest's augmentation record holds Mixup's ``alpha`` and ``p``.

Values are stored in fp16 or fp32 (``fill`` and the probe always in fp32/fp64).

**Top-k and the tail.** FKD's "marginal smoothing" and DistillKit's ``symmetric_uniform`` keep the
teacher's top-k probabilities and spread the remaining mass ``m`` uniformly over the other classes.
We store the top-k *logits* and ``fill = T (logsumexp_{j not in top-k}(z_j / T) - log(K - k))``, the
logit that, put at every non-top-k class, gives that class set exactly its true mass ``m`` at the
temperature ``T`` the manifest records. The view's logits are the top-k logits at their classes
and ``fill`` elsewhere, so ``softmax(logits / T)`` equals the teacher's top-k probabilities and
``m / (K - k)`` on each other class, and ``m = (K-k) e^{fill/T} / (sum_topk e^{z/T} + (K-k) e^{fill/T})``
can be recomputed from what is stored. With ``k == K`` the logits are exact (any temperature); for
``k < K`` they are an approximation, exact in the top-k and in the tail's total mass at ``T`` only.
Difference from DistillKit (``distillkit/lossfuncs/kl.py``): its sparse KL compares the teacher's
tail mass with the student's as one bucket, while a method given our dense view also pulls the
student's tail towards uniform; the two agree when the student's tail is uniform.

**Safety.** The manifest (``manifest.json``) records the teacher's fingerprint (a hash of its
weights and buffers), the data's (hashes of inputs and targets), the augmentation (its settings,
seed and per-sample key scheme), the views and epochs covered, ``k``, the dtype, the shapes, and
one sha256 per epoch block of the data file (``data.bin``, read with ``numpy.memmap``). Opening
checks the file size always and the checksums at open (``verify="open"``) or each block before
its first read (``verify="lazy"``). Using a cache with another teacher, other data or other
augmentation is a :class:`CacheMismatchError` naming each difference; a truncated, corrupted or
unfinished cache is a :class:`CacheError`.

Under ``torchrun`` each rank reads the rows of the samples its loader yields (rows are looked up
by global sample index), so the cache works unchanged with any sharding; build it once, on one
process, before training.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from distill.batch import Batch, View
from distill.data.augment import KEY_DERIVATION, Augment, augmented_views
from distill.files import atomic_write_json
from distill.locks import RunLock
from distill.papers import Paper
from distill.teachers import (
    EnsembleTeacher,
    FrozenTeacher,
    TeacherSource,
    as_teacher_source,
    check_logits,
)

__all__ = [
    "CacheError",
    "CacheMismatchError",
    "CachedTeacher",
    "TeacherCache",
    "build_cache",
    "data_fingerprint",
    "list_teacher_sources",
    "open_cache",
    "replay_views",
    "teacher_fingerprint",
]

FORMAT = "distill.teacher-cache/1"
MANIFEST = "manifest.json"
DATA_FILE = "data.bin"
_ALIGN = 64  # byte alignment of each array in a block
_DTYPES = {"fp16": np.float16, "fp32": np.float32}
_PROBE_SEED = 0x5EED
_PROBE_RTOL = 1e-6  # of the probe's scale: far above fp64 summation-order noise, far below any other view


class CacheError(ValueError):
    """A teacher cache that is missing, unfinished, truncated or corrupted."""


class CacheMismatchError(ValueError):
    """A teacher cache built for another teacher, other data or another augmentation."""


# ----------------------------------------------------------------------------------- fingerprints


def _hash_tensor(h: Any, name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def data_fingerprint(data: Tensor) -> str:
    """sha256 of a data tensor (training inputs ``(N, ...)`` or targets ``(N,)``): dtype, shape and values."""
    h = hashlib.sha256()
    _hash_tensor(h, "data", data)
    return h.hexdigest()


def teacher_fingerprint(teacher: nn.Module | Sequence[nn.Module] | TeacherSource) -> str:
    """sha256 of what fixes a teacher's outputs: every parameter and buffer (names, dtypes, shapes,
    values), the module classes, and a teacher source's settings (dtype; an ensemble's combine,
    temperature and weights). A bare model and ``FrozenTeacher(model)`` hash alike; nothing is
    modified (the model is not frozen)."""
    if isinstance(teacher, (list, tuple)):
        modules: list[nn.Module] = list(teacher)
        settings = ["ensemble(probs, T=1.0, uniform)"]  # as_teacher_source's defaults for a list
    elif isinstance(teacher, nn.Module):
        modules, settings = [teacher], []
    else:
        raise TypeError(f"teacher must be an nn.Module, a list of them or a TeacherSource; got {type(teacher).__name__}")
    h = hashlib.sha256()
    for s in settings:
        h.update(s.encode())
    for k, root in enumerate(modules):
        if isinstance(root, FrozenTeacher):  # hash the model it wraps, so model and FrozenTeacher(model) agree
            if root.dtype is not None:
                h.update(f"frozen dtype={root.dtype}|".encode())
            root = root.model
        for name, m in root.named_modules():
            h.update(f"{k}:{name}:{type(m).__qualname__}|".encode())
            if isinstance(m, FrozenTeacher):
                h.update(f"dtype={m.dtype}|".encode())
            if isinstance(m, EnsembleTeacher):
                h.update(f"combine={m.combine}|T={m.temperature!r}|".encode())
        for name, p in root.named_parameters():
            _hash_tensor(h, f"{k}:p:{name}", p)
        for name, b in root.named_buffers():  # non-persistent ones too (an ensemble's weights)
            _hash_tensor(h, f"{k}:b:{name}", b)
    return h.hexdigest()


def teacher_mismatch(record: dict[str, Any], teacher: Any) -> list[str]:
    """``[]`` when ``teacher`` (``None``: unchecked) has the fingerprint a manifest's ``record``
    (``{"fingerprint", "description"}``) holds, else the one problem line naming both hashes."""
    if teacher is None:
        return []
    fp = teacher_fingerprint(teacher)
    if fp == record["fingerprint"]:
        return []
    return [f"teacher: the cache was built from {record.get('description')} with weights hashing to "
            f"{record['fingerprint'][:12]}…, this teacher's hash to {fp[:12]}…"]


def raise_mismatches(path: Path, problems: list[str], rebuild: str) -> None:
    """Raise one :class:`CacheMismatchError` listing ``problems`` (nothing when there are none);
    ``rebuild`` says how to build the cache again."""
    if problems:
        raise CacheMismatchError(f"the teacher cache {str(path)!r} does not match:\n  " + "\n  ".join(problems)
                                 + f"\n  (build it again for these, {rebuild}, or use the live teacher)")


def _describe_teacher(source: TeacherSource) -> str:
    if isinstance(source, FrozenTeacher):
        m = source.model
        return f"{type(m).__name__} ({sum(p.numel() for p in m.parameters()):,} parameters)" + (
            f", {source.dtype}" if source.dtype is not None else "")
    if isinstance(source, EnsembleTeacher):
        return f"ensemble of {len(source.members)} ({source.combine}, T={source.temperature})"
    return type(source).__name__


def _augment_record(augment: Augment | None, seed: int) -> dict[str, Any] | None:
    if augment is None:
        return None
    return {"spec": augment.spec(), "seed": int(seed), "keys": KEY_DERIVATION}


# ----------------------------------------------------------------------------------- views


def replay_views(inputs: Tensor, index: Tensor, epoch: int, augment: Augment | None, seed: int) -> Tensor:
    """The views ``(B, ...)`` of samples ``index`` ``(B,)`` that an
    :class:`~distill.data.loader.InMemoryLoader` over ``inputs`` with this ``augment`` and
    ``augment_seed=seed`` yields in ``epoch``: ``augment.apply(inputs[index], augment.params_for(
    SampleKeys.of(seed, epoch, index, num_samples=N)))``, mixed with the partners' views when
    ``augment`` ends with a :class:`~distill.data.augment.Mixup`
    (:func:`~distill.data.augment.augmented_views`). The un-augmented inputs when ``augment`` is ``None``."""
    if augment is None:
        return inputs[index.to(inputs.device)]
    return augmented_views(inputs, index, epoch, augment, seed)[0]


_probe_weights: dict[tuple[int, str], Tensor] = {}


def _probe(x: Tensor, with_scale: bool = True) -> tuple[Tensor, Tensor | None]:
    """A fixed weighted sum of each input ``(B, ...)`` and its scale ``sum |x| w``, both float64 ``(B,)``.

    The weights ``w`` ``(D,)`` are drawn once in ``[0.5, 1.5)`` from a fixed seed: unlike a plain
    sum, the weighted sum changes when an image is flipped or shifted.
    """
    flat = x.detach().reshape(x.shape[0], -1)
    if flat.device.type == "mps":  # no float64 there
        flat = flat.cpu()
    key = (flat.shape[1], str(flat.device))
    w = _probe_weights.get(key)
    if w is None:
        g = torch.Generator().manual_seed(_PROBE_SEED)
        w = (torch.rand(flat.shape[1], generator=g, dtype=torch.float64) + 0.5).to(flat.device)
        _probe_weights[key] = w
    with torch.autocast(flat.device.type, enabled=False):
        flat = flat.double()
        return flat @ w, (flat.abs() @ w if with_scale else None)


# ----------------------------------------------------------------------------------- reading


def _verify_mode(verify: str) -> str:
    if verify not in ("open", "lazy"):
        raise ValueError(f"verify must be 'open' (every checksum when the cache opens) or 'lazy' (each epoch's "
                         f"block before its first read); got {verify!r}")
    return verify


# what a manifest of this FORMAT holds (build_cache writes every key): top level, then nested
_MANIFEST_KEYS = ("num_samples", "num_classes", "views", "epochs", "storage", "topk", "dtype", "temperature",
                  "teacher", "data", "augment", "taps", "arrays", "block_bytes", "file_bytes", "blocks")
_NESTED_KEYS = {"teacher": ("fingerprint",), "data": ("fingerprint", "targets")}
_ARRAY_KEYS = ("dtype", "offset", "shape")


def manifest_key_error(file: Path, key: str, what: str = "is missing") -> CacheError:
    """The :class:`CacheError` for a manifest ``file`` whose ``key`` (``blocks[3].sha256``) is missing or wrong."""
    return CacheError(f"teacher cache manifest {str(file)!r}: key {key!r} {what}; the file is damaged or was "
                      "written by another program: build the cache again")


def load_manifest(folder: Path, fmt: str, data_file: str, build_hint: str) -> dict[str, Any]:
    """The JSON manifest of the cache in ``folder``, of format ``fmt``.

    Raises :class:`FileNotFoundError` (with ``build_hint``: how to build one) when there is no
    manifest, and :class:`CacheError` when the build is unfinished (``data_file`` is there, the
    manifest is not: it is written last), the JSON is damaged or the format is another.
    """
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        if (folder / data_file).is_file():
            raise CacheError(f"teacher cache {str(folder)!r} is unfinished (it has {data_file} but no "
                             f"{MANIFEST}: the build stopped before the end); build it again")
        raise FileNotFoundError(f"no teacher cache at {str(folder)!r} (no {MANIFEST}); build one with {build_hint}")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"teacher cache {str(folder)!r}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CacheError(f"teacher cache {str(folder)!r}: format {got!r}, expected {fmt!r}")
    return manifest


def _check_manifest(manifest: dict[str, Any], file: Path) -> None:
    """Every key the reader uses is there, with the right kind of value; a :class:`CacheError`
    naming the file and the first missing key (``blocks[3].sha256``) otherwise."""
    def missing(key: str, what: str = "is missing") -> CacheError:
        return manifest_key_error(file, key, what)

    for key in _MANIFEST_KEYS:
        if key not in manifest:
            raise missing(key)
    for key, subkeys in _NESTED_KEYS.items():
        if not isinstance(manifest[key], dict):
            raise missing(key, f"must be a mapping, got {type(manifest[key]).__name__}")
        for sub in subkeys:
            if sub not in manifest[key]:
                raise missing(f"{key}.{sub}")
    if not isinstance(manifest["arrays"], dict) or not manifest["arrays"]:
        raise missing("arrays", "must be a non-empty mapping of stored arrays")
    for name, a in manifest["arrays"].items():
        for sub in _ARRAY_KEYS:
            if not isinstance(a, dict) or sub not in a:
                raise missing(f"arrays.{name}.{sub}")
    if not isinstance(manifest["blocks"], list):
        raise missing("blocks", f"must be a list, got {type(manifest['blocks']).__name__}")
    for i, block in enumerate(manifest["blocks"]):
        if not isinstance(block, dict) or "sha256" not in block:
            raise missing(f"blocks[{i}].sha256")
    if manifest["augment"] is not None:
        for sub in ("spec", "seed", "keys"):
            if not isinstance(manifest["augment"], dict) or sub not in manifest["augment"]:
                raise missing(f"augment.{sub}")


class TeacherCache:
    """A built cache opened for reading; see the module docstring for what it holds.

    Args:
        path: the cache folder (``manifest.json`` + ``data.bin``).
        verify: ``"open"``: check every block's sha256 now; ``"lazy"``: check each epoch's block
            before its first read. The file size is checked at open either way.

    Raises:
        FileNotFoundError: no cache at ``path``.
        CacheError: unfinished build, unknown format, truncated or corrupted data.
    """

    def __init__(self, path: str | os.PathLike[str], verify: Literal["open", "lazy"] = "open") -> None:
        self.path = Path(path)
        self.verify_mode = _verify_mode(verify)
        manifest_file = self.path / MANIFEST
        data_file = self.path / DATA_FILE
        manifest = load_manifest(self.path, FORMAT, DATA_FILE,
                                 "`distill cache build RECIPE --out PATH` or distill.cache.build_cache")
        _check_manifest(manifest, manifest_file)
        self.manifest: dict[str, Any] = manifest
        if not data_file.is_file():
            raise CacheError(f"teacher cache {str(self.path)!r} has no {DATA_FILE}")
        expected, found = int(manifest["file_bytes"]), data_file.stat().st_size
        if found != expected:
            kind = "truncated" if found < expected else "longer than its manifest says"
            raise CacheError(f"teacher cache {str(self.path)!r} is {kind}: {DATA_FILE} has {found} bytes, "
                             f"the manifest expects {expected}; build it again")
        # a plain ndarray over the read-only map (it keeps the map alive): cheaper to slice than np.memmap
        self._mm = np.asarray(np.memmap(data_file, dtype=np.uint8, mode="r", shape=(expected,))) if expected else None
        self._verified = [False] * self.num_blocks
        self._blocks: dict[int, dict[str, np.ndarray]] = {}
        if self.verify_mode == "open":
            for b in range(self.num_blocks):
                self.verify_block(b)

    # ------------------------------------------------------------------ facts
    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def num_blocks(self) -> int:
        return len(self.manifest["blocks"])

    @property
    def views(self) -> str:
        """``"augmented"`` (one block per epoch) or ``"plain"`` (one block, the un-augmented inputs)."""
        return str(self.manifest["views"])

    @property
    def epochs(self) -> int | None:
        """Epochs of augmented views covered (``None`` for plain caches: every epoch reads the one block)."""
        return self.manifest["epochs"]

    @property
    def topk(self) -> int | None:
        return self.manifest["topk"]

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def taps(self) -> dict[str, list[int]]:
        """Tap path → per-sample shape of the cached features."""
        return dict(self.manifest["taps"])

    @property
    def augment_seed(self) -> int | None:
        aug = self.manifest["augment"]
        return None if aug is None else int(aug["seed"])

    # ------------------------------------------------------------------ integrity
    def _block_bytes(self, b: int) -> np.ndarray:
        size = int(self.manifest["block_bytes"])
        assert self._mm is not None
        return self._mm[b * size:(b + 1) * size]

    def verify_block(self, b: int) -> None:
        """Check block ``b``'s sha256 against the manifest (once); :class:`CacheError` on mismatch."""
        if self._verified[b]:
            return
        digest = hashlib.sha256(self._block_bytes(b)).hexdigest() if self._mm is not None else \
            hashlib.sha256(b"").hexdigest()
        if digest != self.manifest["blocks"][b]["sha256"]:
            what = f"epoch {b}" if self.views == "augmented" else "its only block"
            raise CacheError(f"teacher cache {str(self.path)!r} is corrupted: the checksum of {what} does not "
                             "match its manifest; build it again")
        self._verified[b] = True

    def block_of(self, epoch: int) -> int:
        """The block that holds ``epoch``'s views (verified before it is returned)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0; got {epoch!r}")
        if self.views == "plain":
            b = 0
        elif epoch >= self.num_blocks:
            raise CacheError(
                f"teacher cache {str(self.path)!r} holds the augmented views of epochs 0..{self.num_blocks - 1}, "
                f"but epoch {epoch} was asked for: build it with epochs >= the number of training epochs")
        else:
            b = epoch
        self.verify_block(b)
        return b

    def arrays(self, epoch: int) -> dict[str, np.ndarray]:
        """Read-only memory-mapped arrays ``(N, ...)`` of ``epoch``'s block, by name."""
        b = self.block_of(epoch)
        if b not in self._blocks:
            block = self._block_bytes(b)
            n = self.num_samples
            out = {}
            for name, a in self.manifest["arrays"].items():
                dtype = np.dtype(a["dtype"])
                count = n * math.prod(a["shape"])
                out[name] = block[a["offset"]:a["offset"] + count * dtype.itemsize].view(dtype).reshape(n, *a["shape"])
            self._blocks[b] = out
        return self._blocks[b]

    # ------------------------------------------------------------------ reading rows
    def read(self, epoch: int, index: Tensor | np.ndarray, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """The stored rows of samples ``index`` ``(B,)`` in ``epoch``, as CPU tensors in their stored dtypes."""
        idx = index.detach().cpu().numpy() if isinstance(index, Tensor) else np.asarray(index)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"index must be a 1-d integer tensor; got shape {idx.shape}, dtype {idx.dtype}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            bad = idx[(idx < 0) | (idx >= self.num_samples)][:5].tolist()
            raise IndexError(f"sample indices {bad} are outside the cache's {self.num_samples} samples")
        arrays = self.arrays(epoch)
        wanted = arrays if names is None else {k: arrays[k] for k in names}
        return {k: torch.from_numpy(a[idx]) for k, a in wanted.items()}

    def view_names(self, taps: Iterable[str] = ()) -> list[str]:
        """The stored arrays :meth:`assemble` reads for a view with these taps."""
        if self.manifest["storage"] == "dense":
            names = ["logits"]
        else:
            names = ["values", "indices"] + (["fill"] if self._has_fill else [])
        return names + [f"tap:{t}" for t in taps]

    def assemble(self, rows: dict[str, Tensor], taps: Iterable[str] = ()) -> View:
        """The view from rows read with :meth:`view_names`: ``"logits"`` ``(B, K)`` float32 (top-k
        reconstructed as the module docstring says) and each tap, float32."""
        if self.manifest["storage"] == "dense":
            logits = rows["logits"].float()
        else:
            values, cls = rows["values"].float(), rows["indices"].long()
            if self._has_fill:
                logits = rows["fill"].float().unsqueeze(1).expand(values.shape[0], self.num_classes).clone()
            else:  # k == K: the indices are a permutation of the classes
                logits = torch.empty(values.shape[0], self.num_classes, device=values.device)
            logits.scatter_(1, cls, values)
        view: View = {"logits": logits}
        for t in taps:
            view[t] = rows[f"tap:{t}"].float()
        return view

    def view(self, epoch: int, index: Tensor | np.ndarray, *, taps: Iterable[str] = (),
             device: torch.device | str | None = None) -> View:
        """The teacher's view of samples ``index`` ``(B,)`` in ``epoch``, on ``device`` (see :meth:`assemble`)."""
        taps = list(taps)
        rows = self.read(epoch, index, self.view_names(taps))
        if device is not None:
            rows = {k: v.to(device, non_blocking=True) for k, v in rows.items()}
        return self.assemble(rows, taps)

    @property
    def _has_fill(self) -> bool:
        return "fill" in self.manifest["arrays"]

    # ------------------------------------------------------------------ matching
    def check(self, *, teacher: Any = None, inputs: Tensor | None = None, targets: Tensor | None = None,
              augment: Augment | None | Literal["unchecked"] = "unchecked", augment_seed: int | None = None) -> None:
        """Raise :class:`CacheMismatchError` naming every difference between the cache and what is given.

        ``teacher``: compared by :func:`teacher_fingerprint`; ``inputs``/``targets``: by
        :func:`data_fingerprint` (labels when the cache recorded them too); ``augment``/``augment_seed``: the loader's augmentation (checked
        for caches of augmented views; a plain cache ignores the augmentation on purpose).
        """
        m = self.manifest
        problems = teacher_mismatch(m["teacher"], teacher)
        if inputs is not None:
            fp = data_fingerprint(inputs)
            if fp != m["data"]["fingerprint"]:
                problems.append(
                    f"data: the cache was built from {m['data']['num_samples']} samples of shape "
                    f"{tuple(m['data']['shape'])} hashing to {m['data']['fingerprint'][:12]}…, the data given has "
                    f"{int(inputs.shape[0])} samples of shape {tuple(inputs.shape[1:])} hashing to {fp[:12]}…")
        if targets is not None and m["data"]["targets"] is not None:  # labels are checked when both sides have them
            fp = data_fingerprint(targets)
            if fp != m["data"]["targets"]:
                problems.append(f"data: the labels differ (the cache's hash to {m['data']['targets'][:12]}…, the ones "
                                f"given to {fp[:12]}…)")
        if augment != "unchecked" and self.views == "augmented":
            cached = m["augment"]
            given = _augment_record(augment, augment_seed if augment_seed is not None else -1)
            if given is None:
                problems.append(f"augmentation: the cache holds augmented views ({cached['spec']}, seed "
                                f"{cached['seed']}), but the data given is not augmented")
            elif given != cached:
                diffs = []
                if given["spec"] != cached["spec"]:
                    diffs.append(f"transforms {given['spec']} instead of {cached['spec']}")
                if given["seed"] != cached["seed"]:
                    diffs.append(f"augment seed {given['seed']} instead of {cached['seed']}")
                if given["keys"] != cached["keys"]:
                    diffs.append(f"per-sample key scheme {given['keys']!r} instead of {cached['keys']!r}")
                problems.append("augmentation: the loader draws " + "; ".join(diffs))
        raise_mismatches(self.path, problems, "e.g. `distill cache build RECIPE --overwrite`")

    def describe(self) -> str:
        """A few lines for ``distill cache info``."""
        m = self.manifest
        store = "dense logits" if m["storage"] == "dense" else \
            f"top-{m['topk']} logits + tail fill at T={m['temperature']:g}"
        views = f"augmented views of {m['epochs']} epoch(s)" if m["views"] == "augmented" else "un-augmented inputs"
        lines = [
            f"teacher cache {self.path}",
            f"  {m['num_samples']} samples x {m['num_classes']} classes; {store}; {m['dtype']}",
            f"  views: {views}" + (f" (seed {m['augment']['seed']}, {m['augment']['spec']})" if m["augment"] else ""),
            f"  taps: {', '.join(f'{k} {tuple(v)}' for k, v in m['taps'].items()) or 'none'}",
            f"  teacher: {m['teacher']['description']}, fingerprint {m['teacher']['fingerprint'][:16]}",
            f"  data: {m['data']['num_samples']} x {tuple(m['data']['shape'])}, fingerprint {m['data']['fingerprint'][:16]}",
            f"  {DATA_FILE}: {m['file_bytes']:,} bytes in {len(m['blocks'])} block(s); built {m['created']}",
        ]
        return "\n".join(lines)


def open_cache(path: str | os.PathLike[str], verify: Literal["open", "lazy"] = "open") -> TeacherCache:
    """Open a built cache for reading (see :class:`TeacherCache`)."""
    return TeacherCache(path, verify)


# ----------------------------------------------------------------------------------- building


def build_cache(
    teacher: nn.Module | Sequence[nn.Module] | TeacherSource,
    inputs: Tensor,
    path: str | os.PathLike[str],
    *,
    targets: Tensor | None = None,
    topk: int | None = None,
    dtype: Literal["fp16", "fp32"] = "fp32",
    temperature: float = 1.0,
    augment: Augment | None = None,
    epochs: int | None = None,
    augment_seed: int = 0,
    taps: Sequence[str] = (),
    batch_size: int = 256,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> TeacherCache:
    """Run ``teacher`` once over ``inputs`` and store its outputs at ``path`` (a folder).

    Args:
        teacher: a model (frozen), a list of models (an ensemble) or a static teacher source.
        inputs: the training inputs ``(N, ...)`` in data-set order (what the loader indexes);
            ``targets`` ``(N,)`` join the data fingerprint when given.
        topk: store the ``k`` largest logits and the tail ``fill`` (module docstring) instead of
            all ``K``; ``None`` stores dense logits.
        dtype: ``"fp16"`` or ``"fp32"`` for logits and features.
        temperature: the ``T`` at which the top-k tail mass is exact (the KD temperature);
            recorded in the manifest. Irrelevant for dense caches and ``k == K``.
        augment: store the teacher's outputs for the views this augmentation gives each sample
            in epochs ``0 .. epochs-1`` with ``augment_seed`` (what an
            :class:`~distill.data.loader.InMemoryLoader` with ``augment_seed`` yields);
            ``None``: store the un-augmented inputs once (``views="plain"``).
        epochs: augmented epochs to store (default 1); must be 1 (or ``None``) without ``augment``.
        taps: teacher feature taps to store, e.g. ``["stage2"]``.
        batch_size: samples per teacher forward.
        device: where the teacher runs (default: where its parameters are).
        overwrite: replace an existing cache at ``path``.
        progress: show a progress bar.

    Returns:
        the cache, opened (and verified) for reading.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'fp16' or 'fp32'; got {dtype!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be an int >= 1 or None (dense logits); got {topk!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("inputs must be a non-empty tensor (N, ...) of training samples")
    if targets is not None and (not isinstance(targets, Tensor) or targets.shape[0] != inputs.shape[0]):
        raise ValueError(f"targets must be a tensor with {inputs.shape[0]} entries, like inputs")
    if augment is None:
        if epochs not in (None, 1):
            raise ValueError(f"epochs={epochs} counts augmented views, but augment is None: without augmentation "
                             "every epoch sees the same view, so one is stored (pass epochs=None)")
        epochs = 1
    else:
        if not isinstance(augment, Augment) or not augment.per_sample:
            raise ValueError(f"augment {augment!r} cannot be replayed per sample (it needs params_for, as "
                             "RandomCropPad, RandomHorizontalFlip, Mixup and Compose have), so its views cannot be "
                             "cached")
        if inputs.dim() != 4:
            raise ValueError(f"augment needs images (N, C, H, W); got inputs of shape {tuple(inputs.shape)}")
        epochs = 1 if epochs is None else epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int; got {epochs!r}")
    source = as_teacher_source(teacher)
    if source is None or not getattr(source, "static", False):
        raise ValueError(f"cannot cache a teacher source whose outputs change during training "
                         f"({type(source).__name__}); cache a frozen model or an ensemble")
    path = Path(path)
    if (path / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"a teacher cache already exists at {str(path)!r}; delete it or pass overwrite=True")
    taps = list(dict.fromkeys(taps))
    if isinstance(source, FrozenTeacher) and source is teacher:  # the caller's source keeps its own taps
        source = FrozenTeacher(source.model, dtype=source.dtype, device=source.device, metadata=source.metadata)
    source.require_taps(taps)
    if device is not None:
        source.to(device)
    run_device = torch.device(device) if device is not None else next(
        (p.device for p in source.parameters()), torch.device("cpu"))
    n = int(inputs.shape[0])
    try:
        # one builder per cache folder: a second one stops with RunLockedError naming the first's pid
        with RunLock(path, "teacher cache build"):
            if (path / MANIFEST).exists() and not overwrite:  # finished by another process meanwhile
                raise FileExistsError(f"a teacher cache already exists at {str(path)!r}; delete it or pass "
                                      "overwrite=True")
            _write(source, inputs, targets, path, n=n, topk=topk, np_dtype=np.dtype(_DTYPES[dtype]), dtype=dtype,
                   temperature=float(temperature), augment=augment, epochs=epochs, augment_seed=int(augment_seed),
                   taps=taps, batch_size=batch_size, device=run_device, progress=progress)
    finally:
        source.require_taps([])
    return TeacherCache(path, "open")


def _layout(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], n: int) -> tuple[dict[str, Any], int]:
    arrays, offset = {}, 0
    for name, (shape, dt) in shapes.items():
        arrays[name] = {"dtype": dt.str, "shape": list(shape), "offset": offset}
        offset += -(-n * math.prod(shape) * dt.itemsize // _ALIGN) * _ALIGN
    return arrays, offset


def _rows(view: View, *, topk: int | None, temperature: float, taps: list[str]) -> dict[str, Tensor]:
    """What one batch stores, from the teacher's view."""
    z = check_logits(view, "teacher").float()
    k_all = z.shape[1]
    if topk is None:
        out = {"logits": z}
    else:
        values, cls = z.topk(topk, dim=1)  # (B, k), largest first
        out = {"values": values, "indices": cls}
        if topk < k_all:
            tail = z.double().scatter(1, cls, float("-inf")) / temperature  # top-k entries removed
            out["fill"] = (temperature * (torch.logsumexp(tail, dim=1) - math.log(k_all - topk))).float()
    for t in taps:
        out[f"tap:{t}"] = view[t]
    return out


def _write(source: TeacherSource, inputs: Tensor, targets: Tensor | None, path: Path, *, n: int, topk: int | None,
           np_dtype: np.dtype, dtype: str, temperature: float, augment: Augment | None, epochs: int, augment_seed: int,
           taps: list[str], batch_size: int, device: torch.device, progress: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)  # no manifest until the data is complete
    source.eval()
    chunks = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    mm: np.memmap | None = None
    arrays: dict[str, Any] = {}
    block_bytes = num_classes = 0
    bar = _bar(progress, epochs * len(chunks))
    try:
        for epoch in range(epochs):
            for chunk in chunks:
                x = replay_views(inputs, chunk, epoch, augment, augment_seed)
                view = source(Batch(x.to(device)))
                if topk is not None and topk > view["logits"].shape[-1]:
                    raise ValueError(f"topk={topk} exceeds the teacher's {view['logits'].shape[-1]} classes")
                rows = _rows(view, topk=topk, temperature=temperature, taps=taps)
                probe, scale = _probe(x)
                rows["probe"] = torch.stack([probe, scale], 1)
                if mm is None:  # the first batch tells the shapes
                    num_classes = int(view["logits"].shape[1])
                    shapes = {k: (tuple(v.shape[1:]), _np_dtype_of(k, np_dtype, num_classes)) for k, v in rows.items()}
                    arrays, block_bytes = _layout(shapes, n)
                    mm = np.memmap(path / DATA_FILE, dtype=np.uint8, mode="w+", shape=(max(1, epochs * block_bytes),))
                base = epoch * block_bytes
                lo, hi = int(chunk[0]), int(chunk[-1]) + 1
                for k, v in rows.items():
                    a = arrays[k]
                    dt = np.dtype(a["dtype"])
                    whole = mm[base + a["offset"]: base + a["offset"] + n * math.prod(a["shape"]) * dt.itemsize]
                    v = v.detach().cpu()
                    if v.dtype in (torch.float16, torch.bfloat16):  # NumPy has no bfloat16; astype rounds to dt
                        v = v.float()
                    whole.view(dt).reshape(n, *a["shape"])[lo:hi] = v.numpy().astype(dt, copy=False)
                bar.advance()
        assert mm is not None
        mm.flush()
        blocks = [{"sha256": hashlib.sha256(mm[b * block_bytes:(b + 1) * block_bytes]).hexdigest()}
                  for b in range(epochs)]
    finally:
        bar.close()
        del mm
    manifest = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "num_samples": n,
        "num_classes": num_classes,
        "views": "augmented" if augment is not None else "plain",
        "epochs": epochs if augment is not None else None,
        "storage": "dense" if topk is None else "topk",
        "topk": topk,
        "dtype": dtype,
        "temperature": temperature,
        "teacher": {"fingerprint": teacher_fingerprint(source), "description": _describe_teacher(source),
                    "metadata": source.metadata},
        "data": {"fingerprint": data_fingerprint(inputs), "num_samples": n,
                 "targets": data_fingerprint(targets) if targets is not None else None,
                 "shape": list(inputs.shape[1:]), "dtype": str(inputs.dtype)},
        "augment": _augment_record(augment, augment_seed),
        "taps": {t: arrays[f"tap:{t}"]["shape"] for t in taps},
        "arrays": arrays,
        "block_bytes": block_bytes,
        "file_bytes": epochs * block_bytes,
        "blocks": blocks,
    }
    if epochs * block_bytes == 0:  # cannot happen with a probe per sample; keeps the size check honest
        raise CacheError("nothing to store")
    if (path / DATA_FILE).stat().st_size != manifest["file_bytes"]:
        os.truncate(path / DATA_FILE, manifest["file_bytes"])
    atomic_write_json(path / MANIFEST, manifest, default=str)  # the manifest appears last, and whole (fsync-ed)


def _np_dtype_of(name: str, np_dtype: np.dtype, num_classes: int) -> np.dtype:
    if name == "indices":
        return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)
    if name == "fill":
        return np.dtype(np.float32)  # one number per sample: keep it exact
    if name == "probe":
        return np.dtype(np.float64)
    return np_dtype


class _bar:
    def __init__(self, enabled: bool, total: int) -> None:
        self._p = None
        if enabled:
            from rich.progress import Progress

            self._p = Progress(transient=True)
            self._p.start()
            self._task = self._p.add_task("caching the teacher", total=total)

    def advance(self) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


# ----------------------------------------------------------------------------------- teacher source


class CachedTeacher(TeacherSource):
    """A teacher source that reads the teacher's view from a :class:`TeacherCache`.

    Rows are read by ``batch.index`` (a loader with ``return_index=True``) for the epoch set by
    :meth:`on_epoch_start` (``Distiller.set_epoch`` calls it; ``distill.fit`` does every epoch).
    Each read compares the batch's inputs with the probe stored for those rows, so a row is never
    used for another sample, another view or another epoch (pass ``check_inputs=False`` only for
    a plain cache read while the loader augments, the approximation FKD calls "global" labels).

    Args:
        cache: a cache folder or an open :class:`TeacherCache`.
        teacher: the live teacher, optional: checked against the cache's fingerprint now, and
            used for batches without sample indices (evaluation batches).
        verify: checksum policy when ``cache`` is a path (``"open"`` or ``"lazy"``).
        check_inputs: compare each batch with the stored input probes.
        metadata: what is known of the teacher's training (default: the live teacher's, else
            what the cache recorded).

    Methods that need teacher features get them when the cache holds those taps; otherwise
    :meth:`require_taps` says which taps are missing.
    """

    kind = "cached"
    supports_taps = True

    def __init__(self, cache: TeacherCache | str | os.PathLike[str], *, teacher: Any = None,
                 verify: Literal["open", "lazy"] = "open", check_inputs: bool = True,
                 metadata: dict[str, Any] | None = None) -> None:
        cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache, verify)
        fallback = as_teacher_source(teacher) if teacher is not None else None
        if fallback is not None:
            cache.check(teacher=fallback)
        if metadata is None:
            metadata = fallback.metadata if fallback is not None else cache.manifest["teacher"].get("metadata")
        super().__init__(metadata)
        self.cache = cache
        self.fallback = fallback
        self.static = bool(getattr(fallback, "static", False))  # evaluation batches go to the live teacher
        self.check_inputs = bool(check_inputs)
        self.epoch = 0
        self._taps: list[str] = []

    @property
    def augment_seed(self) -> int | None:
        """The augmentation seed the cached views were drawn with (``None`` for plain caches)."""
        return self.cache.augment_seed

    def require_taps(self, paths: Sequence[str]) -> None:
        missing = [p for p in paths if p not in self.cache.taps]
        if missing:
            held = list(self.cache.taps) or "none"
            raise ValueError(
                f"the teacher cache {str(self.cache.path)!r} holds taps {held}, but methods need {missing}: "
                f"build the cache with these taps (build_cache(..., taps={list(paths)}), or a recipe whose losses "
                "need them), or use the live teacher")
        self._taps = list(paths)

    def on_epoch_start(self, epoch: int) -> None:
        self.cache.block_of(epoch)  # fails now, not mid-epoch, when the epoch is not covered or its block is bad
        self.epoch = epoch

    def prepare_loader(self, loader: Any) -> None:
        """Give ``loader`` the cache's augmentation seed, check its data and augmentation, and
        start reading at the loader's current epoch.

        Every student then sees the views the cache was built for, whatever its order seed
        (FKD: one set of soft labels serves every run). Raises :class:`CacheMismatchError`.
        """
        if self.cache.views == "augmented" and hasattr(loader, "augment_seed"):
            loader.augment_seed = self.cache.augment_seed
        self.check_loader(loader)
        self.on_epoch_start(int(getattr(loader, "epoch", 0)))

    def check_loader(self, loader: Any) -> None:
        """Check a loader's ``inputs``/``targets`` and augmentation against the cache (what it has of them)."""
        inputs = getattr(loader, "inputs", None)
        self.cache.check(inputs=inputs if isinstance(inputs, Tensor) else None,
                         targets=getattr(loader, "targets", None),
                         augment=getattr(loader, "augment", None) if hasattr(loader, "augment") else "unchecked",
                         augment_seed=getattr(loader, "augment_seed", None))

    def forward(self, batch: Batch) -> View:
        if batch.index is None:
            if self.fallback is not None:
                return self.fallback(batch)
            raise ValueError("the cached teacher reads rows by sample index, but the batch has none: use a loader "
                             "that returns indices (InMemoryLoader(return_index=True)); for evaluation batches give "
                             "CachedTeacher(..., teacher=model) the live teacher, or fit(..., eval_teacher=False)")
        device = batch.inputs.device
        names = self.cache.view_names(self._taps) + (["probe"] if self.check_inputs else [])
        rows = {k: v.to(device, non_blocking=True) for k, v in self.cache.read(self.epoch, batch.index, names).items()}
        if self.check_inputs:
            self._check_probe(batch, rows.pop("probe"))
        return self.cache.assemble(rows, self._taps)

    def _check_probe(self, batch: Batch, stored: Tensor) -> None:
        probe, _ = _probe(batch.inputs, with_scale=False)
        bad = (probe.to(stored.device) - stored[:, 0]).abs() > _PROBE_RTOL * stored[:, 1] + 1e-12
        if bool(bad.any()):
            which = batch.index[bad.to(batch.index.device)][:5].tolist()
            raise CacheMismatchError(
                f"the inputs of samples {which} are not the views the teacher cache {str(self.cache.path)!r} holds "
                f"for epoch {self.epoch}: the loader's data or augmentation differs from the cache's (check with "
                "CachedTeacher.check_loader(loader)), its epoch is not the teacher's (call distiller.set_epoch(e) "
                "with loader.set_epoch(e)), or these are not training batches")

    def extra_repr(self) -> str:
        return f"path={str(self.cache.path)!r}, epoch={self.epoch}"


def list_teacher_sources() -> list[dict[str, Any]]:
    """Teacher sources with the papers they implement, for ``distill methods``."""
    return [
        {"name": "frozen", "cls": FrozenTeacher, "papers": [], "summary": "one trained model, frozen in eval mode"},
        {"name": "ensemble", "cls": EnsembleTeacher, "summary": "mean of members' probabilities or logits",
         "papers": [Paper("Distilling the Knowledge in a Neural Network", "G. Hinton, O. Vinyals, J. Dean", 2015,
                          "1503.02531"),
                    Paper("Using a Neural Network to Approximate an Ensemble of Classifiers",
                          "X. Zeng, T. R. Martinez", 2000, None, "Neural Processing Letters")],
         "defaults": {"combine": "probs", "temperature": 1.0, "weights": None}},
        {"name": "cached", "cls": CachedTeacher,
         "summary": "the teacher's outputs stored once per sample and augmented view, read by sample index",
         "papers": [Paper("A Fast Knowledge Distillation Framework for Visual Recognition", "Z. Shen, E. Xing", 2022,
                          "2112.01528", "ECCV"),
                    Paper("TinyViT: Fast Pretraining Distillation for Small Vision Transformers",
                          "K. Wu, J. Zhang, H. Peng, M. Liu, B. Xiao, J. Fu, L. Yuan", 2022, "2207.10666", "ECCV")],
         "defaults": {"topk": None, "dtype": "fp32", "views": "augmented", "verify": "open"}},
    ]
