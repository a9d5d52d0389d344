"""One writer per folder: an exclusive lock on a run folder or a teacher cache while it is written.

:class:`RunLock` takes an exclusive, non-blocking ``fcntl.flock`` on ``folder/.lock`` and writes
the holder's pid, start time and purpose into it. A second process asking for the same folder
gets :class:`RunLockedError` at once, naming the folder and the holder's pid, instead of both
writing one ``metrics.jsonl`` or one ``data.bin``. The kernel drops a ``flock`` when its process
dies, so a lock file left behind by a killed run never blocks the next one: only its text is
stale. A clean release removes the file (while still holding the lock; an acquirer that locked a
file just removed this way notices that the path no longer names it and locks the new one), so a
finished run folder holds only its results.

Locks are per open file, not per process: a second :class:`RunLock` on the same folder in the
same process is refused too (its message then names this very process).

On platforms without ``fcntl`` (Windows) the lock is advisory-free: it records the pid and never
refuses. This module is the bottom layer: it imports nothing from ``distill``.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process (or another part of this one) is writing the folder.

    ``folder`` is the locked folder, ``pid`` the holder's process id as it wrote it (``None`` when
    it could not be read).
    """

    def __init__(self, message: str, folder: str | os.PathLike[str] | None = None, pid: int | None = None) -> None:
        super().__init__(message)
        self.folder = Path(folder) if folder is not None else None
        self.pid = pid


class RunLock:
    """Exclusive lock on ``folder`` (created if missing) for as long as the ``with`` block runs.

    Args:
        folder: the run folder or cache folder to lock.
        what: what is being written, recorded in the lock file (``"fit"``, ``"recipe tiny_kd"``,
            ``"teacher cache build"``) and shown to a process that finds the folder locked.

    Raises:
        RunLockedError: on entry, when another open lock holds the folder; the message reads
            ``"runs/kd/seed0 is being written by pid 1234 (fit, started 2026-12-06T13:40:00+00:00);
            wait for it or stop it"``.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str = "a run") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        """The lock file, ``folder/.lock``."""
        return self.folder / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (see the class); returns ``self``."""
        if self._fd is not None:
            raise RuntimeError(f"the lock on {self.folder} is already held by this RunLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    pid, text = _read_holder(fd)
                    os.close(fd)
                    raise RunLockedError(
                        f"{self.folder} is being written by {text}; wait for it or stop it "
                        f"(the lock is {self.path}, released when that process ends)", self.folder, pid) from None
            try:  # the holder may have released and removed the file between our open and our lock
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:  # pragma: no cover - a folder whose lock file is replaced a hundred times in a row
            raise RunLockedError(f"could not lock {self.folder}: its lock file keeps changing", self.folder)
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self.what}\n{started}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and remove its file; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink()  # still locked: nobody else holds this file
        except OSError:  # pragma: no cover - a vanished folder: the lock still goes
            pass
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # a lock object dropped without release (an abandoned generator)
        if self._fd is not None:
            self.release()


def _read_holder(fd: int) -> tuple[int | None, str]:
    """The pid and a description of the lock's holder, from what it wrote into the file."""
    try:
        lines = os.pread(fd, 4096, 0).decode(errors="replace").splitlines()
    except OSError:  # pragma: no cover
        lines = []
    try:
        pid: int | None = int(lines[0])
    except (IndexError, ValueError):
        return None, "another process (its pid was not written yet)"
    details = ", ".join(x for x in (lines[1] if len(lines) > 1 else "",
                                    f"started {lines[2]}" if len(lines) > 2 else "") if x)
    return pid, f"pid {pid}" + (f" ({details})" if details else "")
