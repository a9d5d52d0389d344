"""A small real token-tagging task from offline text, for adversarial imitation KD (event detection).

Text: the Python standard library's docstrings (:func:`distill.data.corpus.stdlib_docstrings`), lower-cased
and cut into words ``[a-z_]+``. A word is an **event trigger** (tag 1) when it is one of
:data:`TRIGGER_VERBS` (verbs that docstrings also use as nouns: "return", "set", "call", "open", ...)
*and* the next word opens a noun phrase (:data:`ARGUMENT_STARTS`: "the", "a", "it", ...): "return the
value" holds a trigger, "the return value" does not. So a word alone does not decide its tag, the context
does, as in event detection, where a word is a trigger in one sentence and not in the next.

The **gold annotation** (what only the teacher sees, as ACE's gold entity/argument annotations in the
paper) marks each argument start that follows a verb of the list (1, else 0). Chosen because it is exact,
deterministic and reproducible offline, and because it is what the paper's privileged annotations are:
an annotation of the trigger's argument that makes the trigger easy to find.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ARGUMENT_STARTS", "TRIGGER_VERBS", "TaggingLoader", "TaggingSet", "build_tagging_sets", "tag_words"]

TRIGGER_VERBS = frozenset(
    "return returns set sets call calls open opens read reads write writes close closes create creates copy copies "
    "raise raises check checks update updates add adds remove removes start starts stop stops run runs format "
    "formats match matches test tests list lists map maps sort sorts print prints load loads save saves parse "
    "parses handle handles use uses get gets make makes find finds send sends".split())
ARGUMENT_STARTS = frozenset("the a an this that these those it its all each any one some them their no".split())

PAD, UNK = 0, 1
_WORD = re.compile(r"[a-z_]+")


def tag_words(words: Sequence[str]) -> tuple[list[int], list[int]]:
    """``(tags, annotations)`` of a word sequence: ``tags[i] = 1`` iff ``words[i]`` is in
    :data:`TRIGGER_VERBS` and ``words[i + 1]`` in :data:`ARGUMENT_STARTS`; ``annotations[i + 1] = 1`` for
    that argument start (the gold annotation; 0 elsewhere)."""
    n = len(words)
    tags, notes = [0] * n, [0] * n
    for i in range(n - 1):
        if words[i] in TRIGGER_VERBS and words[i + 1] in ARGUMENT_STARTS:
            tags[i], notes[i + 1] = 1, 1
    return tags, notes


@dataclass
class TaggingSet:
    """Windows of word ids ``ids`` (N, L) long (0 = padding, 1 = unknown word), the gold annotations
    ``annotations`` (N, L) long in {0, 1}, the tags ``tags`` (N, L) long in {0, 1} with -100 on padding,
    and the vocabulary ``vocab`` (index → word)."""

    ids: Tensor
    annotations: Tensor
    tags: Tensor
    vocab: list[str]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _windows(texts: Sequence[str], length: int) -> list[list[str]]:
    out = []
    for text in texts:
        words = _WORD.findall(text.lower())
        out += [words[i:i + length] for i in range(0, len(words) - 1, length)]
    return [w for w in out if len(w) >= 2]


def _encode(windows: list[list[str]], index: dict[str, int], length: int) -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.zeros(len(windows), length, dtype=torch.long)
    notes = torch.zeros_like(ids)
    tags = torch.full_like(ids, -100)
    for r, words in enumerate(windows):
        t, a = tag_words(words)
        n = len(words)
        ids[r, :n] = torch.tensor([index.get(w, UNK) for w in words])
        notes[r, :n] = torch.tensor(a)
        tags[r, :n] = torch.tensor(t)
    return ids, notes, tags


def build_tagging_sets(train_texts: Sequence[str], val_texts: Sequence[str], *, length: int = 24,
                       vocab_size: int = 2000, max_train: int | None = None) -> tuple[TaggingSet, TaggingSet]:
    """Training and validation :class:`TaggingSet` from two lists of texts (split them by package with
    :func:`distill.data.corpus.split_passages`): windows of ``length`` words, the ``vocab_size - 2`` most
    frequent training words (ties in first-seen order) plus padding and unknown; ``max_train`` keeps the
    first windows of the training part (a low-resource regime)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"build_tagging_sets: length must be an int >= 2; got {length!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 3:
        raise ValueError(f"build_tagging_sets: vocab_size must be an int >= 3; got {vocab_size!r}")
    train_w, val_w = _windows(train_texts, length), _windows(val_texts, length)
    if max_train is not None:
        train_w = train_w[:max_train]
    if not train_w or not val_w:
        raise ValueError(f"build_tagging_sets: no windows of >= 2 words (train {len(train_w)}, val {len(val_w)})")
    counts = Counter(w for ws in train_w for w in ws)
    vocab = ["<pad>", "<unk>"] + [w for w, _ in counts.most_common(vocab_size - 2)]
    index = {w: i for i, w in enumerate(vocab)}
    return (TaggingSet(*_encode(train_w, index, length), vocab), TaggingSet(*_encode(val_w, index, length), vocab))


class TaggingLoader:
    """Batches of a :class:`TaggingSet` as dicts ``{"ids", "annotations", "tags"}`` of (B, L) tensors; shuffled
    each epoch from ``seed`` (``shuffle=False``: in order)."""

    def __init__(self, data: TaggingSet, batch_size: int = 32, shuffle: bool = True, seed: int = 0) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TaggingLoader: batch_size must be an int >= 1; got {batch_size!r}")
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            j = order[i:i + self.batch_size]
            yield {"ids": self.data.ids[j], "annotations": self.data.annotations[j], "tags": self.data.tags[j]}
