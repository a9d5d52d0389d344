"""A small sequence-to-sequence task from real offline text, and loaders of Hugging Face seq2seq batches.

Machine translation and summarisation corpora are not available offline, so the closest honest
small task is built from the Python standard library's documentation
(:func:`distill.data.corpus.stdlib_docstrings`): a docstring's **first sentence is its summary
line** (PEP 257), so ``source = the docstring passage`` and ``target = its first sentence`` is a
real, human-written (passage, summary) pair. With ``keep_lead=False`` the first sentence is removed
from the source and the task is abstractive (write the summary line from the body); with
``keep_lead=True`` (default) it stays in and the task is lead extraction, learnable by tiny models
in minutes on a CPU.

:func:`seq2seq_loader` yields ``{"input_ids": (B, S), "attention_mask": (B, S), "labels": (B, T)
(−100 on padding), "decoder_input_ids": (B, T), "index": (B,)}``: the decoder inputs are the labels
shifted right behind ``decoder_start_token_id`` (what Hugging Face encoder-decoders derive from
``labels`` when they are given them; the :class:`~distill.Distiller` does not pass labels to the
model, so the loader does it), and :func:`distill.batch.as_batch` turns such a dict into a
:class:`~distill.batch.TokenBatch` whose targets are the labels.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Seq2SeqLoader", "bpe_tokenizer", "byte_tokenizer", "encode_seq2seq", "first_sentence", "seq2seq_loader",
           "shift_right", "summary_pairs"]

IGNORE_INDEX = -100
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s+|$)")


def byte_tokenizer(extra_ids: int = 0) -> Any:
    """A byte-level tokenizer that needs no download: ``transformers.ByT5Tokenizer`` (256 bytes +
    pad 0, eos 1, unk 2; ``extra_ids`` sentinel tokens), for tiny seq2seq models built from configs."""
    from distill.integrations import require

    transformers = require("transformers", "llm", "a byte-level seq2seq tokenizer")
    return transformers.ByT5Tokenizer(extra_ids=extra_ids)


def bpe_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` here (Hugging Face ``tokenizers``, no download),
    wrapped as a ``transformers.PreTrainedTokenizerFast`` with the ids of :func:`byte_tokenizer` and
    :func:`distill.models.seq2seq.tiny_t5`: pad 0, eos 1 (appended by ``add_special_tokens=True``),
    unk 2. Byte-level: every text encodes (no unknown token) and decodes back exactly; merges make
    sequences about 3–4 times shorter than bytes on English prose, so tiny models see whole
    sentences in few positions. Training is deterministic for the same texts and size.

    Args:
        texts: the training texts (e.g. the passages of the training split only).
        vocab_size: the vocabulary, 3 special tokens and the 256 byte symbols included (≥ 260).
    """
    from distill.integrations import require

    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("bpe_tokenizer expects a non-empty list of strings")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 260:
        raise ValueError(f"bpe_tokenizer vocab_size must be an int >= 260 (3 special tokens + 256 bytes + merges); "
                         f"got {vocab_size!r}")
    transformers = require("transformers", "llm", "a BPE tokenizer")
    tokenizers = require("tokenizers", "llm", "a BPE tokenizer")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    bpe.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def first_sentence(text: str) -> tuple[str, str]:
    """``(first sentence, the rest)`` of ``text``: cut after the first ``.``, ``!`` or ``?`` followed
    by white space or the end; whitespace runs (line breaks) in the sentence become one space."""
    if not isinstance(text, str):
        raise TypeError(f"first_sentence expects a string; got {type(text).__name__}")
    text = text.strip()
    m = _SENTENCE_END.search(text)
    head, rest = (text, "") if m is None else (text[:m.start()], text[m.end():])
    return " ".join(head.split()), rest.strip()


def summary_pairs(passages: Sequence[Any], *, keep_lead: bool = True, min_target_chars: int = 10,
                  max_target_chars: int = 120, min_source_chars: int = 40) -> list[tuple[str, str]]:
    """(source, target) pairs: each passage and its first sentence (its summary line).

    Args:
        passages: :class:`~distill.data.corpus.Passage` objects (their ``.text``) or strings.
        keep_lead: keep the first sentence in the source (lead extraction) or remove it (the
            summary line written from the rest of the passage).
        min_target_chars, max_target_chars: first sentences outside this length are skipped (a
            passage with no sentence end, a run-on line).
        min_source_chars: sources shorter than this are skipped.

    Returns:
        The pairs, in passage order, whitespace-normalised (line breaks become spaces).
    """
    if isinstance(passages, str) or not isinstance(passages, Sequence):
        raise TypeError(f"summary_pairs expects a list of passages; got {type(passages).__name__}")
    for name, v in (("min_target_chars", min_target_chars), ("max_target_chars", max_target_chars),
                    ("min_source_chars", min_source_chars)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"summary_pairs {name} must be an int >= 1; got {v!r}")
    if max_target_chars < min_target_chars:
        raise ValueError(f"summary_pairs needs max_target_chars >= min_target_chars; got {max_target_chars} < "
                         f"{min_target_chars}")
    pairs = []
    for p in passages:
        text = p if isinstance(p, str) else getattr(p, "text", None)
        if not isinstance(text, str):
            raise TypeError(f"summary_pairs: a passage must be a string or have .text; got {type(p).__name__}")
        target, rest = first_sentence(text)
        if not min_target_chars <= len(target) <= max_target_chars:
            continue
        source = " ".join((text if keep_lead else rest).split())
        if len(source) < min_source_chars:
            continue
        pairs.append((source, target))
    return pairs


def shift_right(labels: Tensor, decoder_start_token_id: int, pad_token_id: int) -> Tensor:
    """Decoder inputs ``(B, T)`` from labels ``(B, T)``: ``[start, y_1, ..., y_{T-1}]`` with −100 as
    padding (the teacher-forcing input of an encoder-decoder: position ``t`` predicts ``y_t``)."""
    out = torch.full_like(labels, pad_token_id)
    out[:, 0] = decoder_start_token_id
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_token_id)
    return out


def _positive(value: Any, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who} {name} must be an int >= 1; got {value!r}")
    return value


def _check_pairs(pairs: Any, who: str) -> list[tuple[str, str]]:
    if isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"{who} pairs must be a non-empty list of (source, target) strings")
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p)):
            raise TypeError(f"{who}: pair {i} must be a (source, target) pair of strings; got {p!r}")
    return [(s, t) for s, t in pairs]


def encode_seq2seq(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_source_len: int,
                   max_target_len: int) -> dict[str, Tensor]:
    """Tokenise pairs into right-padded tensors.

    Returns:
        ``{"input_ids": (N, S) long, "attention_mask": (N, S) long, "labels": (N, T) long}``: the
        source with the tokenizer's special tokens (its EOS), cut to ``max_source_len``; the target
        without special tokens, then EOS, cut to ``max_target_len`` (a cut target loses its EOS, so
        the model is not taught to stop there); labels are −100 on the padding. Cut rows are
        counted in a warning.
    """
    who = "encode_seq2seq"
    pairs = _check_pairs(pairs, who)
    S = _positive(max_source_len, "max_source_len", who)
    T = _positive(max_target_len, "max_target_len", who)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError(f"{who}: the tokenizer needs an eos and a pad token; got eos={eos}, pad={pad}")
    srcs, tgts, cut = [], [], 0
    for source, target in pairs:
        s = list(tokenizer(source, add_special_tokens=True)["input_ids"])
        t = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [eos]
        cut += len(s) > S or len(t) > T
        srcs.append(s[:S])
        tgts.append(t[:T])
    if cut:
        warnings.warn(f"{who}: {cut} of {len(pairs)} pair(s) were cut to max_source_len={S} / max_target_len={T}",
                      stacklevel=2)
    ws, wt = max(map(len, srcs)), max(map(len, tgts))
    ids = torch.full((len(pairs), ws), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(pairs), wt), IGNORE_INDEX, dtype=torch.long)
    for r, (s, t) in enumerate(zip(srcs, tgts)):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
        labels[r, :len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Seq2SeqLoader:
    """Batches of encoded (source, target) pairs held in memory, as Hugging Face seq2seq dicts.

    Each batch: ``{"input_ids": (B, S), "attention_mask": (B, S), "labels": (B, T), "decoder_input_ids":
    (B, T), "index": (B,)}``, cut to the batch's longest source and target. The order of epoch ``e``
    is a pure function of ``(seed, e)`` (``fit`` calls :meth:`set_epoch`).

    Args:
        encoded: :func:`encode_seq2seq`'s result.
        batch_size: rows per batch.
        decoder_start_token_id, pad_token_id: for the decoder inputs (:func:`shift_right`).
        shuffle, seed, drop_last: the order.
    """

    def __init__(self, encoded: dict[str, Tensor], batch_size: int, *, decoder_start_token_id: int,
                 pad_token_id: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in encoded]
        if missing:
            raise ValueError(f"Seq2SeqLoader needs {missing} in encoded; got {sorted(encoded)}")
        self.input_ids, self.attention_mask, self.labels = (encoded["input_ids"], encoded["attention_mask"],
                                                            encoded["labels"])
        if self.input_ids.shape[0] != self.labels.shape[0] or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(f"Seq2SeqLoader: input_ids {tuple(self.input_ids.shape)}, attention_mask "
                             f"{tuple(self.attention_mask.shape)} and labels {tuple(self.labels.shape)} must have one "
                             "row per pair (and the mask the shape of the ids)")
        self.batch_size = _positive(batch_size, "batch_size", "Seq2SeqLoader")
        self.decoder_start_token_id, self.pad_token_id = int(decoder_start_token_id), int(pad_token_id)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Seq2SeqLoader.set_epoch expects an int >= 0; got {epoch!r}")
        self.epoch = epoch

    def order(self, epoch: int | None = None) -> Tensor:
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        digest = hashlib.sha256(f"distill.Seq2SeqLoader|{self.seed}|{epoch}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return torch.randperm(self.num_samples, generator=g)

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        """The batch of rows ``index`` ``(B,)``, cut to its longest source and target."""
        mask = self.attention_mask[index]
        labels = self.labels[index]
        s = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        valid = (labels != IGNORE_INDEX).any(0).nonzero()
        t = int(valid.max()) + 1 if valid.numel() else 1
        labels = labels[:, :t]
        return {"input_ids": self.input_ids[index, :s], "attention_mask": mask[:, :s], "labels": labels,
                "decoder_input_ids": shift_right(labels, self.decoder_start_token_id, self.pad_token_id),
                "index": index}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        order = self.order()
        for k in range(len(self)):
            yield self.batch(order[k * self.batch_size:(k + 1) * self.batch_size])

    def __repr__(self) -> str:
        return (f"Seq2SeqLoader(samples={self.num_samples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"seed={self.seed}, epoch={self.epoch})")


def seq2seq_loader(pairs: Sequence[tuple[str, str]], tokenizer: Any, batch_size: int, max_source_len: int,
                   max_target_len: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                   decoder_start_token_id: int | None = None) -> Seq2SeqLoader:
    """A :class:`Seq2SeqLoader` over ``pairs`` (:func:`encode_seq2seq`).

    ``decoder_start_token_id`` defaults to the tokenizer's pad token (the T5 convention; BART starts
    with its EOS: pass ``model.config.decoder_start_token_id``).
    """
    encoded = encode_seq2seq(tokenizer, pairs, max_source_len, max_target_len)
    start = tokenizer.pad_token_id if decoder_start_token_id is None else decoder_start_token_id
    return Seq2SeqLoader(encoded, batch_size, decoder_start_token_id=start, pad_token_id=tokenizer.pad_token_id,
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
