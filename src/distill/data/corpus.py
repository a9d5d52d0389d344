"""An offline text corpus: the installed Python standard library's own documentation.

Every Python ships it, it is real English prose about code, and the same Python (version and
build) gives the same passages. :func:`stdlib_docstrings` reads it, :func:`corpus_fingerprint`
identifies what was read (with the Python that read it), :func:`split_passages` holds out whole
packages so no package's documentation is in both splits.

The walk imports many modules, so by default it runs in a fresh, isolated interpreter
(``python -I -S`` running this file): nothing the caller's process has imported or patched can
change what it reads (Hugging Face's ``transformers`` adds methods to ``logging.Logger``, for one),
and nothing a module does on import reaches the caller. This module imports only the standard
library, which is what lets it run there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SKIPPED_MODULES", "Passage", "corpus_fingerprint", "split_passages", "stdlib_docstrings"]

# Modules never imported by the corpus walk: side effects on import (a browser, printing, a GUI, a
# grammar cache written into the library), test suites, and interactive-terminal modules. Names
# starting with "_" (private), "xx" (CPython's example extensions) and any "__main__" submodule
# (it runs a program when imported) are skipped too.
SKIPPED_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "readline",
    "ensurepip", "venv", "pydoc_data", "msilib", "winreg", "winsound", "msvcrt", "nturl2path", "_msi",
})
_TEST_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})



@dataclass(frozen=True)
class Passage:
    """One passage of text.

    Attributes:
        source: where it comes from, ``"module:qualified.name"`` (``"json.decoder:JSONDecoder.decode"``;
            ``"json"`` alone for a module's own docstring), with ``"#k"`` appended for the k-th part
            (k ≥ 2) of a docstring longer than ``max_chars``.
        text: the cleaned text.
    """

    source: str
    text: str

    @property
    def module(self) -> str:
        """The module the text documents (``"json.decoder"``)."""
        return self.source.partition(":")[0].partition("#")[0]

    @property
    def package(self) -> str:
        """The top-level package (``"json"``): the unit :func:`split_passages` keeps whole."""
        return self.module.split(".")[0]


def _skipped(name: str) -> bool:
    parts = name.split(".")
    return (parts[0] in SKIPPED_MODULES or parts[0].startswith("xx")
            or any(p.startswith("_") or p in _TEST_PARTS or p.startswith("test_") for p in parts))


def _quiet_import(name: str) -> Any | None:
    """Import ``name`` with its output and warnings swallowed; ``None`` if it fails in any way."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException as e:  # noqa: BLE001 - a module may raise anything (SystemExit included) on import
        if isinstance(e, KeyboardInterrupt):
            raise
        return None


def _module_names(roots: Sequence[str], submodules: bool) -> list[str]:
    """``roots`` and (with ``submodules``) every submodule of the packages among them, sorted,
    without the skipped ones."""
    found: set[str] = set()
    stack = sorted({r for r in roots if not _skipped(r)}, reverse=True)
    while stack:
        name = stack.pop()
        if name in found:
            continue
        module = _quiet_import(name)
        if module is None:
            continue
        found.add(name)
        path = getattr(module, "__path__", None)
        if submodules and path is not None:
            children = sorted(f"{name}.{info.name}" for info in pkgutil.iter_modules(list(path)))
            stack.extend(c for c in reversed(children) if not _skipped(c))
    return sorted(found)


def _clean(doc: str) -> str:
    """Dedented (``inspect.cleandoc``), tabs expanded, trailing spaces removed, runs of blank lines
    collapsed to one, stripped. Line breaks inside paragraphs are kept (code examples need them)."""
    text = inspect.cleandoc(doc).expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _chunks(text: str, max_chars: int) -> list[str]:
    """``text`` cut into parts of at most ``max_chars`` characters.

    Whole paragraphs are packed greedily; a paragraph that introduces the next (it ends with ``:``,
    as a reST ``Example::`` does) stays with it when both fit. A paragraph longer than ``max_chars``
    is cut at a line break in its second half before the limit, else at its last space, else hard.
    Each part is dedented (a part may start inside an indented code example).
    """
    pieces: list[str] = []
    for para in text.split("\n\n"):
        while len(para) > max_chars:
            nl, sp = para.rfind("\n", 0, max_chars + 1), para.rfind(" ", 0, max_chars + 1)
            cut = nl if nl > max_chars // 2 else max(nl, sp)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut].rstrip())
            para = para[cut:].lstrip("\n") if cut == nl else para[cut:].lstrip(" ")
        if para.strip():
            pieces.append(para)
    glued: list[str] = []
    for piece in pieces:
        if glued and glued[-1].endswith(":") and len(glued[-1]) + 2 + len(piece) <= max_chars:
            glued[-1] += "\n\n" + piece
        else:
            glued.append(piece)
    parts: list[str] = []
    for piece in glued:
        if parts and len(parts[-1]) + 2 + len(piece) <= max_chars:
            parts[-1] += "\n\n" + piece
        else:
            parts.append(piece)
    return [textwrap.dedent(part).strip("\n") for part in parts]


def _documented(module: Any) -> Iterator[tuple[str, str]]:
    """``(qualified name, own docstring)`` of the module and of the classes and functions it defines
    (not those it imports), and of the methods, properties and nested classes those classes define
    themselves (inherited docstrings are not repeated)."""
    name = module.__name__
    if isinstance(module.__doc__, str):
        yield "", module.__doc__

    def members(owner: Any, prefix: str, depth: int) -> Iterator[tuple[str, str]]:
        try:
            items = sorted(vars(owner).items(), key=lambda kv: str(kv[0]))
        except TypeError:
            return
        for attr, obj in items:
            if not isinstance(attr, str) or (attr.startswith("_") and attr != "__init__"):
                continue
            raw = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
            if inspect.isclass(raw):
                if getattr(raw, "__module__", None) != name:
                    continue  # imported from elsewhere: documented under its own module
                doc = vars(raw).get("__doc__")  # its own, never a base class's
            elif inspect.isroutine(raw):
                if getattr(raw, "__module__", None) not in ((name,) if depth == 0 else (name, None)):
                    continue  # imported, or patched in from another package (C methods have no __module__)
                doc = getattr(raw, "__doc__", None)
            elif isinstance(raw, property) and depth > 0:
                doc = raw.__doc__
            else:
                continue
            qual = f"{prefix}{attr}"
            if isinstance(doc, str):
                yield qual, doc
            if inspect.isclass(raw) and depth < 2:
                yield from members(raw, qual + ".", depth + 1)

    yield from members(module, "", 0)


def _walk(roots: Sequence[str], submodules: bool, min_chars: int, max_chars: int,
          strict: bool) -> list[tuple[str, str]]:
    """``(source, text)`` of every passage of the modules ``roots`` (and their submodules), sorted by
    source, each text once (its first source)."""
    names = _module_names(roots, submodules)
    if strict:
        missing = [m for m in roots if m not in names]
        if missing:
            raise ValueError(f"stdlib_docstrings could not import {missing}")
    found: list[tuple[str, str]] = []
    for name in names:
        for qual, doc in _documented(sys.modules[name]):
            source = f"{name}:{qual}" if qual else name
            for k, part in enumerate(_chunks(_clean(doc), max_chars), start=1):
                if len(part) >= min_chars:
                    found.append((source if k == 1 else f"{source}#{k}", part))
    found.sort()
    seen: set[str] = set()
    out = []
    for source, text in found:
        if text not in seen:
            seen.add(text)
            out.append((source, text))
    return out


def _walk_isolated(roots: Sequence[str], submodules: bool, min_chars: int, max_chars: int,
                   strict: bool) -> list[tuple[str, str]]:
    """:func:`_walk` in a fresh ``python -I -S`` running this file; the result comes back as JSON."""
    with tempfile.TemporaryDirectory(prefix="distill-corpus-") as tmp:
        out = os.path.join(tmp, "passages.json")
        request = json.dumps({"roots": list(roots), "submodules": submodules, "min_chars": min_chars,
                              "max_chars": max_chars, "strict": strict})
        proc = subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__), request, out],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, cwd=tmp)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or ["(no error output)"]
            raise (ValueError if "ValueError" in last[0] else RuntimeError)(
                f"stdlib_docstrings: the isolated corpus walk failed (exit code {proc.returncode}): {last[0]}")
        with open(out, encoding="utf-8") as f:
            return [(s, t) for s, t in json.load(f)]


def stdlib_docstrings(min_chars: int = 200, max_chars: int = 2000, seed: int | None = 0, *,
                      modules: Sequence[str] | None = None, submodules: bool = True,
                      isolated: bool = True) -> list[Passage]:
    """Passages of the installed Python standard library's documentation, read offline.

    The walk imports each module (output and warnings swallowed; a module that fails to import is
    skipped, as are :data:`SKIPPED_MODULES`, private ``_names``, test packages and ``__main__``
    submodules) and reads the *own* docstrings (``__doc__``, cleaned as :func:`inspect.getdoc`
    cleans them, but never inherited from a base class) of the module, of the classes and functions
    it defines (not those it imports), and of their methods, properties and nested classes. Each
    text is cleaned (dedented, tabs expanded, trailing spaces and runs of blank lines removed; line
    breaks kept, code examples need them), cut at paragraph boundaries into parts of at most
    ``max_chars`` characters, and parts shorter than ``min_chars`` are dropped. A text met twice is
    kept once (under its first source in sorted order).

    The same Python (version and build) gives the same passages: the walk runs in a fresh isolated
    interpreter (``isolated=True``), the sources are sorted, then put in a fixed pseudo-random
    order drawn from ``seed`` (``None``: sorted order). Record :func:`corpus_fingerprint` of the
    result beside anything trained on it. The whole standard library takes about a second.

    Args:
        min_chars: shortest passage kept (characters, ≥ 1).
        max_chars: longest passage (characters, ≥ ``min_chars``); longer docstrings are split.
        seed: the order of the returned list (``None``: sorted by source).
        modules: the modules to walk (default: ``sys.stdlib_module_names``); tests pass a couple,
            e.g. ``["json", "textwrap"]``. Each must import.
        submodules: also walk every submodule of the packages among ``modules``.
        isolated: walk in a fresh ``python -I -S`` (``False``: in this process, which then imports
            every module walked, and whose patches of the standard library, if any, show).

    Returns:
        The passages, deduplicated, in the order described above.
    """
    for label, value in (("min_chars", min_chars), ("max_chars", max_chars)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"stdlib_docstrings {label} must be an int >= 1; got {value!r}")
    if max_chars < min_chars:
        raise ValueError(f"stdlib_docstrings needs max_chars >= min_chars; got max_chars={max_chars}, "
                         f"min_chars={min_chars}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"stdlib_docstrings seed must be an int or None; got {seed!r}")
    if modules is None:
        roots = sorted(sys.stdlib_module_names)
    else:
        if isinstance(modules, str) or not all(isinstance(m, str) and m for m in modules):
            raise TypeError(f"stdlib_docstrings modules must be a list of module names; got {modules!r}")
        roots = list(modules)
        skipped = [m for m in roots if _skipped(m)]
        if skipped:
            raise ValueError(f"stdlib_docstrings will not import {skipped}: they have side effects on import, are "
                             f"private or are test suites (see distill.data.corpus.SKIPPED_MODULES)")
        outside = [m for m in roots if m.split(".")[0] not in sys.stdlib_module_names]
        if outside:
            raise ValueError(f"stdlib_docstrings reads the standard library only; {outside} are not part of it")
    walk = _walk_isolated if isolated else _walk
    passages = [Passage(s, t) for s, t in walk(roots, submodules, min_chars, max_chars, modules is not None)]
    if seed is not None:
        random.Random(seed).shuffle(passages)
    return passages


def corpus_fingerprint(passages: Sequence[Passage]) -> dict[str, Any]:
    """What identifies a corpus of passages: the Python that produced it (``sys.version``,
    implementation) and a sha256 of the sources and texts in order, with their count.

    Two runs of :func:`stdlib_docstrings` under the same Python (version and build) give equal
    fingerprints; a different Python may give other passages, and the fingerprint says which one
    made these."""
    h = hashlib.sha256()
    for p in passages:
        h.update(json.dumps([p.source, p.text]).encode("utf-8"))
        h.update(b"\n")
    return {
        "python": sys.version,
        "implementation": sys.implementation.name,
        "passages": len(passages),
        "sha256": h.hexdigest(),
    }


def split_passages(passages: Sequence[Passage], held_out: float = 0.1,
                   seed: int = 0) -> tuple[list[Passage], list[Passage]]:
    """``(train, held_out)`` split by top-level package, so no package is in both parts.

    The packages (sorted, then shuffled with ``seed``) go to the held-out part one by one while it
    holds fewer than ``held_out × len(passages)`` passages; both parts keep the input order.

    Raises:
        ValueError: ``held_out`` outside (0, 1), or fewer than two packages (nothing to split).
    """
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0 < held_out < 1:
        raise ValueError(f"split_passages held_out must be a fraction in (0, 1); got {held_out!r}")
    packages = sorted({p.package for p in passages})
    if len(packages) < 2:
        raise ValueError(f"split_passages splits by package and needs passages of at least two packages; got "
                         f"{packages}")
    random.Random(int(seed)).shuffle(packages)
    sizes: dict[str, int] = {}
    for p in passages:
        sizes[p.package] = sizes.get(p.package, 0) + 1
    want = held_out * len(passages)
    held: set[str] = set()
    count = 0
    for pkg in packages[:-1]:  # the last package always stays in training
        if count >= want:
            break
        held.add(pkg)
        count += sizes[pkg]
    return [p for p in passages if p.package not in held], [p for p in passages if p.package in held]


def _main(argv: list[str]) -> None:
    """``python -I -S corpus.py REQUEST_JSON OUT_PATH``: the isolated walk (:func:`_walk_isolated`)."""
    request = json.loads(argv[0])
    found = _walk(request["roots"], request["submodules"], request["min_chars"], request["max_chars"],
                  request["strict"])
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(found, f)


if __name__ == "__main__":
    _main(sys.argv[1:])
