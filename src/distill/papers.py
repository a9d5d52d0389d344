"""Where a method, strategy or teacher source comes from: one small record, at the bottom of the
package so that every layer (teacher sources, methods, strategies) can cite its paper."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Paper"]


@dataclass(frozen=True)
class Paper:
    """Where a method comes from."""

    title: str
    authors: str
    year: int
    arxiv: str | None = None
    venue: str | None = None

    def cite(self) -> str:
        where = f", {self.venue}" if self.venue else ""
        arxiv = f", arXiv {self.arxiv}" if self.arxiv else ""
        return f"{self.authors}, \"{self.title}\"{where} {self.year}{arxiv}"
