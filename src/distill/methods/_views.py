"""Helpers every method module shares: reading taps from views and checking tensor shapes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from distill.adapters import ShapeMismatchError
from distill.batch import View


def tap(view: View, path: str, side: str) -> Tensor:
    """``view[path]``; a clear error naming the side and the taps the view has."""
    try:
        return view[path]
    except KeyError:
        raise KeyError(f"the {side} view has no tap {path!r} (available: {sorted(view)})") from None


def tap_pairs(pairs: Sequence[tuple[str, str]], what: str) -> list[tuple[str, str]]:
    """(student_tap, teacher_tap) pairs as strings; at least one."""
    out = [(str(a), str(b)) for a, b in pairs]
    if not out:
        raise ValueError(f"{what} needs at least one (student_tap, teacher_tap) pair")
    return out


def check_batch(s: Tensor, t: Tensor, s_name: str, t_name: str) -> None:
    if s.shape[0] != t.shape[0]:
        raise ShapeMismatchError(f"batch sizes differ: {s_name} {tuple(s.shape)}, {t_name} {tuple(t.shape)}")


def check_maps(s: Tensor, t: Tensor, s_name: str, t_name: str, what: str) -> None:
    """Both tensors are ``(B, C, H, W)`` maps with the same batch size."""
    if s.dim() != 4 or t.dim() != 4:
        raise ShapeMismatchError(
            f"{what} needs (B, C, H, W) feature maps: {s_name} {tuple(s.shape)}, {t_name} {tuple(t.shape)}"
        )
    check_batch(s, t, s_name, t_name)


def module_key(path: str) -> str:
    """A tap path as an ``nn.ModuleDict`` key (no dots)."""
    return path.replace(".", "_")
