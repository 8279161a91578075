"""Labeled image trees inside one archive (``.tar``, ``.tar.gz`` / ``.tgz``, ``.zip``), read in place.

The archive holds the class-per-folder layout of :func:`auditor.io.images.scan_image_folder`,
either at its top level or under one top-level folder (``tar -czf digits.tar.gz digits/``).
Nothing is extracted to disk: members are read into memory one image at a time.
Classes, files and their order are exactly those of the unpacked folder (names sorted,
hidden files and folders left out), so the numbers are the same.

Every member is checked before any image is read: an absolute name, a ``..`` component,
a symbolic or hard link, a device or FIFO, a name that appears twice, or bytes that are not
an archive refuse the whole archive (:class:`~auditor.errors.DataError`, one line). A member
is streamed and read up to :data:`MAX_MEMBER_BYTES` decoded; a larger one is an unreadable image.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import DataError
from .class_choice import choose_classes
from .image_kinds import is_image

__all__ = ["ARCHIVE_SUFFIXES", "MAX_MEMBER_BYTES", "is_archive", "ArchiveReader", "scan_archive"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# The most one member may decode to: an image file larger than this is reported unreadable, never read
# whole (a 4 MB zip can hold a 4 GiB member of zeros).
MAX_MEMBER_BYTES = 256 * 2**20


def is_archive(path: str | Path) -> bool:
    """True for an existing file whose name ends in one of :data:`ARCHIVE_SUFFIXES`."""
    path = Path(path)
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _too_large(declared: int | None) -> str:
    size = "" if declared is None else f" ({declared / 2**20:.0f} MiB)"
    return f"the archive member decodes to more than {MAX_MEMBER_BYTES // 2**20} MiB{size}, the cap for one image"


def _refuse(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}", hint="an image archive is a .tar, .tar.gz or .zip of a class-per-folder tree, "
                     "with plain files and folders only, all inside the archive")


def _checked_name(path: Path, name: str) -> str:
    """The member name as a relative POSIX path; refuses absolute names and ``..``."""
    posix = name.replace("\\", "/")
    pure = PurePosixPath(posix)
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise _refuse(path, f"member {name!r} has an absolute path")
    if ".." in pure.parts:
        raise _refuse(path, f"member {name!r} points outside the archive ('..')")
    return "/".join(part for part in pure.parts if part not in ("", "."))


class ArchiveReader:
    """Reads members of one archive; picklable (each process opens its own handle).

    Parameters
    ----------
    path : Path
        The archive.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.kind = "zip" if self.path.name.lower().endswith(".zip") else "tar"
        self._handle: Any = None
        self._pid: int | None = None
        self._members: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def _open(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            try:
                if self.kind == "zip":
                    self._handle = zipfile.ZipFile(self.path)
                else:
                    self._handle = tarfile.open(self.path, "r:*")
            except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
                raise _refuse(self.path, f"not a readable {self.kind} archive ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:120]})") from None
            self._pid = os.getpid()
            self._members = {}
        return self._handle

    def files(self) -> list[str]:
        """Names of the regular files, checked (no absolute names, ``..``, links or special files)."""
        handle = self._open()
        names: list[str] = []
        try:
            if self.kind == "zip":
                for info in handle.infolist():
                    name = _checked_name(self.path, info.filename)
                    mode = (info.external_attr >> 16) & 0o170000
                    if mode == 0o120000:
                        raise _refuse(self.path, f"member {info.filename!r} is a symbolic link")
                    if not info.is_dir() and name:
                        self._add(names, name, info)
            else:
                for member in handle.getmembers():
                    name = _checked_name(self.path, member.name)
                    if member.issym() or member.islnk():
                        raise _refuse(self.path, f"member {member.name!r} is a link")
                    if not (member.isfile() or member.isdir()):
                        raise _refuse(self.path, f"member {member.name!r} is not a plain file or folder")
                    if member.isfile() and name:
                        self._add(names, name, member)
        except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise _refuse(self.path, f"not a readable {self.kind} archive ({type(exc).__name__})") from None
        return names

    def _add(self, names: list[str], name: str, member: Any) -> None:
        """Record a file member; a name met twice refuses the archive (unpacked, one would overwrite the other)."""
        if name in self._members:
            raise _refuse(self.path, f"member {name!r} appears twice (unpacked, the later would replace the earlier)")
        names.append(name)
        self._members[name] = member

    def read(self, name: str) -> bytes:
        """The bytes of member ``name`` (as :meth:`files` names it), at most :data:`MAX_MEMBER_BYTES` decoded.

        Raises
        ------
        OSError
            The member is larger than the cap (as declared, or as decoded:
            a declared size may lie); the image is reported unreadable.
        """
        handle = self._open()
        if not self._members:
            self.files()
        member = self._members[name]
        declared = member.file_size if self.kind == "zip" else member.size
        if declared > MAX_MEMBER_BYTES:
            raise OSError(_too_large(declared))
        stream = handle.open(member) if self.kind == "zip" else handle.extractfile(member)
        if stream is None:
            raise OSError(f"{name}: not a regular file")
        with stream:
            data = stream.read(MAX_MEMBER_BYTES + 1)  # streamed: never more than the cap in memory
        if len(data) > MAX_MEMBER_BYTES:
            raise OSError(_too_large(None))
        return data


def scan_archive(path: str | Path, classes: Any = None) -> tuple[Path, tuple[str, ...], tuple[tuple[str, int], ...], Any]:
    """Index a class-per-folder tree inside an archive, in the unpacked folder's order.

    Returns
    -------
    root : Path
        The archive, absolute.
    classes : tuple of str
    samples : tuple of (str, int)
        Paths relative to the tree's root and labels.
    reader : callable
        ``reader(rel) -> bytes`` (an :class:`ArchiveReader` bound to the tree's root).

    Raises
    ------
    DataError
        Not an archive, a hostile member, no class folders, an empty or unknown class.
    """
    archive = Path(path).resolve()
    reader = ArchiveReader(archive)
    files = reader.files()
    top = {name.split("/")[0] for name in files}
    prefix = ""
    if len(top) == 1 and all("/" in name for name in files):
        only = next(iter(top))
        # one folder holding the class folders (tar -czf x.tar.gz x/), not itself the only class
        if all(name.count("/") >= 2 for name in files if name.startswith(only + "/")):
            prefix = only + "/"
    tree: dict[str, list[str]] = {}
    loose = False
    for name in files:
        rel = name[len(prefix):] if name.startswith(prefix) else name
        parts = rel.split("/")
        if len(parts) == 1:
            loose = loose or is_image(parts[0])
            continue
        if any(part.startswith(".") for part in parts[:-1]) or not is_image(parts[-1]):
            continue
        tree.setdefault(parts[0], []).append(rel)
    known = sorted(tree)
    if not known:
        raise DataError(f"{archive}: no class folders with images" + (" (the images lie at its top level)" if loose else ""),
                        hint="put the images of each class in a folder named after the class")
    chosen = choose_classes(known, classes, str(archive), "no class folder")
    samples = tuple((rel, label) for label, name in enumerate(chosen) for rel in sorted(tree[name]))
    return archive, chosen, samples, _PrefixedReader(reader, prefix)


class _PrefixedReader:
    """``reader(rel)``: the bytes of ``prefix + rel`` (picklable)."""

    def __init__(self, reader: ArchiveReader, prefix: str) -> None:
        self.reader, self.prefix = reader, prefix

    def __call__(self, rel: str) -> bytes:
        return self.reader.read(self.prefix + rel)
