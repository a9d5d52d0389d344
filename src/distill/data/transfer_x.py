"""Offline data for three transfer papers: a synthetic parallel corpus, zero-shot attributes, a long-tailed split.

* :func:`cipher_translate`: a deterministic "second language" for the standard library's
  docstrings (:func:`distill.data.corpus.stdlib_docstrings`), so that each docstring and its
  "translation" form a parallel pair (cross-lingual distillation, Xu & Yang, ACL 2017,
  arXiv 1705.02073). It is a keyed word-substitution cipher with synonyms, reversed word order and
  dropped words: the target side shares *no* token with the source side, its word order differs
  and it loses words, but it is a word-for-word re-encoding, not a real language. What it does
  not test: morphology, idioms, words with no one-to-one counterpart, or a translation's domain
  shift beyond the dropped words.
* :func:`package_topics`: document classes from each docstring's top-level package.
* :func:`words`, :func:`build_vocab`, :func:`encode`: word tokens to padded id tensors ``(N, L)``.
* :data:`FASHION_ATTRIBUTES`: hand-written binary attribute vectors of the ten Fashion-MNIST classes
  with a seen/unseen split (:data:`FASHION_UNSEEN`) for zero-shot learning (MSDN, arXiv 2203.03137).
* :func:`long_tailed_indices`: an exponentially long-tailed subset of a balanced set (KDDAug's
  biased-training stand-in, arXiv 2207.08739).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "FASHION_ATTRIBUTES",
    "FASHION_ATTRIBUTE_NAMES",
    "FASHION_CLASSES",
    "FASHION_UNSEEN",
    "build_vocab",
    "docstring_parallel_task",
    "cipher_translate",
    "encode",
    "long_tailed_indices",
    "package_topics",
    "words",
]

_WORD = re.compile(r"[a-z]+")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def words(text: str) -> list[str]:
    """The lower-case alphabetic words of ``text`` (digits and punctuation dropped)."""
    return _WORD.findall(text.lower())


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def _pseudo_word(word: str, key: int, variant: int) -> str:
    h = _digest(key, word, variant)
    n = 2 + h % 3  # 2-4 syllables
    out = []
    for _ in range(n):
        h //= 7
        out.append(_CONSONANTS[h % len(_CONSONANTS)])
        h //= len(_CONSONANTS)
        out.append(_VOWELS[h % len(_VOWELS)])
    return "".join(out)


def cipher_translate(text: str, *, key: int = 17, synonym_rate: float = 0.2, drop_rate: float = 0.1,
                     seed: int = 0) -> str:
    """The "target-language" side of ``text``: every word re-encoded, clauses reversed, some words lost.

    Each source word gets a pseudo-word drawn from a keyed hash (consonant-vowel syllables); a
    ``synonym_rate`` share of the vocabulary has two target words, chosen per occurrence; each
    sentence's word order is reversed (a head-final order); each occurrence is dropped with
    probability ``drop_rate``. Deterministic given ``key`` and ``seed`` (the occurrence-level draws).
    """
    if not 0.0 <= synonym_rate <= 1.0 or not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"synonym_rate must be in [0, 1] and drop_rate in [0, 1); got {synonym_rate}, {drop_rate}")
    rng = random.Random(_digest(seed, text))
    sentences = []
    for sentence in re.split(r"[.!?\n]+", text):
        out = []
        for w in words(sentence):
            if rng.random() < drop_rate:
                continue
            two = (_digest(key, "syn", w) % 1000) < synonym_rate * 1000
            out.append(_pseudo_word(w, key, rng.randrange(2) if two else 0))
        if out:
            sentences.append(" ".join(reversed(out)))
    return " . ".join(sentences)


def package_topics(packages: Sequence[str], num_classes: int) -> tuple[list[int], list[str]]:
    """Class labels from top-level package names: the ``num_classes`` most frequent packages are the
    classes (ties broken by name), every other document gets -1. Returns ``(labels, class_names)``."""
    counts = Counter(packages)
    if num_classes < 2 or num_classes > len(counts):
        raise ValueError(f"num_classes must be in [2, {len(counts)}] (the distinct packages); got {num_classes}")
    names = [p for p, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_classes]]
    index = {p: i for i, p in enumerate(names)}
    return [index.get(p, -1) for p in packages], names


def build_vocab(texts: Sequence[str], min_count: int = 2, max_size: int = 20000) -> dict[str, int]:
    """A word vocabulary: ``"<pad>"`` = 0, ``"<unk>"`` = 1, then words seen at least ``min_count`` times,
    most frequent first (ties by the word), at most ``max_size`` entries in all."""
    counts = Counter(w for t in texts for w in t.split() if _WORD.fullmatch(w))
    kept = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
    return {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(kept[:max_size - 2])}}


def encode(texts: Sequence[str], vocab: dict[str, int], max_len: int = 64) -> Tensor:
    """Word ids ``(N, max_len)`` (long): the first ``max_len`` words, unknown words 1, padded with 0."""
    out = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [vocab.get(w, 1) for w in t.split() if _WORD.fullmatch(w)][:max_len]
        if ids:
            out[i, :len(ids)] = torch.tensor(ids)
    return out


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_ATTRIBUTE_NAMES = ("worn_on_torso", "worn_on_legs", "worn_on_feet", "has_sleeves", "long_sleeves",
                           "front_opening", "long_garment", "closed_toe", "covers_ankle", "straps",
                           "carried", "collar", "low_profile", "boxy_shape")
# rows: classes in Fashion-MNIST's order; columns: FASHION_ATTRIBUTE_NAMES (1 = has it)
_ROWS = {
    "T-shirt/top": ("worn_on_torso", "has_sleeves"),
    "Trouser": ("worn_on_legs", "long_garment"),
    "Pullover": ("worn_on_torso", "has_sleeves", "long_sleeves"),
    "Dress": ("worn_on_torso", "worn_on_legs", "long_garment"),
    "Coat": ("worn_on_torso", "has_sleeves", "long_sleeves", "front_opening", "long_garment", "collar"),
    "Sandal": ("worn_on_feet", "straps", "low_profile"),
    "Shirt": ("worn_on_torso", "has_sleeves", "long_sleeves", "front_opening", "collar"),
    "Sneaker": ("worn_on_feet", "closed_toe", "low_profile"),
    "Bag": ("straps", "carried", "boxy_shape"),
    "Ankle boot": ("worn_on_feet", "closed_toe", "covers_ankle"),
}
FASHION_ATTRIBUTES = torch.tensor([[float(a in _ROWS[c]) for a in FASHION_ATTRIBUTE_NAMES] for c in FASHION_CLASSES])
"""``(10, 14)`` binary attributes of the Fashion-MNIST classes (hand-written for this library)."""
FASHION_UNSEEN = (2, 3, 7)
"""Unseen classes of the zero-shot split: Pullover, Dress, Sneaker. Each is a combination of attributes
that seen classes carry (Pullover = a Shirt without opening or collar; Dress = torso + legs + long;
Sneaker = feet + closed toe + low profile)."""


def long_tailed_indices(targets: Tensor, *, max_per_class: int, imbalance: float, seed: int = 0,
                        order: Sequence[int] | None = None) -> Tensor:
    """Indices of an exponentially long-tailed subset: class ``order[r]`` keeps
    ``round(max_per_class * imbalance ** (-r / (K - 1)))`` samples (drawn from ``seed``), so the head class
    has ``max_per_class`` and the tail ``max_per_class / imbalance``. ``targets`` ``(N,)``."""
    classes = sorted(int(c) for c in targets.unique())
    order = list(classes if order is None else order)
    if sorted(order) != classes or imbalance < 1 or max_per_class < 1:
        raise ValueError(f"order must permute the classes {classes}, imbalance be >= 1 and max_per_class >= 1; "
                         f"got {order}, {imbalance}, {max_per_class}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for r, c in enumerate(order):
        n = max(1, round(max_per_class * imbalance ** (-r / max(1, len(order) - 1))))
        idx = (targets == c).nonzero().flatten()
        if n > len(idx):
            raise ValueError(f"class {c} has {len(idx)} samples, fewer than the {n} asked for")
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(keep).sort().values


def docstring_parallel_task(num_classes: int = 8, *, n_source: int = 400, n_parallel: int = 700,
                            n_test: int = 400, few_per_class: int = 5, max_len: int = 64, key: int = 17,
                            seed: int = 0, min_chars: int = 40, modules: Sequence[str] | None = None
                            ) -> dict[str, object]:
    """A cross-lingual text-classification task built offline from the standard library's docstrings.

    Documents: :func:`~distill.data.corpus.stdlib_docstrings` passages (at least ``min_chars`` characters) of the ``num_classes`` largest
    top-level packages (:func:`package_topics`), shuffled by ``seed`` and cut into disjoint parts:
    ``n_source`` labelled source-language documents (English), ``n_parallel`` parallel pairs (English,
    :func:`cipher_translate`) with no labels, ``n_test`` target-language test documents, and
    ``few_per_class`` labelled target-language documents per class for the few-label baseline (taken
    from the parallel part's target side). Source and target vocabularies are built on the text each
    side may see in training (source: labelled + parallel source side; target: parallel target side).

    Returns a dict: ``source_x`` ``(n_source, L)``, ``source_y`` ``(n_source,)``, ``parallel_source``
    ``(n_parallel, L)``, ``parallel_target`` ``(n_parallel, L)``, ``parallel_y`` (the parallel documents'
    true classes, for analysis only), ``test_x`` ``(n_test, L)``, ``test_y``, ``few_x``, ``few_y``,
    ``classes`` (package names), ``source_vocab``, ``target_vocab`` (sizes), ``example`` (one pair of texts).
    """
    from distill.data.corpus import stdlib_docstrings

    passages = stdlib_docstrings(min_chars=min_chars, seed=None, modules=modules)
    labels, classes = package_topics([p.package for p in passages], num_classes)
    docs = [(p.text, y) for p, y in zip(passages, labels) if y >= 0]
    random.Random(seed).shuffle(docs)
    need = n_source + n_parallel + n_test
    if len(docs) < need:
        raise ValueError(f"the {num_classes} largest packages have {len(docs)} passages; {need} were asked for")
    src_docs, par_docs, test_docs = docs[:n_source], docs[n_source:n_source + n_parallel], docs[n_source + n_parallel:need]
    src_text = [" ".join(words(t)) for t, _ in src_docs]
    par_src = [" ".join(words(t)) for t, _ in par_docs]
    par_tgt = [cipher_translate(t, key=key, seed=seed) for t, _ in par_docs]
    test_tgt = [cipher_translate(t, key=key, seed=seed + 1) for t, _ in test_docs]
    sv, tv = build_vocab(src_text + par_src), build_vocab(par_tgt)
    par_y = torch.tensor([y for _, y in par_docs])
    few = torch.cat([(par_y == c).nonzero().flatten()[:few_per_class] for c in range(num_classes)])
    par_t = encode(par_tgt, tv, max_len)
    return {"source_x": encode(src_text, sv, max_len), "source_y": torch.tensor([y for _, y in src_docs]),
            "parallel_source": encode(par_src, sv, max_len), "parallel_target": par_t, "parallel_y": par_y,
            "test_x": encode(test_tgt, tv, max_len), "test_y": torch.tensor([y for _, y in test_docs]),
            "few_x": par_t[few], "few_y": par_y[few], "classes": classes, "source_vocab": len(sv),
            "target_vocab": len(tv), "example": (par_docs[0][0][:200], par_tgt[0][:200])}
