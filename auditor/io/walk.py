"""Walking class folders: links followed (users link datasets), but no folder entered twice, no image listed twice.

A symbolic link may point anywhere, a loop included (``class0/loop -> ..``).
The walk keeps the real path of every folder it entered, starting with the
image root and every class folder, and of every image it listed: a folder
reached a second time (a loop, a link to another class) adds nothing, and a
file reached under two names is listed once: where it really lies when that
is in a class folder, else under its first link. Special
files (FIFOs, devices, sockets) with an image's name are skipped with a
warning: opening a FIFO would wait forever.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["SpecialFileWarning", "class_files"]


class SpecialFileWarning(UserWarning):
    """An image name that is not a regular file (FIFO, device, socket) was skipped."""


def class_files(root: Path, names: Sequence[str], is_image: Callable[[str], bool]) -> dict[str, list[str]]:
    """The image paths (relative to ``root``, sorted) under each class folder ``root/name``.

    Parameters
    ----------
    root : Path
        The image root (resolved).
    names : sequence of str
        The class folders, in label order: a folder or file that two classes
        reach belongs to the first.
    is_image : callable
        Whether a file name is an image's.

    Returns
    -------
    dict of str to list of str
    """
    seen = {os.path.realpath(root), *(os.path.realpath(root / name) for name in names)}
    files_seen: set[str] = set()
    special: list[str] = []
    linked: list[tuple[str, str, str]] = []
    found: dict[str, list[str]] = {}
    for name in names:
        listed: list[str] = []
        for directory, subdirs, files in os.walk(root / name, followlinks=True):
            keep = []
            for sub in sorted(d for d in subdirs if not d.startswith(".")):
                real = os.path.realpath(os.path.join(directory, sub))
                if real not in seen:  # a loop or a second way into a folder: not entered again
                    seen.add(real)
                    keep.append(sub)
            subdirs[:] = keep
            rel = Path(directory).relative_to(root).as_posix()
            for file in files:
                if not is_image(file):
                    continue
                path = os.path.join(directory, file)
                try:
                    info = os.stat(path)
                except OSError:  # a dangling link: listed, its load reports it unreadable
                    listed.append(f"{rel}/{file}")
                    continue
                if not stat.S_ISREG(info.st_mode):
                    special.append(f"{rel}/{file}")
                    continue
                if os.path.islink(path):
                    linked.append((name, f"{rel}/{file}", os.path.realpath(path)))
                    continue
                files_seen.add(os.path.realpath(path))
                listed.append(f"{rel}/{file}")
        found[name] = listed
    for name, rel, real in linked:  # a link to an image adds it only where no real file has it already
        if real not in files_seen:
            files_seen.add(real)
            found[name].append(rel)
    for name in found:
        found[name].sort()
    if special:
        warnings.warn(SpecialFileWarning(
            f"{root}: {len(special)} image name(s) that are not regular files skipped (FIFO, device or socket): "
            f"{', '.join(special[:3])}{' ...' if len(special) > 3 else ''}"), stacklevel=3)
    return found
