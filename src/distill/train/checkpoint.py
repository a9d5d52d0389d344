"""Checkpoints and model files: written atomically, read without running code, checked for damage.

**Nothing read runs code.** Checkpoints are read with ``torch.load(..., weights_only=True)``:
PyTorch's restricted unpickler builds tensors, numbers, strings and plain containers only, and a
file that names anything else (``os.system``, a class with ``__reduce__``) is refused with a
:class:`CheckpointError` naming the file and the global, before any of it runs. The random-number
state a checkpoint carries is stored as tensors and ints (:func:`rng_state`), so ``last.pt``
needs nothing beyond that. Model files that leave a run (:func:`save_model` to a ``.safetensors``
path, what ``distill train`` and ``distill run`` write as ``model.safetensors``) are safetensors
files: tensors and a string-to-string header, nothing to unpickle at all.

**Damage is detected.** :func:`save_checkpoint` stores, beside the payload, the sha256 of a
canonical walk of it (:func:`payload_checksum`: every dict key and value in order, every list and
tuple item, each number, string and tensor: its dtype, shape and bytes); :func:`load_checkpoint`
recomputes it and compares. A flipped byte in tensor data, a truncated, empty or garbage file is a
:class:`CheckpointError` naming the file and what to do, never a run that goes on with a weight of
−437.5. ``.safetensors`` model files carry the sha256 of their tensors and header in their
metadata. Files without a checksum (written by distill before it had them, or by plain
``torch.save``) are still read, with ``weights_only=True`` (NumPy arrays allowed: the RNG state of
old ``last.pt`` files), but cannot be checked for damage.

**Written whole.** Every file goes through :func:`distill.files.atomic_write` (temporary file,
``fsync``, rename, ``fsync`` of the folder), so a crash mid-write leaves the last good file; stale
temporaries of dead processes are removed on the next write.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.files import _NUMPY_DTYPE_CLASS, atomic_write, atomic_write_bytes

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "CheckpointNotFoundError",
    "load_checkpoint",
    "load_model",
    "payload_checksum",
    "rng_state",
    "save_checkpoint",
    "save_model",
    "set_rng_state",
]

CHECKSUM_KEY = "distill_checksum"  # the top-level key of a checkpoint that holds its checksum
CHECKPOINT_FORMAT = "distill.checkpoint/2"
MODEL_FORMAT = "distill.model/1"  # torch files of save_model (a checkpoint payload)
SAFETENSORS_MODEL_FORMAT = "distill.model.safetensors/1"


class CheckpointError(ValueError):
    """A checkpoint or model file that is missing, truncated, empty, damaged (checksum mismatch) or
    holds content a weights-only load refuses. ``path`` is the file, ``problem`` what is wrong,
    ``remedy`` what to do; the message holds all three."""

    def __init__(self, path: str | Path, problem: str, remedy: str | None = None) -> None:
        self.path = Path(path)
        self.problem = problem
        self.remedy = remedy if remedy is not None else _remedy(self.path)
        super().__init__(f"checkpoint {str(self.path)!r} {problem}; {self.remedy}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (DDP broadcasts rank 0's error)
        return type(self), (self.path, self.problem, self.remedy)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file that does not exist (also a ``FileNotFoundError``)."""


def _remedy(path: Path) -> str:
    if path.name == "last.pt":
        return ("delete it and rerun without --resume (resume=False): the run starts again from epoch 0, "
                "or resume from a good copy of it")
    if path.name == "best.pt":
        return "delete it (and the run's last.pt) and run that stage again, or restore a good copy of it"
    return "replace it with a good copy, or save it again (rerun what wrote it)"


# ----------------------------------------------------------------------------------- random state


def rng_state() -> dict[str, Any]:
    """The random-number state of Python, NumPy, torch (and CUDA when present), as tensors, ints
    and floats: a checkpoint holding it loads with ``weights_only=True``.

    ``python``: ``random.getstate()``'s version, its 625 words as an int64 tensor ``(625,)`` and
    ``gauss_next``; ``numpy``: the legacy global generator's MT19937 key ``(624,)`` int64, ``pos``,
    ``has_gauss`` and ``cached_gaussian``; ``torch``: ``torch.get_rng_state()`` ``(5056,)`` uint8;
    ``cuda``: one such byte tensor per device.
    """
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also the tuples of checkpoints written before it)."""
    py = state["python"]
    if isinstance(py, dict):
        words = py["state"].tolist() if isinstance(py["state"], torch.Tensor) else list(py["state"])
        random.setstate((int(py["version"]), tuple(int(w) for w in words), py["gauss_next"]))
    else:
        random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        keys = npy["state"].cpu().numpy() if isinstance(npy["state"], torch.Tensor) else np.asarray(npy["state"])
        np.random.set_state((npy["bit_generator"], keys.astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
                             float(npy["cached_gaussian"])))
    else:
        np.random.set_state(npy)
    # a checkpoint loaded with map_location="cuda" moved these byte tensors too; the setters want CPU ones
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ----------------------------------------------------------------------------------- checksums

_DICTS = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES = (list, tuple, torch.Size)


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().resolve_conj().resolve_neg().contiguous()
    h.update(f"<{t.dtype}|{tuple(t.shape)}>".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def _walk(h: Any, obj: Any, where: str) -> None:
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"T" if obj else b"F")
    elif isinstance(obj, int):
        h.update(b"i%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"f" + obj.hex().encode() + b";")
    elif isinstance(obj, complex):
        h.update(b"c" + obj.real.hex().encode() + b"," + obj.imag.hex().encode() + b";")
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(b) + b)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"b%d:" % len(obj) + bytes(obj))
    elif isinstance(obj, torch.Tensor):
        h.update(b"t")
        _hash_tensor(h, obj)
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(b"d" + str(obj).encode() + b";")
    elif type(obj) in _DICTS:
        h.update(b"{%d:" % len(obj))
        for k, v in obj.items():
            _walk(h, k, where)
            _walk(h, v, f"{where}[{k!r}]")
        meta = getattr(obj, "_metadata", None)  # a module state_dict's versions (load_state_dict reads them)
        if meta is not None:
            h.update(b"m")
            _walk(h, meta, f"{where}._metadata")
        h.update(b"}")
    elif type(obj) in _SEQUENCES:
        h.update(b"[%d:" % len(obj))
        for i, v in enumerate(obj):
            _walk(h, v, f"{where}[{i}]")
        h.update(b"]")
    else:
        raise TypeError(f"checkpoint payload{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a "
                        "weights-only load refuses: a checkpoint holds tensors, numbers, strings, None, and "
                        "dicts, lists and tuples of them (convert NumPy arrays with torch.from_numpy, objects to "
                        "their state_dict)")


def payload_checksum(payload: Any) -> str:
    """sha256 (hex) of a canonical walk of ``payload``: each value's type, each number and string,
    each tensor's dtype, shape and bytes (on the CPU), dicts in their order with their keys.

    Raises ``TypeError`` naming where the payload holds something a weights-only load refuses.
    """
    h = hashlib.sha256()
    _walk(h, payload, "")
    return h.hexdigest()


# ----------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (a dict of tensors, numbers, strings and containers of them) with
    ``torch.save``, plus its checksum under :data:`CHECKSUM_KEY`, atomically
    (:func:`distill.files.atomic_write`): a crash mid-write leaves the previous file.

    Raises ``TypeError`` before writing anything when the payload holds an object a
    weights-only load would refuse (a NumPy array, a custom class).
    """
    path = Path(path)
    if not isinstance(payload, dict):
        raise TypeError(f"a checkpoint payload is a dict, got {type(payload).__name__}")
    if CHECKSUM_KEY in payload:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved for the checkpoint's checksum; rename that key of the payload")
    full = {**payload, CHECKSUM_KEY: {"format": CHECKPOINT_FORMAT, "algorithm": "sha256",
                                      "sha256": payload_checksum(payload)}}
    return atomic_write(path, lambda f: torch.save(full, f))


def _legacy_globals() -> list[Any]:
    """NumPy array reconstruction (RNG state of checkpoints written before :func:`rng_state` used tensors)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    try:
        import numpy.dtypes as npd
    except ImportError:  # NumPy < 1.25 pickles dtypes as numpy.dtype alone
        classes = []
    else:
        classes = [getattr(npd, n) for n in dir(npd) if _NUMPY_DTYPE_CLASS.match(n)]
    return [_reconstruct, np.ndarray, np.dtype, *classes]


def _torch_load(path: Path) -> Any:
    try:
        safe = torch.serialization.safe_globals(_legacy_globals())
    except AttributeError:  # torch < 2.5: NumPy arrays refused (old last.pt files then cannot resume)
        import contextlib

        safe = contextlib.nullcontext()
    try:
        with safe:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"[Uu]nsupported global:? ([\w.]+)", str(e))
        if m:
            raise CheckpointError(path, f"refers to {m.group(1)}, which a weights-only load refuses: it holds "
                                        "code or objects, not only tensors and numbers; it was not loaded (nothing "
                                        "of it ran)", None if path.name in ("last.pt", "best.pt") else
                                  "if it is not the file you meant, delete it; a file you trust: load it yourself "
                                  "and save its state_dict") from None
        raise CheckpointError(path, "is not a readable checkpoint (its pickled content is damaged): it is truncated "
                                    "or damaged") from None
    except MemoryError:
        raise
    except Exception as e:  # zip/EOF/key/unicode errors of a damaged file
        raise CheckpointError(path, f"is not a readable checkpoint ({type(e).__name__}: {_first_line(e)}): "
                                    "it is truncated or damaged") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0][:160] if lines else type(e).__name__  # the first sentence: what failed


def _check_file(path: Path) -> Path:
    """``path`` if it is a non-empty file; else the :class:`CheckpointError` that says what it is."""
    if not path.exists():
        raise CheckpointNotFoundError(path, "does not exist", "check the path (a run writes checkpoints/last.pt, "
                                      "checkpoints/best.pt and, for trained models, model.safetensors)")
    if not path.is_file():
        raise CheckpointError(path, "is not a file", "give the path of a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): the write that made it was cut off")
    return path


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _to_device(v, device)
        return obj
    if isinstance(obj, list):
        obj[:] = [_to_device(v, device) for v in obj]
        return obj
    if type(obj) is tuple:
        return tuple(_to_device(v, device) for v in obj)
    return obj


def _verify(path: Path, state: Any) -> Any:
    """Check and strip the checksum of a loaded checkpoint; a payload without one is returned as is."""
    if not isinstance(state, dict) or CHECKSUM_KEY not in state:
        return state
    record = state.pop(CHECKSUM_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise CheckpointError(path, "has a damaged checksum record")
    try:
        digest = payload_checksum(state)
    except TypeError as e:
        raise CheckpointError(path, f"holds content a checkpoint cannot hold ({e})") from None
    if digest != record["sha256"]:
        raise CheckpointError(path, "is damaged: its content does not match the checksum saved with it (a flipped "
                                    "byte, a bad disk or copy)")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any ``torch.save`` file of tensors,
    numbers, strings and containers) without running code, check its checksum, and move its
    tensors to ``map_location``.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist (a ``FileNotFoundError`` too).
        CheckpointError: an empty, truncated or garbage file, a checksum mismatch, or a file that
            names a global a weights-only load refuses; the message names the file and what to do.
    """
    path = Path(path)
    state = _verify(path, _torch_load(_check_file(path)))
    device = torch.device(map_location) if not isinstance(map_location, torch.device) else map_location
    if device.type != "cpu":
        state = _to_device(state, device)
    return state


# ----------------------------------------------------------------------------------- model files


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header ``{...}``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= path.stat().st_size - 8


def _safetensors_digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in ("format", "model", "kwargs", "metadata"):
        _walk(h, meta.get(key, ""), "")
    for name in sorted(tensors):
        _walk(h, name, "")
        _hash_tensor(h, tensors[name])
    return h.hexdigest()


def _save_safetensors(path: Path, model: torch.nn.Module, name: str | None, kwargs: dict[str, Any],
                      metadata: dict[str, Any]) -> Path:
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{type(model).__name__}'s state_dict entry {key!r} is a {type(value).__name__}, which a "
                            "safetensors file cannot hold: save the model to a .pt path instead")
        tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
    try:
        kwargs_json = json.dumps(kwargs, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"save_model: kwargs must be JSON values to go into a safetensors header ({e})") from None
    meta = {"format": SAFETENSORS_MODEL_FORMAT, "model": name or "", "kwargs": kwargs_json,
            "metadata": json.dumps(metadata, sort_keys=True, default=str)}
    meta["sha256"] = _safetensors_digest(meta, tensors)
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")).decode("utf-8"))
        meta = header.get("__metadata__") or {}
        tensors = load_file(path)
    except Exception as e:  # a damaged header or tensor table
        raise CheckpointError(path, f"is not a readable safetensors file ({type(e).__name__}: {_first_line(e)}): "
                                    "it is truncated or damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(path, "has a damaged safetensors header")
    if "sha256" in meta and _safetensors_digest(meta, tensors) != meta["sha256"]:
        raise CheckpointError(path, "is damaged: its tensors or header do not match the checksum saved with them")
    return tensors, meta


def save_model(path: str | Path, model: torch.nn.Module, *, name: str | None = None,
               kwargs: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Save a trained model with what is needed to rebuild it from the zoo and how it was trained.

    A ``.safetensors`` path gets a safetensors file (tensors only, the zoo name, ``kwargs`` and
    ``metadata`` as JSON in its header, with the sha256 of all of it): the format for weights that
    leave a run. Any other path gets a checkpoint (:func:`save_checkpoint`, checksummed, read with
    ``weights_only=True``). Both are written atomically.

    ``metadata`` records the training protocol (e.g. ``label_smoothing``, accuracy, epochs):
    a later KD run reports it (Chandrasegaran et al., ICML 2022: label-smoothed teachers).
    """
    path = Path(path)
    kwargs, metadata = dict(kwargs or {}), dict(metadata or {})
    if path.suffix == ".safetensors":
        return _save_safetensors(path, model, name, kwargs, metadata)
    return save_checkpoint(path, {"format": MODEL_FORMAT, "model": name, "kwargs": kwargs,
                                  "state_dict": model.state_dict(), "metadata": metadata})


def _read_model_file(path: Path) -> Any:
    """The content of a model file: a checkpoint payload, or (safetensors) a ``distill.model/1``-like dict."""
    if not _is_safetensors(_check_file(path)):
        return _verify(path, _torch_load(path))
    tensors, meta = _load_safetensors(path)
    if meta.get("format") != SAFETENSORS_MODEL_FORMAT:  # a plain safetensors state_dict (e.g. from elsewhere)
        return tensors
    try:
        kwargs, metadata = json.loads(meta.get("kwargs") or "{}"), json.loads(meta.get("metadata") or "{}")
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"has a damaged header ({e.msg})") from None
    return {"format": MODEL_FORMAT, "model": meta.get("model") or None, "kwargs": kwargs, "state_dict": tensors,
            "metadata": metadata}


def load_model(path: str | Path, model: torch.nn.Module | None = None,
               map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model saved by :func:`save_model`: into ``model`` if given, else rebuilt from the zoo.

    Reads safetensors and checkpoint files alike (by their content, whatever their name), without
    running code and with their checksums checked. Also accepts, when ``model`` is given,
    ``fit``'s ``checkpoints/last.pt`` (the student of its ``"distiller"`` state) or
    ``checkpoints/best.pt`` (its ``"student"``), or a plain ``state_dict`` file (``torch.save``
    or safetensors). The weights are copied into the model where it is (``map_location`` is kept
    for compatibility: the file is read on the CPU). Returns ``(model, metadata)``; the metadata is
    also set as ``model.distill_metadata`` so teacher sources can report it.

    Raises:
        CheckpointError: a missing, damaged or unsafe file (see :func:`load_checkpoint`).
        ValueError: weights that do not fit ``model``, or a file that names no architecture
            when ``model`` is not given.
    """
    path = Path(path)
    state = _read_model_file(path)
    if isinstance(state, dict) and state.get("format") == MODEL_FORMAT:
        if model is None:
            if not state.get("model"):
                raise ValueError(f"{str(path)!r} does not name its architecture; pass the model to load into")
            from distill.models import create

            model = create(state["model"], **state["kwargs"])
        weights, metadata = state["state_dict"], state["metadata"]
    elif model is not None and isinstance(state, dict):
        if isinstance(state.get("distiller"), dict) and "student" in state["distiller"]:  # fit's last.pt
            weights = state["distiller"]["student"]
        elif isinstance(state.get("student"), dict):  # fit's best.pt
            weights = state["student"]
        else:
            weights = state.get("state_dict", state)
        metadata = {}
    elif model is not None:
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not model weights")
    else:
        raise ValueError(f"{str(path)!r} is not a distill model file; pass the model to load a plain state_dict into")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"weights in {str(path)!r} do not fit {type(model).__name__}: {e}") from None
    model.distill_metadata = metadata  # type: ignore[attr-defined]
    return model, metadata
