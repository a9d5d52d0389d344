"""Tang et al.'s text augmentation for distillation: masking, same-class word replacement and n-gram
sampling, producing unlabelled sentences for the teacher to label.

Tang, Lu, Liu, Mou, Vechtomova, Lin, "Distilling Task-Specific Knowledge from BERT into Simple
Neural Networks", 2019, arXiv 1903.12136, §3.3 (data augmentation for distillation).

Pure functions of their inputs and a seed: the same texts, seed and parameters give the same
sentences on every machine (``random.Random``, no global state).

The paper replaces a word by another of the same part-of-speech tag, drawn from the training
set's unigram distribution of that tag (it tags with a POS tagger). No tagger is available
offline here, so :func:`word_class` stands in for one: a small closed-class lexicon (determiners,
pronouns, prepositions, conjunctions, auxiliaries and modals, particles, wh-words) for function
words, and for open-class words a class from the word's form (number, punctuation, code
identifier, capitalised word, and suffix classes: -ly, -ing, -ed, -s, nominal suffixes, other).
Replacements are drawn from the unigram counts of the words seen in that class in the corpus, as
the paper draws from the tag's unigram distribution.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CLOSED_CLASSES",
    "MASK_TOKEN",
    "WordClassLexicon",
    "augment_texts",
    "augment_words",
    "split_words",
    "word_class",
]

MASK_TOKEN = "[MASK]"

# closed-class English function words, by a coarse part-of-speech class
CLOSED_CLASSES: dict[str, frozenset[str]] = {
    "DET": frozenset("a an the this that these those each every some any no all both either neither another "
                     "such what whatever which whichever".split()),
    "PRON": frozenset("i you he she it we they me him her us them my your his its our their mine yours hers ours "
                      "theirs myself yourself himself herself itself ourselves themselves one someone anyone "
                      "something anything nothing everything".split()),
    "ADP": frozenset("of in on at by for with from to into onto upon over under about above below across after "
                     "before between through during without within along among around against behind beyond "
                     "via per than like".split()),
    "CONJ": frozenset("and or but nor so yet if unless because although though while whereas whether since "
                      "until once".split()),
    "AUX": frozenset("is are was were be been being am has have had having do does did done can could may might "
                     "must shall should will would".split()),
    "PART": frozenset("not to as also only just then there here".split()),
    "WH": frozenset("who whom whose when where why how".split()),
}
_CLOSED = {w: c for c, words in CLOSED_CLASSES.items() for w in words}
_WORDS = re.compile(r"\w+|[^\w\s]")
_NOMINAL = ("tion", "sion", "ment", "ness", "ity", "ance", "ence", "ship", "ism")


def split_words(text: str) -> list[str]:
    """``text`` → words and punctuation marks (``"Return x, y."`` → ``["Return", "x", ",", "y", "."]``);
    ``[MASK]`` stays one token."""
    if not isinstance(text, str):
        raise TypeError(f"split_words needs a str, got {type(text).__name__}")
    out: list[str] = []
    for part in text.split(MASK_TOKEN):
        if out or part:
            out.extend(_WORDS.findall(part))
        out.append(MASK_TOKEN)
    return out[:-1]


def word_class(word: str) -> str:
    """A coarse part-of-speech class of ``word`` without a tagger (see the module docstring).

    Closed-class words get their class (``"DET"``, ``"PRON"``, ``"ADP"``, ``"CONJ"``, ``"AUX"``,
    ``"PART"``, ``"WH"``, case-insensitive); otherwise, by form: ``"MASK"``, ``"NUM"`` (digits),
    ``"PUNCT"``, ``"IDENT"`` (code: an underscore, inner capital or digit mixed with letters),
    ``"PROPN"`` (capitalised), ``"ADV"`` (-ly), ``"VBG"`` (-ing), ``"VBD"`` (-ed), ``"NOUN"``
    (nominal suffixes), ``"PLURAL"`` (-s), else ``"WORD"``.
    """
    if word == MASK_TOKEN:
        return "MASK"
    low = word.lower()
    if low in _CLOSED:
        return _CLOSED[low]
    if word.isdigit():
        return "NUM"
    if not any(ch.isalnum() for ch in word):
        return "PUNCT"
    if "_" in word or any(ch.isupper() for ch in word[1:]) or (any(ch.isdigit() for ch in word)
                                                               and any(ch.isalpha() for ch in word)):
        return "IDENT"
    if word[0].isupper():
        return "PROPN"
    for suffix, cls in (("ly", "ADV"), ("ing", "VBG"), ("ed", "VBD")):
        if low.endswith(suffix) and len(low) > len(suffix) + 2:
            return cls
    if low.endswith(_NOMINAL):
        return "NOUN"
    if low.endswith("s") and not low.endswith("ss") and len(low) > 3:
        return "PLURAL"
    return "WORD"


@dataclass(frozen=True)
class WordClassLexicon:
    """The unigram distribution of the words of each class in a corpus.

    Attributes:
        words: class → the words seen in it (sorted, so the lexicon does not depend on the
            corpus order).
        counts: class → the count of each of those words, aligned with ``words``.
    """

    words: dict[str, tuple[str, ...]]
    counts: dict[str, tuple[int, ...]]

    @classmethod
    def from_texts(cls, texts: Iterable[str | Sequence[str]]) -> WordClassLexicon:
        """Count the words of ``texts`` (strings, split by :func:`split_words`, or word lists) by class."""
        by_class: dict[str, Counter[str]] = {}
        for text in texts:
            for w in (split_words(text) if isinstance(text, str) else text):
                if w != MASK_TOKEN:
                    by_class.setdefault(word_class(w), Counter())[w] += 1
        words = {c: tuple(sorted(cnt)) for c, cnt in sorted(by_class.items())}
        counts = {c: tuple(by_class[c][w] for w in ws) for c, ws in words.items()}
        return cls(words, counts)

    def sample(self, cls_name: str, rng: random.Random) -> str | None:
        """A word of class ``cls_name`` drawn by its corpus count; ``None`` when the class is unseen."""
        words = self.words.get(cls_name)
        if not words:
            return None
        return rng.choices(words, weights=self.counts[cls_name], k=1)[0]


def _probability(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def augment_words(words: Sequence[str], rng: random.Random, lexicon: WordClassLexicon, p_mask: float = 0.1,
                  p_pos: float = 0.1, p_ng: float = 0.25, max_n: int = 5, mask_token: str = MASK_TOKEN) -> list[str]:
    """One synthetic sentence from ``words`` (the paper's §3.3 procedure).

    For each word i draw X_i ~ U[0, 1]: X_i < p_mask → ``mask_token``; p_mask ≤ X_i < p_mask + p_pos →
    a word of the same class drawn from ``lexicon`` (kept when the class is unseen); else kept.
    Then, with probability ``p_ng``, keep only a random n-gram of the result: n ~ U{1, …, max_n},
    start uniform over the positions where an n-gram fits (the whole sentence when it is shorter).
    """
    p_mask, p_pos, p_ng = (_probability(v, n) for v, n in ((p_mask, "p_mask"), (p_pos, "p_pos"), (p_ng, "p_ng")))
    if p_mask + p_pos > 1.0:
        raise ValueError(f"p_mask + p_pos must be <= 1 (one draw decides per word), got {p_mask} + {p_pos}")
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be an int >= 1, got {max_n!r}")
    out: list[str] = []
    for w in words:
        x = rng.random()
        if x < p_mask:
            out.append(mask_token)
        elif x < p_mask + p_pos:
            out.append(lexicon.sample(word_class(w), rng) or w)
        else:
            out.append(w)
    if out and rng.random() < p_ng:
        n = rng.randint(1, max_n)
        if n < len(out):
            start = rng.randrange(len(out) - n + 1)
            out = out[start:start + n]
    return out


def augment_texts(texts: Sequence[str], n_iter: int = 20, seed: int = 0, p_mask: float = 0.1, p_pos: float = 0.1,
                  p_ng: float = 0.25, max_n: int = 5, lexicon: WordClassLexicon | None = None,
                  mask_token: str = MASK_TOKEN) -> list[tuple[int, str]]:
    """Up to ``n_iter`` synthetic sentences per text, duplicates discarded: ``[(source index, text)]``.

    Each text is split (:func:`split_words`) and :func:`augment_words` runs ``n_iter`` times on it;
    a result equal to the original or to an earlier result of the same text is dropped. Words are
    re-joined with single spaces. ``lexicon`` defaults to the one of ``texts`` (the paper's
    training-set unigram distribution). Returns the pairs in text order. The synthetic sentences are
    unlabelled: the teacher labels them (its logits are the distillation target).

    Defaults are the paper's (§4.2): p_mask = p_pos = 0.1, p_ng = 0.25, n-grams of n ≤ 5, and
    n_iter = 20 (its single-sentence setting; it uses 10 for the sentence-pair tasks).
    """
    if isinstance(texts, str):
        raise TypeError("augment_texts needs a sequence of texts, got one str")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    split = [split_words(t) for t in texts]
    lexicon = WordClassLexicon.from_texts(split) if lexicon is None else lexicon
    rng = random.Random(seed)
    out: list[tuple[int, str]] = []
    for i, words in enumerate(split):
        seen = {" ".join(words)}
        for _ in range(n_iter):
            new = " ".join(augment_words(words, rng, lexicon, p_mask, p_pos, p_ng, max_n, mask_token))
            if new and new not in seen:
                seen.add(new)
                out.append((i, new))
    return out
