"""Scratch folders that do not outlive their run (an audit's activations without ``--cache``).

A scratch folder ``resdyn-scratch-*`` in the temporary folder holds an
``.owner`` file on which its run keeps an exclusive ``flock`` for as long as
it lives. It is removed when the run ends normally, on an exception, on
Ctrl-C (SIGINT) and on SIGTERM (what CI cancellation and ``kill`` send: the
handler, installed only where none was, turns it into an exception so that
the clean-up runs). A run killed outright (SIGKILL, out of memory) cannot
clean up; its lock dies with it, so the next scratch folder made by anyone
removes every ``resdyn-scratch-*`` folder of the same user whose lock it can
take.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PREFIX", "Terminated", "scratch_folder", "remove_abandoned"]

PREFIX = "resdyn-scratch-"
_OWNER = ".owner"  # locked by the run, then holds its pid
_SETUP_SECONDS = 60


class Terminated(SystemExit):
    """SIGTERM arrived while a scratch folder was in use (exit status 143, like the signal's default)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def remove_abandoned(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders under ``root`` (default: the temporary folder) whose run has ended.

    Only folders of this user whose ``.owner`` lock can be taken (no process
    holds it: their run was killed) are removed. Returns what was removed.
    """
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = [entry for entry in os.scandir(root) if entry.name.startswith(PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(entry.path, _OWNER), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # An empty .owner may be a folder its run is still setting up (it locks, then writes its pid)
            if os.fstat(fd).st_size == 0 and time.time() - os.fstat(fd).st_mtime < _SETUP_SECONDS:
                raise BlockingIOError
        except OSError:
            os.close(fd)
            continue  # its run is alive
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the block (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def scratch_folder(root: str | Path | None = None) -> Iterator[Path]:
    """A private folder for the block, removed at its end, on Ctrl-C and on SIGTERM.

    Abandoned scratch folders of killed runs are removed first
    (:func:`remove_abandoned`).
    """
    remove_abandoned(root)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    fd = os.open(folder / _OWNER, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        with _sigterm_raises():
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
