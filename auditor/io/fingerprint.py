"""What the images of a selection are, beyond their names: the key a cached store is reused under.

A cache keyed on file names reuses a store after the images were replaced in
place under the same names (angles from the old images, stability from the
new ones). The fingerprint hashes each selected file's size, modification
time (nanoseconds) and inode, read with one ``stat`` per file (about a
second for 100,000 images): a file rewritten, copied over or renamed into
place changes it. An archive is fingerprinted as one file. File contents are
not read (a digest of every image would cost a read of the whole data set):
an edit that keeps size, nanosecond mtime and inode (a deliberate ``touch -d``
after the write) goes unseen.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["files_fingerprint"]


def files_fingerprint(root: Path, relative: Iterable[str], *, archive: bool = False) -> str:
    """sha256 of (name, size, mtime_ns, inode) of each file ``root/rel``; of ``root`` alone for an archive.

    A file that cannot be stat'ed contributes its name and ``missing``.
    """
    digest = hashlib.sha256()
    for rel in ([""] if archive else relative):
        path = root if archive else root / rel
        try:
            info = os.stat(path)
            entry = f"{rel}\t{info.st_size}\t{info.st_mtime_ns}\t{info.st_ino}\n"
        except OSError:
            entry = f"{rel}\tmissing\n"
        digest.update(entry.encode())
    return digest.hexdigest()
