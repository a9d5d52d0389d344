"""Teacher cache for token sequences: a language-model teacher's top-k log-probabilities, stored once.

The teacher runs once over the training sequences (eval mode, no gradients) and, for every
position of every sequence, the cache keeps what a token-level KD loss needs from it:

* ``topk_values`` ``(k,)``: the ``k`` largest log-probabilities ``log softmax(z / T)`` at the
  temperature ``T`` of the build, largest first (fp16 by default);
* ``topk_indices`` ``(k,)`` int32: their token ids;
* ``topk_tail`` ``()``: the tail mass ``1 − Σ_topk p``, computed in fp32 from the full
  distribution (by :func:`distill.functional.tokens.topk_logprobs`), so it is exact up to the
  storage rounding.

With the ``k`` values and the tail, a loss can compare the student with the teacher on ``k + 1``
bins (the teacher's ``k`` tokens and one bin for the rest), exactly for that partition
(:func:`distill.functional.tokens.topk_token_divergence`). This is the sparse form DistillKit and
torchtune's offline KD store; Hinton et al.'s softening (``T``) is applied before the top-k, so the
losses must use the cache's ``T`` (:attr:`TokenCache.temperature`).

**What is stored.** Each sequence's positions ``0 .. n − 1``, where ``n`` is one past its last
attended position (``attention_mask``; the whole row without a mask): right padding is not
stored (left padding is, as part of the sequence), so a corpus of short and long texts padded to
one length costs only its real tokens. A read serves a batch of any (trimmed) length ``L``: its
positions ``>= n`` (padding, which carries no loss) get a finite placeholder, the uniform
distribution over ``k + 1`` bins (values ``−log(k + 1)``, token ids ``0 .. k−1``, tail
``1 / (k + 1)``), so that a loss that computes every position and weights padding by zero stays
finite for every divergence.

**Files** (in the cache folder): ``topk_values.bin`` ``(T, k)``, ``topk_indices.bin`` ``(T, k)``,
``topk_tail.bin`` ``(T,)`` and ``input_ids.bin`` ``(T,)`` (the tokens, int32) hold the ``T`` stored
positions of all sequences back to back, in the order the loader gave them; ``sequences.bin``
``(N, 2)`` int64 holds each sequence's offset and length by its data-set index. All are raw
little-endian arrays read with ``numpy.memmap``. ``manifest.json`` (written last, atomically)
records the format, ``k``, ``T``, dtype, the shapes, one sha256 per 64 MiB block of each file, and
the fingerprints: the teacher's weights (:func:`distill.cache.teacher_fingerprint`), the tokenizer
(vocabulary and special tokens, :func:`tokenizer_fingerprint`, when one is given) and the data
(:func:`token_data_fingerprint`: each sequence's tokens and mask up to its length, in index order).

**Safety.** Opening checks every file's size, and the block checksums at open (``verify="open"``)
or before the first read of each block (``verify="lazy"``); a truncated, corrupted or unfinished
cache is a :class:`~distill.cache.CacheError`. :class:`CachedTokenTeacher` checks the given
teacher, tokenizer, data, ``k`` and ``T`` against the manifest (a
:class:`~distill.cache.CacheMismatchError` naming each difference), and every batch's tokens (and
lengths) against the stored ones of its indices, so a shuffled-differently or other data set is
caught at its first batch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from distill.batch import Batch, TokenBatch, View, as_batch
from distill.cache import (
    MANIFEST,
    CacheError,
    CacheMismatchError,
    _bar,
    _describe_teacher,
    _verify_mode,
    load_manifest,
    manifest_key_error,
    raise_mismatches,
    teacher_fingerprint,
    teacher_mismatch,
)
from distill.files import atomic_write_json
from distill.functional.tokens import topk_logprobs
from distill.locks import RunLock
from distill.teachers import FrozenTeacher, TeacherSource, as_teacher_source

__all__ = [
    "CachedTokenTeacher",
    "TokenCache",
    "build_token_cache",
    "is_token_cache",
    "sequence_lengths",
    "token_data_fingerprint",
    "tokenizer_fingerprint",
]

FORMAT = "distill.token-cache/1"
BLOCK_BYTES = 64 << 20  # checksum granularity of each file
_DTYPES = {"fp16": np.float16, "fp32": np.float32}
_FILES = ("topk_values", "topk_indices", "topk_tail", "input_ids")
_SEQUENCES = "sequences"
_FIRST_FILE = "topk_values.bin"  # its presence without a manifest marks an unfinished build
_MANIFEST_KEYS = ("num_sequences", "num_tokens", "vocab_size", "k", "temperature", "dtype", "teacher", "tokenizer",
                  "data", "files", "block_bytes")
_BUILD_HINT = "distill.token_cache.build_token_cache or `distill cache build --text-teacher ...`"


# ----------------------------------------------------------------------------------- fingerprints


def sequence_lengths(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The stored length of each sequence ``(B,)`` long: one past its last attended position
    (``attention_mask`` ``(B, L)``), ``L`` for every row without a mask, 0 for a row with none attended."""
    b, length = input_ids.shape
    if attention_mask is None:
        return torch.full((b,), length, dtype=torch.long, device=input_ids.device)
    pos = torch.arange(1, length + 1, device=attention_mask.device)
    return (attention_mask.ne(0).long() * pos).amax(1) if length else torch.zeros(b, dtype=torch.long)


def _sequence_digests(input_ids: Tensor, attention_mask: Tensor | None) -> list[bytes]:
    """One sha256 digest per row of ``input_ids`` ``(B, L)``: its tokens (int64) and mask (uint8) up to its length."""
    lengths = sequence_lengths(input_ids, attention_mask).tolist()
    ids = input_ids.detach().cpu().long().numpy()
    mask = (np.ones_like(ids, dtype=np.uint8) if attention_mask is None
            else attention_mask.detach().cpu().ne(0).numpy().astype(np.uint8))
    out = []
    for row, n in enumerate(lengths):
        h = hashlib.sha256(f"{n}|".encode())
        h.update(ids[row, :n].tobytes())
        h.update(mask[row, :n].tobytes())
        out.append(h.digest())
    return out


def _combine_digests(digests: Iterable[bytes], count: int) -> str:
    h = hashlib.sha256(f"token-data|{count}|".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def token_data_fingerprint(input_ids: Tensor, attention_mask: Tensor | None = None) -> str:
    """sha256 of a token data set: ``input_ids`` ``(N, L)`` and ``attention_mask`` ``(N, L)`` in index order.

    Each sequence counts up to its length (:func:`sequence_lengths`), so right padding and the
    padded length do not change the fingerprint (a loader that pads each batch to its longest
    sequence hashes like one that pads to a fixed length); tokens, mask values within the
    sequence, order and number of sequences do.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a tensor (N, L); got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    return _combine_digests(_sequence_digests(input_ids, attention_mask), int(input_ids.shape[0]))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what fixes a tokenizer's ids: its vocabulary (``get_vocab()``: token → id, added
    tokens included) and its special tokens (each role's token and the list of all of them)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        raise TypeError(f"tokenizer must have get_vocab() (a Hugging Face tokenizer); got {type(tokenizer).__name__}")
    roles = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
    record = {
        "vocab": sorted((str(t), int(i)) for t, i in get_vocab().items()),
        "roles": {r: str(getattr(tokenizer, r, None)) for r in roles},
        "special": [str(t) for t in getattr(tokenizer, "all_special_tokens", [])],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _describe_tokenizer(tokenizer: Any) -> str:
    return f"{type(tokenizer).__name__} ({len(tokenizer.get_vocab()):,} tokens)"


def _data_tensors(data: Any) -> tuple[Tensor, Tensor | None] | None:
    """``(input_ids, attention_mask)`` of a whole data set given as a mapping of tensors or an object
    (a loader) with ``input_ids``/``attention_mask`` tensor attributes; ``None`` when it has none."""
    if isinstance(data, Mapping):
        ids, mask = data.get("input_ids"), data.get("attention_mask")
    else:
        ids, mask = getattr(data, "input_ids", None), getattr(data, "attention_mask", None)
    if not isinstance(ids, Tensor):
        return None
    return ids, mask if isinstance(mask, Tensor) else None


# ----------------------------------------------------------------------------------- reading


class TokenCache:
    """A built token cache opened for reading (see the module docstring).

    Args:
        path: the cache folder.
        verify: ``"open"``: check every block's sha256 now; ``"lazy"``: each block before its first read.

    Attributes: ``num_sequences``, ``num_tokens`` (stored positions), ``k``, ``temperature`` (the ``T``
    of the stored ``log softmax(z / T)``), ``vocab_size``, and per sequence ``offsets`` and ``lengths`` ``(N,)``.

    Raises:
        FileNotFoundError: no cache at ``path``.
        CacheError: unfinished build, unknown format, truncated or corrupted files.
    """

    def __init__(self, path: str | os.PathLike[str], verify: Literal["open", "lazy"] = "open") -> None:
        self.path = Path(path)
        self.verify_mode = _verify_mode(verify)
        manifest = load_manifest(self.path, FORMAT, _FIRST_FILE, _BUILD_HINT)
        file = self.path / MANIFEST
        for key in _MANIFEST_KEYS:
            if key not in manifest:
                raise manifest_key_error(file, key)
        for key in ("fingerprint",):
            for section in ("teacher", "data"):
                if not isinstance(manifest[section], dict) or key not in manifest[section]:
                    raise manifest_key_error(file, f"{section}.{key}")
        self.manifest: dict[str, Any] = manifest
        self._arrays: dict[str, np.ndarray] = {}
        self._verified: dict[str, np.ndarray] = {}
        block = int(manifest["block_bytes"])
        for name in (*_FILES, _SEQUENCES):
            a = manifest["files"].get(name) if isinstance(manifest["files"], dict) else None
            if not isinstance(a, dict) or not all(s in a for s in ("dtype", "shape", "blocks")):
                raise manifest_key_error(file, f"files.{name}")
            dt, shape = np.dtype(a["dtype"]), tuple(int(s) for s in a["shape"])
            expected = math.prod(shape) * dt.itemsize
            f = self.path / f"{name}.bin"
            if not f.is_file():
                raise CacheError(f"teacher cache {str(self.path)!r} has no {f.name}; build it again")
            found = f.stat().st_size
            if found != expected:
                kind = "truncated" if found < expected else "longer than its manifest says"
                raise CacheError(f"teacher cache {str(self.path)!r} is {kind}: {f.name} has {found} bytes, the "
                                 f"manifest expects {expected}; build it again")
            if len(a["blocks"]) != -(-expected // block):
                raise manifest_key_error(file, f"files.{name}.blocks", f"has {len(a['blocks'])} checksums for "
                                         f"{expected} bytes in blocks of {block}")
            raw = np.asarray(np.memmap(f, dtype=np.uint8, mode="r", shape=(expected,))) if expected else \
                np.zeros(0, np.uint8)
            self._arrays[name] = raw
            self._verified[name] = np.zeros(len(a["blocks"]), dtype=bool)
        if self.verify_mode == "open":
            for name in self._arrays:
                self._verify(name, np.arange(len(self._verified[name])))
        seq = self._typed(_SEQUENCES)
        if self.verify_mode == "lazy":
            self._verify(_SEQUENCES, np.arange(len(self._verified[_SEQUENCES])))
        self.offsets, self.lengths = seq[:, 0], seq[:, 1]
        self.num_sequences = int(manifest["num_sequences"])
        self.num_tokens = int(manifest["num_tokens"])  # stored positions, all sequences together
        self.k = int(manifest["k"])
        self.temperature = float(manifest["temperature"])  # of log softmax(z / T): the losses must use the same
        self.vocab_size = int(manifest["vocab_size"])

    # ------------------------------------------------------------------ integrity
    def _typed(self, name: str) -> np.ndarray:
        a = self.manifest["files"][name]
        return self._arrays[name].view(np.dtype(a["dtype"])).reshape(*a["shape"])

    def _verify(self, name: str, blocks: np.ndarray) -> None:
        block = int(self.manifest["block_bytes"])
        for b in blocks[~self._verified[name][blocks]].tolist():
            digest = hashlib.sha256(self._arrays[name][b * block:(b + 1) * block]).hexdigest()
            if digest != self.manifest["files"][name]["blocks"][b]:
                raise CacheError(f"teacher cache {str(self.path)!r} is corrupted: block {b} of {name}.bin does not "
                                 "match its checksum in the manifest; build it again")
            self._verified[name][b] = True

    def _gather(self, name: str, positions: np.ndarray) -> np.ndarray:
        """Rows ``positions`` ``(P,)`` of a token file, their blocks verified first (lazy mode)."""
        if self.verify_mode == "lazy" and positions.size:
            row = self._typed(name)[:1].nbytes or 1
            block = int(self.manifest["block_bytes"])
            first, last = positions * row // block, ((positions + 1) * row - 1) // block
            self._verify(name, np.unique(np.concatenate([first, last])))
        return self._typed(name)[positions]

    # ------------------------------------------------------------------ reading rows
    def _positions(self, index: Tensor | np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For sequences ``index`` ``(B,)`` served at length ``length``: their stored lengths ``(B,)``,
        the flat stored positions to read ``(P,)``, and the (row, column) each goes to ``(P,)``, ``(P,)``."""
        idx = index.detach().cpu().numpy() if isinstance(index, Tensor) else np.asarray(index)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"index must be a 1-d integer tensor; got shape {idx.shape}, dtype {idx.dtype}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.num_sequences):
            bad = idx[(idx < 0) | (idx >= self.num_sequences)][:5].tolist()
            raise IndexError(f"sequence indices {bad} are outside the cache's {self.num_sequences} sequences")
        stored = self.lengths[idx]
        served = np.minimum(stored, length)
        rows = np.repeat(np.arange(idx.size), served)
        cols = np.arange(int(served.sum())) - np.repeat(np.cumsum(served) - served, served)
        return stored, np.repeat(self.offsets[idx], served) + cols, rows, cols

    def read(self, index: Tensor | np.ndarray, length: int | None = None,
             device: torch.device | str | None = None) -> View:
        """The teacher's view of sequences ``index`` ``(B,)`` at length ``L`` (default: their longest stored one):
        ``"topk_values"`` ``(B, L, k)`` float32, ``"topk_indices"`` ``(B, L, k)`` long, ``"topk_tail"`` ``(B, L)``
        float32 (positions past a sequence's stored length: the placeholder of the module docstring), and
        ``"topk_temperature"``, the cache's ``T`` (0-d, CPU), which the token losses check against theirs."""
        if length is None:
            idx = index.cpu().numpy() if isinstance(index, Tensor) else np.asarray(index)
            length = int(self.lengths[idx].max()) if idx.size else 0
        _, flat, rows, cols = self._positions(index, length)
        b, k = len(index), self.k
        got = [torch.from_numpy(self._gather(name, flat).astype(dt)) for name, dt in
               (("topk_values", np.float32), ("topk_indices", np.int64), ("topk_tail", np.float32))]
        if flat.size == b * length:  # every position is stored (packed blocks): no placeholder
            values, indices, tail = got[0].view(b, length, k), got[1].view(b, length, k), got[2].view(b, length)
        else:
            values = torch.full((b, length, k), -math.log(k + 1))
            indices = torch.arange(k).expand(b, length, k).clone()
            tail = torch.full((b, length), 1.0 / (k + 1))
            r, c = torch.from_numpy(rows), torch.from_numpy(cols)
            values[r, c], indices[r, c], tail[r, c] = got
        view = {"topk_values": values, "topk_indices": indices, "topk_tail": tail}
        if device is not None:
            view = {n: v.to(device, non_blocking=True) for n, v in view.items()}
        view["topk_temperature"] = torch.tensor(self.temperature)  # 0-d, on the CPU: read as a float
        return view

    def check_tokens(self, batch: TokenBatch) -> None:
        """:class:`CacheMismatchError` unless each sequence of ``batch`` has the stored length and tokens of its index."""
        assert batch.index is not None
        ids = batch.inputs.detach().cpu()
        mask = batch.attention_mask
        stored, flat, rows, cols = self._positions(batch.index, int(ids.shape[1]))
        if mask is not None:
            bad = sequence_lengths(ids, mask.detach().cpu()).numpy() != stored
        else:  # without a mask every row is served whole: it must hold at least the stored positions
            bad = stored > ids.shape[1]
        tokens = self._gather("input_ids", flat).astype(np.int64)
        wrong = ids.numpy()[rows, cols] != tokens
        bad = bad | np.bincount(rows[wrong], minlength=len(stored)).astype(bool)
        if bool(bad.any()):
            which = batch.index.cpu()[torch.from_numpy(bad)][:5].tolist()
            raise CacheMismatchError(
                f"the tokens of sequences {which} are not the ones the teacher cache {str(self.path)!r} holds for "
                "these indices: the loader's data, its order of indices, its truncation or padding differ from the "
                "cache's (build the cache from this loader), or these are not training batches")

    # ------------------------------------------------------------------ matching
    def check(self, *, teacher: Any = None, tokenizer: Any = None, data: Any = None, k: int | None = None,
              temperature: float | None = None) -> None:
        """Raise :class:`CacheMismatchError` naming every difference between the cache and what is given.

        ``teacher``: by :func:`~distill.cache.teacher_fingerprint`; ``tokenizer``: by
        :func:`tokenizer_fingerprint`; ``data``: a mapping or loader with ``input_ids`` (and
        ``attention_mask``) tensors of the whole data set, by :func:`token_data_fingerprint`;
        ``k`` and ``temperature``: equal to the build's.
        """
        m = self.manifest
        problems = teacher_mismatch(m["teacher"], teacher)
        if tokenizer is not None:
            fp = tokenizer_fingerprint(tokenizer)
            if m["tokenizer"] is None:
                problems.append("tokenizer: the cache was built without a tokenizer, so this one cannot be checked "
                                "(build with tokenizer=..., or do not pass one)")
            elif fp != m["tokenizer"]["fingerprint"]:
                problems.append(f"tokenizer: the cache was built with {m['tokenizer'].get('description')} hashing to "
                                f"{m['tokenizer']['fingerprint'][:12]}…, this {_describe_tokenizer(tokenizer)} "
                                f"hashes to {fp[:12]}… (another vocabulary or other special tokens)")
        if data is not None:
            tensors = _data_tensors(data)
            if tensors is None:
                raise TypeError(f"data must be a mapping or loader with an input_ids tensor (N, L); got "
                                f"{type(data).__name__}")
            fp = token_data_fingerprint(*tensors)
            if fp != m["data"]["fingerprint"]:
                problems.append(f"data: the cache was built from {m['num_sequences']} sequences "
                                f"({m['num_tokens']:,} tokens) hashing to {m['data']['fingerprint'][:12]}…, the data "
                                f"given has {int(tensors[0].shape[0])} sequences hashing to {fp[:12]}…")
        if k is not None and int(k) != self.k:
            problems.append(f"k: the cache stores the top {self.k} tokens per position, {k} were asked for")
        if temperature is not None and float(temperature) != self.temperature:
            problems.append(f"temperature: the cache's log-probabilities are at T={self.temperature:g}, the losses "
                            f"use T={float(temperature):g}")
        raise_mismatches(self.path, problems, "with overwrite=True")

    def describe(self) -> str:
        """A few lines for ``distill cache info``."""
        m = self.manifest
        size = sum((self.path / f"{n}.bin").stat().st_size for n in (*_FILES, _SEQUENCES))
        tok = m["tokenizer"]
        return "\n".join([
            f"token teacher cache {self.path}",
            f"  {m['num_sequences']} sequences, {m['num_tokens']:,} stored positions; top-{m['k']} log-probs at "
            f"T={m['temperature']:g} + tail mass, {m['dtype']}; vocabulary {m['vocab_size']:,}",
            f"  teacher: {m['teacher'].get('description')}, fingerprint {m['teacher']['fingerprint'][:16]}",
            f"  tokenizer: {tok['description'] + ', fingerprint ' + tok['fingerprint'][:16] if tok else 'not recorded'}",
            f"  data: fingerprint {m['data']['fingerprint'][:16]}"
            + (f"; {json.dumps(m['data']['source'], default=str)}" if m["data"].get("source") else ""),
            f"  {size:,} bytes in {len(_FILES) + 1} files; built {m.get('created')}",
        ])


def is_token_cache(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a token cache's manifest (of this module's format), built or not checked."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------------- building


def _np_value_dtype(dtype: Any) -> tuple[str, np.dtype]:
    names = {torch.float16: "fp16", torch.float32: "fp32", "fp16": "fp16", "fp32": "fp32",
             "float16": "fp16", "float32": "fp32"}
    if dtype not in names:
        raise ValueError(f"dtype must be torch.float16 or torch.float32 ('fp16'/'fp32'); got {dtype!r}")
    return names[dtype], np.dtype(_DTYPES[names[dtype]])


def _batches(data: Any, batch_size: int) -> tuple[Iterable[Any], int | None]:
    """What to iterate (batches with indices) and how many batches there are, if known."""
    if isinstance(data, Mapping):
        tensors = _data_tensors(data)
        if tensors is None:
            raise ValueError(f"a data set given as a mapping needs an input_ids tensor (N, L); it has keys {sorted(data)}")
        ids, mask = tensors
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise ValueError(f"input_ids must be a non-empty tensor (N, L); got shape {tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        n = int(ids.shape[0])

        def gen() -> Iterable[dict[str, Tensor]]:
            for s in range(0, n, batch_size):
                part = {"input_ids": ids[s:s + batch_size], "index": torch.arange(s, min(s + batch_size, n))}
                if mask is not None:
                    part["attention_mask"] = mask[s:s + batch_size]
                yield part

        return gen(), -(-n // batch_size)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor)):
        return data, len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    raise TypeError(f"loader_or_dataset must be a loader yielding token batches with indices, or a mapping with "
                    f"input_ids (N, L) (and attention_mask); got {type(data).__name__}")


class _BlockWriter:
    """Appends bytes to a file and keeps one sha256 per ``block`` bytes."""

    def __init__(self, path: Path, block: int) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.block, self.filled, self.size = block, 0, 0
        self.hash = hashlib.sha256()
        self.digests: list[str] = []

    def write(self, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        self.file.write(data)
        self.size += len(data)
        while len(data):
            take = min(len(data), self.block - self.filled)
            self.hash.update(data[:take])
            self.filled += take
            data = data[take:]
            if self.filled == self.block:
                self.digests.append(self.hash.hexdigest())
                self.hash, self.filled = hashlib.sha256(), 0

    def close(self) -> None:
        if self.filled:
            self.digests.append(self.hash.hexdigest())
            self.hash, self.filled = hashlib.sha256(), 0
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


def build_token_cache(
    teacher: nn.Module | TeacherSource,
    loader_or_dataset: Any,
    path: str | os.PathLike[str],
    *,
    k: int = 64,
    temperature: float = 1.0,
    tokenizer: Any = None,
    dtype: torch.dtype | str = torch.float16,
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
    data_source: dict[str, Any] | None = None,
) -> TokenCache:
    """Run a frozen language-model ``teacher`` once over a token data set and store its top-k log-probabilities.

    Args:
        teacher: a causal or seq2seq LM (``model(input_ids=..., attention_mask=...)`` returns logits
            ``(B, L, V)``, or an output with ``.logits``), frozen here, or a static teacher source.
            It runs where its parameters are.
        loader_or_dataset: a loader yielding Hugging Face batches (``input_ids`` ``(B, L)``,
            ``attention_mask``, ``index`` ``(B,)``; e.g. :class:`distill.data.text.TokenLoader`) or
            :class:`~distill.batch.TokenBatch` es with ``index``, covering indices ``0 .. N−1`` once
            each in any order; or the whole data set as a mapping ``{"input_ids": (N, L),
            "attention_mask": (N, L)}``, read in order ``batch_size`` sequences at a time.
        path: the cache folder.
        k: tokens kept per position (``1 <= k <= V``).
        temperature: ``T`` of the stored ``log softmax(z / T)`` (the KD temperature of the losses).
        tokenizer: the teacher's tokenizer, whose vocabulary and special tokens join the fingerprints.
        dtype: storage of values and tail, ``torch.float16`` (default) or ``torch.float32``.
        batch_size: sequences per forward when ``loader_or_dataset`` is a mapping.
        progress: show a progress bar.
        overwrite: replace a cache that exists at ``path``.
        data_source: what the data is (JSON-able, e.g. the corpus and packing that made it), recorded in
            the manifest's ``data.source`` so that the same data can be made again.

    Returns:
        the cache, opened (and verified) for reading.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1; got {k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    dtype_name, np_dtype = _np_value_dtype(dtype)
    source = as_teacher_source(teacher)
    if not getattr(source, "static", False):
        raise ValueError(f"cannot cache a teacher source whose outputs change during training ({type(source).__name__});"
                         " cache a frozen model")
    model = source.model if isinstance(source, FrozenTeacher) else source
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and k > vocab:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary of {vocab} tokens")
    tok_record = None
    if tokenizer is not None:
        tok_record = {"fingerprint": tokenizer_fingerprint(tokenizer), "description": _describe_tokenizer(tokenizer)}
    batches, total = _batches(loader_or_dataset, batch_size)
    path = Path(path)
    if (path / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"a teacher cache already exists at {str(path)!r}; delete it or pass overwrite=True")
    path.mkdir(parents=True, exist_ok=True)
    with RunLock(path, "token teacher cache build"):
        if (path / MANIFEST).exists() and not overwrite:  # finished by another process meanwhile
            raise FileExistsError(f"a teacher cache already exists at {str(path)!r}; delete it or pass overwrite=True")
        (path / MANIFEST).unlink(missing_ok=True)  # no manifest until the data is complete
        manifest = _write(source, batches, total, path, k=k, temperature=float(temperature), np_dtype=np_dtype,
                          progress=progress)
        manifest.update(dtype=dtype_name, tokenizer=tok_record)
        manifest["data"]["source"] = data_source
        manifest["teacher"] = {"fingerprint": teacher_fingerprint(source), "description": _describe_teacher(source),
                               "metadata": source.metadata}
        atomic_write_json(path / MANIFEST, manifest, default=str)  # last, and whole
    return TokenCache(path, "open")


def _write(source: TeacherSource, batches: Iterable[Any], total: int | None, path: Path, *, k: int,
           temperature: float, np_dtype: np.dtype, progress: bool) -> dict[str, Any]:
    device = next((p.device for p in source.parameters()), torch.device("cpu"))
    source.eval()
    writers = {n: _BlockWriter(path / f"{n}.bin", BLOCK_BYTES) for n in _FILES}
    where: dict[int, tuple[int, int]] = {}  # sequence index -> (offset, length)
    digests: dict[int, bytes] = {}
    stored = vocab = 0
    bar = _bar(progress, total or 0)
    try:
        for raw in batches:
            batch = as_batch(raw)
            if not isinstance(batch, TokenBatch) or batch.index is None:
                raise ValueError("every batch must be a token batch (input_ids, attention_mask) with the sequences' "
                                 "data-set indices ('index'), so that reads find them; got "
                                 f"{type(batch).__name__}" + (" without index" if isinstance(batch, Batch) else ""))
            index = batch.index.detach().cpu().long().tolist()
            again = [i for i in index if i in where or i < 0]
            if again or len(set(index)) != len(index):
                raise ValueError(f"sequence indices {again[:5] or index} are negative or come twice; the loader must "
                                 "yield each sequence of the data set once")
            with torch.no_grad():
                logits = source(batch.to(device))["logits"]
            ids, mask = batch.inputs.cpu(), batch.attention_mask
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
                raise ValueError(f"the teacher's logits have shape {tuple(logits.shape)}; expected (B, L, V) with "
                                 f"(B, L) = {tuple(ids.shape)}, the input_ids'")
            vocab = int(logits.shape[-1])
            if k > vocab:
                raise ValueError(f"k={k} exceeds the teacher's vocabulary of {vocab} tokens")
            values, indices, tail = topk_logprobs(logits, k, temperature)
            lengths = sequence_lengths(ids, None if mask is None else mask.cpu())
            keep = torch.arange(ids.shape[1]) < lengths[:, None]  # (B, L): right padding is not stored
            writers["topk_values"].write(values.cpu()[keep].float().numpy().astype(np_dtype))
            writers["topk_indices"].write(indices.cpu()[keep].numpy().astype(np.int32))
            writers["topk_tail"].write(tail.cpu()[keep].float().numpy().astype(np_dtype))
            writers["input_ids"].write(ids[keep].numpy().astype(np.int32))
            for i, n, d in zip(index, lengths.tolist(), _sequence_digests(ids, mask), strict=True):
                where[i] = (stored, n)
                digests[i] = d
                stored += n
            bar.advance()
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if not where:
        raise ValueError("the loader yielded no sequences: there is nothing to cache")
    n = max(where) + 1
    missing = [i for i in range(n) if i not in where]
    if missing:
        raise ValueError(f"the loader yielded {len(where)} sequences with indices up to {n - 1}, but not {missing[:5]}"
                         f"{'…' if len(missing) > 5 else ''}: a cache needs every sequence of the data set once "
                         "(no drop_last, no sampler that skips)")
    seq = np.array([where[i] for i in range(n)], dtype=np.int64)
    seq_writer = _BlockWriter(path / f"{_SEQUENCES}.bin", BLOCK_BYTES)
    seq_writer.write(seq)
    seq_writer.close()
    shapes = {"topk_values": ((stored, k), np_dtype), "topk_indices": ((stored, k), np.dtype(np.int32)),
              "topk_tail": ((stored,), np_dtype), "input_ids": ((stored,), np.dtype(np.int32)),
              _SEQUENCES: ((n, 2), np.dtype(np.int64))}
    writers[_SEQUENCES] = seq_writer
    return {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "num_sequences": n,
        "num_tokens": stored,
        "vocab_size": vocab,
        "k": k,
        "temperature": temperature,
        "storage": "each sequence's positions 0..length-1 (one past its last attended position), back to back",
        "data": {"fingerprint": _combine_digests((digests[i] for i in range(n)), n),
                 "max_length": int(seq[:, 1].max())},
        "files": {name: {"dtype": np.dtype(dt).str, "shape": list(shape), "blocks": writers[name].digests}
                  for name, (shape, dt) in shapes.items()},
        "block_bytes": BLOCK_BYTES,
    }


# ----------------------------------------------------------------------------------- teacher source


class CachedTokenTeacher(TeacherSource):
    """A teacher source that reads a language-model teacher's top-k log-probabilities from a :class:`TokenCache`.

    The view of a :class:`~distill.batch.TokenBatch` ``(B, L)`` with sequence indices is
    ``{"topk_values": (B, L, k) float32, "topk_indices": (B, L, k) long, "topk_tail": (B, L) float32,
    "topk_temperature": ()}`` (:meth:`TokenCache.read`), on the batch's device; the token methods
    (:mod:`distill.methods.tokens`) read it in place of the live teacher's ``"logits"``.

    Args:
        cache: a cache folder or an open :class:`TokenCache`.
        teacher: the live teacher, optional: checked against the cache's fingerprint now, and used
            for batches without indices (evaluation batches; its view holds ``"logits"``).
        tokenizer: checked against the cache's tokenizer fingerprint now.
        data: the training data set (a mapping or loader with ``input_ids``/``attention_mask``
            tensors), checked against the cache's data fingerprint now.
        k, temperature: what the losses expect; checked against the cache's now.
        verify: checksum policy when ``cache`` is a path (``"open"`` or ``"lazy"``).
        check_inputs: compare each batch's tokens and lengths with the stored ones of its indices.

    Raises:
        CacheMismatchError: the cache was built for another teacher, tokenizer, data, ``k`` or ``T``.
    """

    kind = "cached-tokens"

    def __init__(self, cache: TokenCache | str | os.PathLike[str], *, teacher: Any = None, tokenizer: Any = None,
                 data: Any = None, k: int | None = None, temperature: float | None = None,
                 verify: Literal["open", "lazy"] = "open", check_inputs: bool = True,
                 metadata: dict[str, Any] | None = None) -> None:
        cache = cache if isinstance(cache, TokenCache) else TokenCache(cache, verify)
        fallback = as_teacher_source(teacher) if teacher is not None else None
        cache.check(teacher=fallback, tokenizer=tokenizer, data=data, k=k, temperature=temperature)
        if metadata is None:
            metadata = fallback.metadata if fallback is not None else cache.manifest["teacher"].get("metadata")
        super().__init__(metadata)
        self.cache = cache
        self.fallback = fallback
        self.static = bool(getattr(fallback, "static", False))
        self.check_inputs = bool(check_inputs)

    @property
    def temperature(self) -> float:
        """The ``T`` the cached log-probabilities were taken at."""
        return self.cache.temperature

    def prepare_loader(self, loader: Any) -> None:
        """Check a loader's data (its ``input_ids``/``attention_mask`` tensors, when it exposes them)
        against the cache's fingerprint; :class:`CacheMismatchError` when they differ."""
        if _data_tensors(loader) is not None:
            self.cache.check(data=loader)

    def forward(self, batch: Batch) -> View:
        if batch.index is None:
            if self.fallback is not None:
                return self.fallback(batch)
            raise ValueError("the cached token teacher reads sequences by index, but the batch has none: use a "
                             "loader that yields 'index', or give CachedTokenTeacher(..., teacher=model) the live "
                             "teacher for evaluation batches")
        if not isinstance(batch, TokenBatch):
            raise TypeError(f"the cached token teacher serves token batches (input_ids (B, L)); got "
                            f"{type(batch).__name__} with inputs of shape {tuple(batch.inputs.shape)}")
        if self.check_inputs:
            self.cache.check_tokens(batch)
        return self.cache.read(batch.index, int(batch.inputs.shape[1]), device=batch.inputs.device)

    def extra_repr(self) -> str:
        return f"path={str(self.cache.path)!r}, k={self.cache.k}, T={self.cache.temperature:g}"
