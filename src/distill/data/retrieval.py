"""Query–passage pairs for retrieval distillation, from real offline text.

Each passage of the Python standard library's docstrings (:func:`distill.data.corpus.stdlib_docstrings`)
becomes one pair: the *query* is its first sentence (the docstring's summary line), the *passage*
the rest of the text. The pairing is real (the summary describes the rest) but not a
relevance-judged collection such as MS MARCO, which is not available offline; the retrieval
benchmark therefore measures how well a student reproduces its *teacher's* ranking.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from distill.data.corpus import Passage, stdlib_docstrings

__all__ = ["QueryPassage", "query_passage_pairs", "split_query"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


@dataclass(frozen=True)
class QueryPassage:
    """One pair: ``query`` (first sentence), ``passage`` (the rest), ``source`` (module:object)."""

    query: str
    passage: str
    source: str


def split_query(text: str) -> tuple[str, str]:
    """``(first sentence, rest)`` of ``text``: the first sentence ends at ``.``/``!``/``?`` followed by
    white space, or at the first blank line; line breaks inside either part become spaces."""
    if not isinstance(text, str):
        raise TypeError(f"split_query needs a str, got {type(text).__name__}")
    parts = _SENTENCE_END.split(text.strip(), maxsplit=1)
    head = " ".join(parts[0].split())
    rest = " ".join(parts[1].split()) if len(parts) > 1 else ""
    return head, rest


def query_passage_pairs(passages: Sequence[Passage] | None = None, *, min_query_words: int = 4,
                        min_passage_words: int = 20, limit: int | None = None) -> list[QueryPassage]:
    """Pairs from ``passages`` (default: the whole standard library, :func:`stdlib_docstrings` with
    its default seed), in their order, keeping those whose query has at least ``min_query_words``
    words and whose passage at least ``min_passage_words``; duplicate queries are kept once.

    Args:
        passages: the source passages (``Passage(source, text)``).
        min_query_words: shortest query kept (words, >= 1).
        min_passage_words: shortest passage kept (words, >= 1).
        limit: stop after this many pairs (``None``: all).
    """
    for name, v in (("min_query_words", min_query_words), ("min_passage_words", min_passage_words)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"query_passage_pairs {name} must be an int >= 1, got {v!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"query_passage_pairs limit must be an int >= 1 or None, got {limit!r}")
    if passages is None:
        passages = stdlib_docstrings()
    out: list[QueryPassage] = []
    seen: set[str] = set()
    for p in passages:
        q, rest = split_query(p.text)
        if len(q.split()) < min_query_words or len(rest.split()) < min_passage_words or q.lower() in seen:
            continue
        seen.add(q.lower())
        out.append(QueryPassage(q, rest, p.source))
        if limit is not None and len(out) >= limit:
            break
    return out
