"""Text for language-model distillation: prompts, tokenised batches and their loader.

Nothing here downloads anything. The offline corpus (the installed standard library's
documentation) is :mod:`distill.data.corpus`, re-exported here: :func:`stdlib_docstrings`,
:func:`split_passages`, :func:`corpus_fingerprint`. :func:`chat_prompts` turns its passages into
instructions for a teacher to answer (:func:`distill.generations.generate`).

Tokenised data are Hugging Face dict batches (``input_ids``, ``attention_mask``, ``labels``; labels
are *not* shifted, −100 carries no loss), the form :func:`distill.batch.as_batch` reads:

- :func:`pack_causal`: plain language modelling, documents joined with EOS and cut into blocks.
- :func:`prompt_completion`: instruction data, loss only on the completion (the teacher's answer).
- :class:`TokenLoader`: batches of those tensors in a seeded order per epoch, with each row's
  position in the data set (``index``) for a teacher cache, and padding trimmed per batch.

Tokenizers are duck-typed Hugging Face tokenizers (``__call__``, ``eos_token_id``,
``pad_token_id``, ``apply_chat_template``): this module imports no optional package.
"""

from __future__ import annotations

import hashlib
import string
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from distill.data.corpus import (
    SKIPPED_MODULES,
    Passage,
    corpus_fingerprint,
    split_passages,
    stdlib_docstrings,
)
from distill.data.loader import batches_per_epoch, rank_batches

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "IGNORE_INDEX",
    "SKIPPED_MODULES",
    "Encoded",
    "Passage",
    "TokenLoader",
    "chat_prompts",
    "corpus_fingerprint",
    "encode_prompt",
    "pack_causal",
    "prompt_completion",
    "split_passages",
    "stdlib_docstrings",
]

IGNORE_INDEX = -100
"""Hugging Face's label for "no loss at this position" (prompt, padding)."""

DEFAULT_PROMPT_TEMPLATE = "Explain in two sentences what this Python documentation says:\n\n{text}"


def chat_prompts(passages: Sequence[Passage | str], template: str = DEFAULT_PROMPT_TEMPLATE) -> list[str]:
    """One instruction prompt per passage: ``template.format(text=..., source=..., module=...)``.

    ``template`` must use ``{text}`` and may use ``{source}`` and ``{module}`` (plain strings among
    ``passages`` have an empty source). The prompts are plain text; :func:`prompt_completion` and
    :func:`distill.generations.generate` wrap them in the tokenizer's chat template.
    """
    if not isinstance(template, str):
        raise TypeError(f"chat_prompts template must be a string; got {type(template).__name__}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"chat_prompts template {template!r} is not a valid format string: {e}") from None
    unknown = sorted(fields - {"text", "source", "module"})
    if unknown or "text" not in fields:
        raise ValueError(f"chat_prompts template must contain {{text}} and may contain only {{text}}, {{source}}, "
                         f"{{module}}; got fields {sorted(fields)} in {template!r}")
    out = []
    for p in passages:
        if isinstance(p, Passage):
            out.append(template.format(text=p.text, source=p.source, module=p.module))
        elif isinstance(p, str):
            out.append(template.format(text=p, source="", module=""))
        else:
            raise TypeError(f"chat_prompts expects Passages or strings; got {type(p).__name__}")
    return out


# ----------------------------------------------------------------------------------- tokenisation


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return [int(i) for i in ids]


def _eos_id(tokenizer: Any, who: str) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"{who} needs the tokenizer's EOS token to end each text; {type(tokenizer).__name__} has "
                         "no eos_token (set tokenizer.eos_token)")
    return int(eos)


def _pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else its EOS (padding carries attention 0 and label
    −100, so which id fills it does not matter to the loss)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else _eos_id(tokenizer, "padding")


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """The token ids a model sees for ``prompt``.

    With ``chat_template``: the prompt as one user message in the tokenizer's chat template,
    followed by the assistant's turn header (``add_generation_prompt=True``), tokenised without
    adding special tokens again (the template writes them). Otherwise the prompt tokenised with the
    tokenizer's special tokens (its BOS, if it adds one). :func:`prompt_completion` and
    :func:`distill.generations.generate` both use this, so the student is trained on exactly the
    prompt the teacher answered.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string; got {type(prompt).__name__}")
    if not chat_template:
        return _ids(tokenizer, prompt, add_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat_template=True but {type(tokenizer).__name__} has no chat template; pass "
                         "chat_template=False to use the prompts as plain text, or set tokenizer.chat_template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return _ids(tokenizer, text, add_special_tokens=False)


def _check_texts(texts: Any, name: str, who: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{who} {name} must be a list of strings; got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{who} {name} must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return list(texts)


def _positive_int(value: Any, name: str, who: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{who} {name} must be an int >= {minimum}; got {value!r}")
    return value


def pack_causal(texts: Sequence[str], tokenizer: Any, seq_len: int, *, add_eos: bool = True,
                remainder: str = "drop") -> dict[str, Tensor]:
    """Causal-LM blocks: the texts tokenised (with the tokenizer's special tokens), each followed by
    EOS, concatenated in order and cut into blocks of ``seq_len`` tokens.

    Returns ``{"input_ids": (N, seq_len) long, "attention_mask": (N, seq_len) long,
    "labels": (N, seq_len) long}`` with ``labels = input_ids`` (unshifted: the model shifts), so
    every token but each block's first is predicted. Blocks attend across document boundaries
    (the EOS between documents marks them), as is usual for packed pre-training data.

    Args:
        remainder: the tokens after the last full block: ``"drop"`` them, or ``"pad"`` them into one
            more block (padding: attention 0, label −100).
    """
    who = "pack_causal"
    texts = _check_texts(texts, "texts", who)
    seq_len = _positive_int(seq_len, "seq_len", who, minimum=2)
    if remainder not in ("drop", "pad"):
        raise ValueError(f"{who} remainder must be 'drop' or 'pad'; got {remainder!r}")
    eos = _eos_id(tokenizer, who) if add_eos else None
    stream: list[int] = []
    for t in texts:
        stream += _ids(tokenizer, t, add_special_tokens=True)
        if eos is not None:
            stream.append(eos)
    full = len(stream) // seq_len
    rest = len(stream) - full * seq_len
    if full == 0 and (remainder == "drop" or rest == 0):
        raise ValueError(f"{who}: the {len(texts)} text(s) make {len(stream)} tokens, fewer than one block of "
                         f"seq_len={seq_len}; give more text, a smaller seq_len or remainder='pad'")
    ids = torch.tensor(stream[: full * seq_len], dtype=torch.long).view(full, seq_len)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if remainder == "pad" and rest:
        last = torch.full((1, seq_len), _pad_id(tokenizer), dtype=torch.long)
        last[0, :rest] = torch.tensor(stream[full * seq_len:], dtype=torch.long)
        last_mask = torch.zeros_like(last)
        last_mask[0, :rest] = 1
        last_labels = torch.where(last_mask.bool(), last, torch.full_like(last, IGNORE_INDEX))
        ids, mask, labels = (torch.cat([a, b]) for a, b in ((ids, last), (mask, last_mask), (labels, last_labels)))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Encoded(dict):
    """:func:`prompt_completion`'s result: a plain ``dict`` of tensors (``input_ids``,
    ``attention_mask``, ``labels``, each ``(N, L)`` long) with what the truncation did as attributes.

    Attributes:
        truncated: positions (in the input lists) of the examples whose completion was cut.
        dropped: positions of the examples left out because their prompt left no room for a
            completion token (only with ``overlong="drop"``).
        kept: the position in the input lists of each row (``range(N)`` unless some were dropped).
    """

    truncated: list[int]
    dropped: list[int]
    kept: list[int]


def prompt_completion(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], max_len: int,
                      chat_template: bool = True, *, add_eos: bool | Sequence[bool] = True,
                      overlong: str = "error") -> Encoded:
    """Instruction data: each row is the prompt's tokens (:func:`encode_prompt`) then the
    completion's (tokenised without special tokens) then EOS; the loss is on the completion only.

    Rows are right-padded to the longest one (at most ``max_len``). ``labels`` is −100 on the
    prompt and the padding and equals ``input_ids`` on the completion and its EOS;
    ``attention_mask`` is 1 on the prompt and the completion, 0 on the padding.

    Truncation never happens silently: a row longer than ``max_len`` loses the end of its
    completion (its EOS first), keeping the whole prompt; such examples are listed in
    ``result.truncated`` and a warning gives their count. A prompt so long that no completion token
    fits is an error naming the first such example (``overlong="error"``, the default), or is
    dropped and listed in ``result.dropped`` with a warning (``overlong="drop"``).

    Args:
        max_len: the longest row, in tokens (≥ 2).
        chat_template: wrap each prompt in the tokenizer's chat template (:func:`encode_prompt`).
        add_eos: end the completions with EOS (one bool, or one per example: ``False`` for a
            completion the teacher did not finish, so the student is not taught to stop there).
        overlong: ``"error"`` or ``"drop"`` (see above).
    """
    who = "prompt_completion"
    prompts = _check_texts(prompts, "prompts", who)
    completions = _check_texts(completions, "completions", who)
    if len(prompts) != len(completions):
        raise ValueError(f"{who} got {len(prompts)} prompts but {len(completions)} completions; they pair up one "
                         "to one")
    if not prompts:
        raise ValueError(f"{who} got no examples")
    max_len = _positive_int(max_len, "max_len", who, minimum=2)
    if overlong not in ("error", "drop"):
        raise ValueError(f"{who} overlong must be 'error' or 'drop'; got {overlong!r}")
    if isinstance(add_eos, bool):
        eos_flags = [add_eos] * len(prompts)
    else:
        eos_flags = list(add_eos)
        if len(eos_flags) != len(prompts) or not all(isinstance(f, bool) for f in eos_flags):
            raise ValueError(f"{who} add_eos must be a bool or one bool per example ({len(prompts)}); got {add_eos!r}")
    eos = _eos_id(tokenizer, who) if any(eos_flags) else None
    rows: list[tuple[list[int], list[int]]] = []
    truncated: list[int] = []
    dropped: list[int] = []
    kept: list[int] = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids = encode_prompt(tokenizer, p, chat_template)
        completion_ids = _ids(tokenizer, c, add_special_tokens=False) + ([eos] if eos_flags[i] else [])
        room = max_len - len(prompt_ids)
        if room < 1 and completion_ids:
            if overlong == "error":
                raise ValueError(f"{who}: example {i}'s prompt is {len(prompt_ids)} tokens, which leaves no room "
                                 f"for its completion within max_len={max_len}; raise max_len, shorten the "
                                 "prompts, or pass overlong='drop' to leave such examples out")
            dropped.append(i)
            continue
        if len(completion_ids) > room:
            completion_ids = completion_ids[:room]
            truncated.append(i)
        rows.append((prompt_ids, completion_ids))
        kept.append(i)
    if not rows:
        raise ValueError(f"{who}: every example's prompt is too long for max_len={max_len}")
    if truncated:
        warnings.warn(f"{who}: {len(truncated)} of {len(prompts)} completion(s) were cut to fit max_len={max_len} "
                      f"(first: example {truncated[0]}); see the result's .truncated", stacklevel=2)
    if dropped:
        warnings.warn(f"{who}: {len(dropped)} of {len(prompts)} example(s) were dropped: their prompt leaves no "
                      f"room within max_len={max_len} (first: example {dropped[0]}); see the result's .dropped",
                      stacklevel=2)
    width = max(len(a) + len(b) for a, b in rows)
    pad = _pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (a, b) in enumerate(rows):
        n = len(a) + len(b)
        ids[r, :n] = torch.tensor(a + b, dtype=torch.long)
        labels[r, len(a):n] = torch.tensor(b, dtype=torch.long)
        mask[r, :n] = 1
    out = Encoded(input_ids=ids, attention_mask=mask, labels=labels)
    out.truncated, out.dropped, out.kept = truncated, dropped, kept
    return out


# ----------------------------------------------------------------------------------- the loader


def _order_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch``'s permutation, a pure function of ``(seed, epoch)``."""
    digest = hashlib.sha256(f"distill.TokenLoader|{int(seed)}|{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TokenLoader:
    """Batches of token tensors held in memory, yielding Hugging Face dict batches.

    Each batch is ``{"input_ids": (B, L) long, "attention_mask": (B, L) long, "labels": (B, L) long,
    "index": (B,) long}`` where ``index`` is each row's position in the data set (what a teacher
    cache reads by). The sample order of epoch ``e`` is a pure function of ``(seed, e)``; the loop
    calls :meth:`set_epoch` before each epoch (as for :class:`~distill.data.loader.InMemoryLoader`),
    so a run resumed at epoch ``e`` sees the batches the uninterrupted run saw.

    With ``trim_padding`` each batch is cut after its last column that any row attends to (its
    longest row, for right-padded data), so short batches do not pay for the data set's longest row.

    Sharding for multi-process training (:meth:`set_shard`): as ``InMemoryLoader``'s — every rank
    draws the same permutation; ``split="batch"`` gives rank ``r`` the ``r``-th of ``W`` contiguous
    parts of each global batch, ``split="samples"`` every ``W``-th sample of the epoch.

    Args:
        input_ids: ``(N, L)`` long.
        labels: ``(N, L)`` long with −100 where no loss is taken (it must be −100 wherever
            ``attention_mask`` is 0), or ``None`` (no ``"labels"`` key in the batches).
        attention_mask: ``(N, L)`` of 0/1 (long, int or bool), or ``None`` (every position attended;
            nothing to trim).
        batch_size: rows per batch (the last one may be smaller unless ``drop_last``).
        shuffle: a fresh permutation per epoch; otherwise data order.
        seed: the base seed of the order.
        drop_last: drop the final incomplete batch.
        trim_padding: cut each batch to its last attended column.
        device: move the tensors there once, at construction.
    """

    def __init__(self, input_ids: Tensor, labels: Tensor | None, attention_mask: Tensor | None, batch_size: int,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, *, trim_padding: bool = True,
                 device: torch.device | str | None = None) -> None:
        who = "TokenLoader"
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"{who} input_ids must be a (N, L) tensor; got {got}")
        if input_ids.dtype != torch.long:
            raise TypeError(f"{who} input_ids must be torch.long token ids; got {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError(f"{who} got no rows (input_ids of shape {tuple(input_ids.shape)})")
        for name, t in (("labels", labels), ("attention_mask", attention_mask)):
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{who} {name} must be a tensor or None; got {type(t).__name__}")
            if t.shape != input_ids.shape:
                raise ValueError(f"{who} {name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}; "
                                 "they must match")
        if labels is not None and labels.dtype != torch.long:
            raise TypeError(f"{who} labels must be torch.long (−100 = no loss); got {labels.dtype}")
        if attention_mask is not None:
            if attention_mask.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.long):
                raise TypeError(f"{who} attention_mask must hold 0/1 integers or bools; got {attention_mask.dtype}")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError(f"{who} attention_mask must hold only 0 and 1")
            attention_mask = attention_mask.long()
            if labels is not None:
                bad = (attention_mask == 0) & (labels != IGNORE_INDEX)
                if bool(bad.any()):
                    row = int(bad.any(1).nonzero()[0])
                    raise ValueError(f"{who}: labels must be −100 where attention_mask is 0 (padding), but "
                                     f"{int(bad.sum())} padded position(s) carry a label (first in row {row}); the "
                                     "model would be trained to predict padding. Set those labels to −100")
        self.batch_size = _positive_int(batch_size, "batch_size", who)
        if device is not None:
            input_ids = input_ids.to(device)
            labels = labels.to(device) if labels is not None else None
            attention_mask = attention_mask.to(device) if attention_mask is not None else None
        self.input_ids, self.labels, self.attention_mask = input_ids, labels, attention_mask
        self.shuffle, self.seed, self.drop_last, self.trim_padding = bool(shuffle), int(seed), bool(drop_last), \
            bool(trim_padding)
        self.epoch = 0
        self.rank, self.world_size, self.split = 0, 1, "batch"

    @classmethod
    def from_encoded(cls, encoded: Mapping[str, Tensor], batch_size: int, **kwargs: Any) -> TokenLoader:
        """A loader over :func:`pack_causal`'s or :func:`prompt_completion`'s result."""
        if "input_ids" not in encoded:
            raise ValueError(f"TokenLoader.from_encoded needs an 'input_ids' key; got {sorted(encoded)}")
        return cls(encoded["input_ids"], encoded.get("labels"), encoded.get("attention_mask"), batch_size, **kwargs)

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        """Batches per epoch (of this rank, when sharded: the same on every rank)."""
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size, self.split, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration produces."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"TokenLoader.set_epoch expects an int >= 0; got {epoch!r}")
        self.epoch = epoch

    def set_shard(self, rank: int, world_size: int, split: str = "batch") -> None:
        """Yield only rank ``rank``'s part of the data of ``world_size`` processes (``set_shard(0, 1)`` undoes it)."""
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TokenLoader.set_shard: {name} must be an int; got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"TokenLoader.set_shard: need 0 <= rank < world_size; got rank={rank}, "
                             f"world_size={world_size}")
        if split not in ("batch", "samples"):
            raise ValueError(f"TokenLoader.set_shard: split must be 'batch' or 'samples'; got {split!r}")
        self.rank, self.world_size, self.split = rank, world_size, split

    def order(self, epoch: int | None = None) -> Tensor:
        """The row order ``(N,)`` (int64, CPU) of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(_order_seed(self.seed, epoch)))

    def batch_indices(self, epoch: int | None = None) -> list[Tensor]:
        """The row indices (CPU, int64) of every batch this loader (this rank) yields in ``epoch``."""
        return rank_batches(self.order(epoch), self.batch_size, len(self), self.rank, self.world_size, self.split,
                            self.drop_last)

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        """The batch of rows ``index`` ``(B,)``, trimmed as the loader trims."""
        idx = index.to(self.input_ids.device)
        out = {"input_ids": self.input_ids[idx]}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask[idx]
        else:
            out["attention_mask"] = torch.ones_like(out["input_ids"])
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        if self.trim_padding and self.attention_mask is not None:
            used = out["attention_mask"].any(0).nonzero()
            width = int(used[-1]) + 1 if used.numel() else 1
            if width < out["input_ids"].shape[1]:
                out = {k: v[:, :width] for k, v in out.items()}
        out["index"] = idx
        return out

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for idx in self.batch_indices(self.epoch):
            yield self.batch(idx)

    def __repr__(self) -> str:
        return (f"TokenLoader(samples={self.num_samples}, seq_len={self.input_ids.shape[1]}, "
                f"batch_size={self.batch_size}, shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"trim_padding={self.trim_padding}, epoch={self.epoch}"
                + (f", shard={self.rank}/{self.world_size} ({self.split})" if self.world_size > 1 else "") + ")")
