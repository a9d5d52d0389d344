"""Files a run writes, whole or not at all; files it reads, with errors that name them.

Every file of a run folder (checkpoints, ``summary.json``, ``recipe.yaml``, ``report.md``, the
teacher cache's manifest...) is written by :func:`atomic_write` and its ``_bytes``/``_text``/
``_json`` forms: the content goes to a temporary file in the same folder,
``<name>.<pid>-<random>.tmp``, which is flushed and ``fsync``-ed, then renamed over the target
(``os.replace``, atomic on POSIX and Windows) and the folder is ``fsync``-ed so the rename
itself survives a power cut. A reader sees the old file or the new one, never half of one.

A process killed mid-write leaves its temporary file behind. :func:`clean_stale_tmp` removes the
ones whose writer is gone (the pid in the name is not a live process) or that are older than a
day; every atomic write first cleans the stale temporaries of its own target.

:func:`read_json` and :func:`safe_unpickle` read what others may have written or damaged: a JSON
error names the file (a truncated ``summary.json`` is not an anonymous "Unterminated string"),
and a pickle is read with an unpickler that builds nothing but plain containers and NumPy arrays,
so a crafted file cannot run code.

This module is the bottom layer: it imports nothing from ``distill``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CorruptFileError",
    "UnsafePickleError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "clean_stale_tmp",
    "read_json",
    "safe_unpickle",
    "tmp_path_for",
]

STALE_AGE_S = 24 * 3600.0  # a temporary file this old is stale whoever wrote it (pid reuse, other hosts)
_TMP_RE = re.compile(r"^(?P<name>.+)\.(?P<pid>\d+)(?:-[0-9a-f]{8})?\.tmp$")


class CorruptFileError(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, damaged, unsafe).

    ``path`` is the file; the message names it and says what to do.
    """

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = Path(path)
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (e.g. sent between processes)
        return type(self), (self.path, str(self))


class UnsafePickleError(CorruptFileError):
    """A pickle that asks for a global (a function or class) outside the allowed set; nothing was run.

    ``global_name`` is what it asked for, e.g. ``"posix.system"``.
    """

    def __init__(self, path: str | os.PathLike[str], global_name: str, message: str) -> None:
        self.global_name = global_name
        super().__init__(path, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.global_name, str(self))


# ----------------------------------------------------------------------------------- writing


def tmp_path_for(path: str | os.PathLike[str]) -> Path:
    """The temporary file an atomic write of ``path`` goes through: same folder (so the rename
    stays on one file system), ``<name>.<pid>-<8 hex>.tmp`` (unique per process and call)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder (EINVAL)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary binary file in the same
    folder, which is flushed, ``fsync``-ed and renamed over ``path``; then the folder is ``fsync``-ed.

    The parent folders are created. If ``write`` raises (or the process is interrupted) the
    temporary file is removed and ``path`` keeps its old content. Stale temporaries of ``path``
    left by dead processes are removed first (:func:`clean_stale_tmp`). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent, name=path.name)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`), encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically (:func:`atomic_write`).

    The text is made before the file is touched, so an object that is not JSON-serialisable
    raises ``TypeError`` and leaves ``path`` as it was.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys) + "\n")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no cheap check: leave it to the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def clean_stale_tmp(folder: str | os.PathLike[str], *, name: str | None = None,
                    max_age_s: float = STALE_AGE_S) -> list[Path]:
    """Remove the ``*.tmp`` files of atomic writes in ``folder`` whose writer is gone.

    A temporary file ``<target>.<pid>[-<hex>].tmp`` is stale when no process ``pid`` is alive,
    or when it is older than ``max_age_s`` seconds (a pid may have been reused, or belong to
    another machine sharing the folder). ``name`` restricts the cleaning to the temporaries of
    one target file. Other files are never touched. Returns the removed paths (sorted).
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            stale = not _pid_alive(int(m["pid"])) or now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return sorted(removed)


# ----------------------------------------------------------------------------------- reading


def read_json(path: str | os.PathLike[str], what: str = "JSON file", *,
              remedy: str = "delete it and run again to rewrite it") -> Any:
    """Parse the JSON file ``path``; ``what`` says what it is (``"run summary"``).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        CorruptFileError: the file is not valid UTF-8 JSON (truncated, damaged); the message names
            the file, where the parser stopped, and ``remedy``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        problem = "is empty" if not data.strip() else f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        raise CorruptFileError(path, f"{what} {str(path)!r} {problem}: it is truncated or damaged; {remedy}") from None
    except UnicodeDecodeError as e:
        raise CorruptFileError(path, f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}): it is damaged; "
                                     f"{remedy}") from None


# NumPy's array and scalar reconstruction, under the module names NumPy 1.x (``numpy.core``),
# 2.x (``numpy._core``) and Python 2 pickles use; and the builtins a pickled dict of arrays needs.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_NUMPY_DTYPE_CLASS = re.compile(r"^(?:Bool|U?Int(?:8|16|32|64)|Float(?:16|32|64)|Complex(?:64|128)|Bytes|Str)DType$")
_BUILTIN_GLOBALS = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes",
                                                "bytearray", "int", "float", "complex", "bool")} | {
    ("__builtin__", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int",
                                 "float", "complex", "bool", "unicode", "long")} | {
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2 (NumPy arrays' data): text -> bytes only
}


def _allowed_global(module: str, name: str) -> bool:
    if (module, name) in _NUMPY_GLOBALS or (module, name) in _BUILTIN_GLOBALS:
        return True
    return module == "numpy.dtypes" and bool(_NUMPY_DTYPE_CLASS.match(name))


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only NumPy array/scalar reconstruction and plain builtins; anything else raises."""

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed_global(module, name):
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(pickle.UnpicklingError):
    def __init__(self, global_name: str) -> None:
        self.global_name = global_name
        super().__init__(global_name)


def safe_unpickle(file: str | os.PathLike[str], what: str = "pickle file", *, encoding: str = "ASCII",
                  remedy: str = "replace it with the original file") -> Any:
    """Unpickle ``file`` building only plain containers and scalars (dict, list, tuple, str, bytes,
    int, float, bool, None) and NumPy arrays/scalars of numeric or string dtypes.

    Any other global a pickle names (``os.system``, a class with ``__reduce__``...) is refused
    before it is looked up, so nothing of the file runs. ``encoding`` is pickle's for Python 2
    strings (``"latin1"`` for files holding NumPy data written by Python 2).

    Raises:
        FileNotFoundError: ``file`` does not exist.
        UnsafePickleError: the pickle names a global outside the allowed set; the message names the
            file and the global.
        CorruptFileError: not a pickle, or a truncated one.
    """
    path = Path(file)
    data = path.read_bytes()
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding=encoding).load()
    except _Refused as e:
        raise UnsafePickleError(
            path, e.global_name,
            f"{what} {str(path)!r} refers to {e.global_name}, which is not allowed: a data file may hold only plain "
            f"containers, numbers, strings and NumPy arrays; it was not loaded (nothing of it ran). If the file is "
            f"not the one you meant, {remedy}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, MemoryError) as e:
        raise CorruptFileError(path, f"{what} {str(path)!r} is not a readable pickle ({type(e).__name__}: {e}): "
                                     f"it is truncated or damaged; {remedy}") from None
