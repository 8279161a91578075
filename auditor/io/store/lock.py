"""One writer per store: an exclusive ``flock`` on ``<name>.lock`` beside it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from ...errors import OutputError, StoreError

__all__ = ["StoreBusyError", "StoreLock", "wait_for_writer"]


class StoreBusyError(StoreError):
    """Another process holds the store's lock (it is writing the same file)."""


class StoreLock:
    """An exclusive ``flock`` on ``<name>.lock``, removed on release.

    Non-blocking by default (a second writer is refused); ``wait=True``
    blocks until the holder ends.
    """

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self._fd: int | None = None

    @classmethod
    def beside(cls, target: Path) -> StoreLock:
        """The lock of the store ``target``: ``<name>.lock`` in its folder."""
        return cls(target.with_name(target.name + ".lock"), target)

    def acquire(self, *, wait: bool = False) -> None:
        for _ in range(5):
            try:  # never through a symbolic link planted in its place (it could point anywhere)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP or self.path.is_symlink():
                    raise StoreError(f"{self.path}: the store's lock file is a symbolic link",
                                     hint=f"remove {self.path} (resdyn never makes one)") from None
                raise OutputError(self.path, exc, hint="choose a writable folder for the store") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise StoreError(f"{self.path}: the store's lock file is not a regular file",
                                 hint=f"remove {self.path} (resdyn never makes one)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreBusyError(
                        f"another resdyn process is writing {self.target}",
                        hint="wait for it to finish (the lock is released as soon as that process ends, "
                        "even if it is killed)",
                    ) from None
                raise StoreError(f"{self.path}: cannot lock ({exc.strerror})") from None
            # The holder before us may have removed the file after we opened it.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)
        raise StoreError(f"{self.path}: cannot take the lock (it keeps being replaced)")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def wait_for_writer(path: str | Path) -> None:
    """Return once no process is writing the store ``path`` (blocks while one is).

    For stores shared between processes, such as an ``--cache`` folder used by
    two audits at once: the second waits for the first, then reuses its store.
    """
    path = Path(path)
    lock = StoreLock.beside(path)
    if not lock.path.exists():
        return
    try:
        lock.acquire(wait=True)
    except OutputError:  # a folder we cannot write: nobody can be writing there
        return
    lock.release()
