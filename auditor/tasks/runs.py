"""Training runs named on the command line: checkpoint files grouped into named runs.

:func:`collect_checkpoints` expands files, folders and globs; :func:`collect_runs`
groups them into runs (a folder, a glob, or the files of one folder), each with a
name; :func:`order_checkpoints` orders a run's opened subjects by their ``epoch``
metadata (natural file-name order when one lacks it).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError
from ..io.checkpoint import Checkpoint
from ..subject import Subject

__all__ = ["CHECKPOINT_SUFFIXES", "Run", "collect_checkpoints", "collect_runs", "order_checkpoints", "natural_key"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin", ".ckpt")


def natural_key(path: Path) -> list[Any]:
    """Sort key of a file name with its digit runs compared as numbers (``epoch-9`` before ``epoch-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _expand(item: str | Path) -> tuple[list[Path], str]:
    """The checkpoint files ``item`` names and its kind: ``folder``, ``file`` or ``glob``."""
    path = Path(item)
    if path.is_dir():
        matches = sorted((p for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES), key=natural_key)
        if not matches:
            raise InputError(f"{item}: no checkpoint files in this folder",
                             hint="resdyn reads " + ", ".join(CHECKPOINT_SUFFIXES))
        return matches, "folder"
    if path.is_file():
        return [path], "file"
    matches = sorted((Path(p) for p in glob.glob(str(item)) if Path(p).is_file()), key=natural_key)
    if not matches:
        raise InputError(f"{item}: no such file, folder or matching checkpoint")
    return matches, "glob"


def collect_checkpoints(items: Sequence[str | Path]) -> list[Path]:
    """Expand folders and globs into checkpoint files (natural order; duplicates removed).

    Raises
    ------
    InputError
        A folder without checkpoint files; a name that is no file, folder or matching glob.
    """
    found: list[Path] = []
    for item in items:
        found.extend(m for m in _expand(item)[0] if m not in found)
    return found


@dataclass(frozen=True)
class Run:
    """One training run: its name and its checkpoint files (natural file-name order)."""

    name: str
    paths: tuple[Path, ...]


def _folder_name(paths: Sequence[Path], fallback: str) -> str:
    parents = {p.resolve().parent for p in paths}
    return next(iter(parents)).name if len(parents) == 1 else fallback


def collect_runs(items: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Run]:
    """Group ``items`` into runs, in the order given.

    A folder is a run named after the folder; a glob is a run named after the
    folder of its matches (the pattern itself when they lie in several folders);
    plain files are grouped by their folder, one run per folder, named after it.

    Parameters
    ----------
    items : sequence of str or Path
        Folders of per-epoch checkpoints, glob patterns, or checkpoint files.
    names : sequence of str, optional
        One name per run, in the runs' order, instead of the folder names.

    Raises
    ------
    InputError
        An item that names no checkpoint (see :func:`collect_checkpoints`).
    UsageError
        ``names`` does not give one name per run, or two runs have the same name.
    """
    runs: list[tuple[str, list[Path]]] = []
    by_folder: dict[Path, int] = {}
    for item in items:
        matches, kind = _expand(item)
        if kind == "file":
            folder = matches[0].resolve().parent
            if folder in by_folder:
                paths = runs[by_folder[folder]][1]
                paths.extend(m for m in matches if m not in paths)
                continue
            by_folder[folder] = len(runs)
            runs.append((folder.name or str(folder), list(matches)))
        elif kind == "folder":
            runs.append((Path(item).resolve().name, matches))
        else:
            runs.append((_folder_name(matches, str(item)), matches))
    if names is not None:
        if len(names) != len(runs):
            raise UsageError(
                f"{len(names)} run name(s) for {len(runs)} run(s) ({', '.join(n for n, _ in runs)})",
                hint="give one name per run, in the runs' order (a folder, a glob, or the files of one folder is a run)",
            )
        runs = [(str(name), paths) for name, (_, paths) in zip(names, runs)]
    seen: set[str] = set()
    for name, _ in runs:
        if name in seen:
            raise UsageError(f"two runs are named {name!r}",
                             hint="name each run (one name per run, in the runs' order)")
        seen.add(name)
    return [Run(name, tuple(sorted(paths, key=natural_key))) for name, paths in runs]


def _checkpoint(item: Subject | Checkpoint) -> Checkpoint:
    return item.checkpoint if isinstance(item, Subject) else item


def _epoch(item: Subject | Checkpoint) -> int | float | None:
    raw = _checkpoint(item).metadata.get("epoch")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return int(value) if value is not None and value.is_integer() else value


def order_checkpoints(
    subjects: Sequence[Subject | Checkpoint],
) -> tuple[list[int], list[int | float | None], str]:
    """The order in which to report ``subjects`` (opened, or only read), their epochs, and a note when it is a guess.

    Returns
    -------
    order : list of int
        Indices into ``subjects``: by ``epoch`` metadata (ties by natural file
        name) when every checkpoint has one, else as given.
    epochs : list of int, float or None
        The ``epoch`` metadata of each subject, in the given order.
    note : str
        Empty, or why the order is by file name.
    """
    epochs = [_epoch(s) for s in subjects]
    if all(e is not None for e in epochs):
        order = sorted(range(len(subjects)), key=lambda i: (epochs[i], natural_key(_checkpoint(subjects[i]).path)))
        return order, epochs, ""
    return (list(range(len(subjects))), epochs,
            "no 'epoch' metadata in every checkpoint: ordered by natural sort of the file names")
