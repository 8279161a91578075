"""Writing an output file without clobbering anything else: checks, a private temporary sibling, a rename.

An output (``-o FILE``, a spectra file, a plot) is written into a temporary
file created in the output's own folder with ``O_CREAT | O_EXCL |
O_NOFOLLOW`` (a name planted there, a symbolic link included, is never
opened), then renamed over the output. Before that the output path is
checked: it must be a regular file or a new name, never a device node, a
folder, a symbolic link or one of the files the run reads (:func:`check_output`).

Modes are those of any Unix tool: a new file gets ``0666`` less the process
umask; a file that is replaced keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputError

__all__ = ["OutputRefused", "check_output", "safe_output", "note_input", "open_inputs"]


class OutputRefused(OutputError):
    """The output path names something that must not be replaced (a device, a folder, an input)."""

    def __init__(self, path: Path, reason: str, hint: str) -> None:
        super().__init__(path, OSError(errno.EEXIST, reason), hint=hint)


# (device, inode, size, mtime) of the files this process read as inputs: size and mtime too, so that
# an inode the file system reuses for another file later does not match
_READ: set[tuple[int, int, int, int]] = set()


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def note_input(path: str | Path) -> None:
    """Remember ``path`` as an input of this process (a checkpoint, a store): no output may replace it."""
    with contextlib.suppress(OSError):
        _READ.add(_identity(os.stat(path)))


def open_inputs() -> set[tuple[int, int]]:
    """(device, inode) of the regular files this process has open (the stores and files it reads)."""
    found: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                info = os.stat(f"/proc/self/fd/{name}")
                if stat.S_ISREG(info.st_mode):
                    found.add((info.st_dev, info.st_ino))
    return found


def check_output(path: str | Path, inputs: Iterable[str | Path] = (), *, make_parents: bool = False) -> Path:
    """Refuse an output path that is not a regular file or a new name in an existing folder.

    Parameters
    ----------
    path : str or Path
    inputs : iterable of str or Path
        Files the run reads (a checkpoint, a store): the output must not be
        one of them; neither may it be a file this process read as an input
        (:func:`note_input`: checkpoints and stores note themselves) or has open.
    make_parents : bool
        Create missing folders (plots in a folder of their own) instead of
        refusing them.

    Returns
    -------
    Path

    Raises
    ------
    OutputRefused
        A device node, FIFO or socket; a folder; a symbolic link; an input;
        a folder that does not exist (unless ``make_parents``).
    OutputError
        A folder cannot be created.
    """
    path = Path(path)
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # a new name (or a file where its folder should be)
        info = None
    except OSError as exc:
        raise OutputError(path, exc) from None
    if info is None:
        folder = path.parent
        if not folder.is_dir():
            if folder.exists():
                raise OutputRefused(path, f"{folder} is a file, not a folder", "choose an output in an existing folder")
            if not make_parents:
                raise OutputRefused(path, f"the folder {folder} does not exist",
                                    "create the folder first, or choose an output in an existing folder")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError as exc:  # a file where a folder is needed: say so, not "File exists"
                raise OutputError(path, NotADirectoryError(
                    errno.ENOTDIR, f"{exc.filename} is a file, not a folder", exc.filename)) from None
            except OSError as exc:
                raise OutputError(path, exc) from None
        return path
    if stat.S_ISLNK(info.st_mode):
        raise OutputRefused(path, "it is a symbolic link", "name the file itself, or a new file")
    if stat.S_ISDIR(info.st_mode):
        raise OutputRefused(path, "it is a folder", "name a file inside it")
    if not stat.S_ISREG(info.st_mode):
        raise OutputRefused(path, "it is not a regular file (a device, FIFO or socket)",
                            "name a regular file or a new one")
    key = (info.st_dev, info.st_ino)
    named = set()
    for item in inputs:
        with contextlib.suppress(OSError, ValueError):
            other = os.stat(item)
            named.add((other.st_dev, other.st_ino))
    if key in named or _identity(info) in _READ or key in open_inputs():
        raise OutputRefused(path, "it is an input of this run", "choose another output path")
    return path


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new private file beside ``path`` (``O_EXCL | O_NOFOLLOW``), mode 0666 less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


@contextlib.contextmanager
def safe_output(path: str | Path, inputs: Iterable[str | Path] = (), *, make_parents: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed to ``path`` when the block succeeds.

    The path is checked first (:func:`check_output`). The temporary file is
    created empty (``O_EXCL | O_NOFOLLOW``) with the mode the output will
    have: that of the file it replaces, or ``0666`` less the umask. The
    block may write it by name (``write_bytes``, h5py).

    Raises
    ------
    OutputError
        The path is refused, or any I/O failure in the block or around it
        (no space, read-only, permission); nothing is left behind.
    """
    path = check_output(path, inputs, make_parents=make_parents)
    temporary: Path | None = None
    try:
        fd, temporary = _create_temporary(path)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(fd, stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode))
        finally:
            os.close(fd)
        yield temporary
        os.replace(temporary, path)
    except OutputError:
        raise
    except OSError as exc:  # h5py reports its write failures as OSError too
        raise OutputError(path, exc) from exc
    finally:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
