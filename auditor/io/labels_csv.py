"""A flat image folder with a labels file: ``--data labels.csv`` (rows ``path,label``).

The ImageNet validation layout: images side by side, their classes in a CSV
beside them. Paths are relative to the CSV's folder (sub-folders allowed); a
first row ``path,label`` is a header. Classes are the distinct labels, sorted;
samples are grouped by class and sorted by path within a class, the order of
the class-per-folder layout, so the same images give the same numbers either way.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import DataError
from .class_choice import choose_classes

__all__ = ["scan_labels_csv"]


def _refuse(path: Path, line: int, what: str) -> DataError:
    return DataError(f"{path}, line {line}: {what}",
                     hint="each row is path,label with the path relative to the CSV's folder")


def scan_labels_csv(path: str | Path, classes: Any = None) -> tuple[Path, tuple[str, ...], tuple[tuple[str, int], ...]]:
    """Index the images a ``path,label`` CSV names.

    Returns
    -------
    root : Path
        The CSV's folder, absolute.
    classes : tuple of str
    samples : tuple of (str, int)

    Raises
    ------
    DataError
        An unreadable file, a row without two fields, an empty path or label, a path
        outside the folder, a missing image, a path listed twice, an unknown class.
    """
    given = Path(path)
    root = given.resolve().parent
    try:
        text = given.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{given}: cannot read the labels file ({type(exc).__name__})") from None
    by_class: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if line == 1 and [cell.strip().lower() for cell in row] == ["path", "label"]:
            continue
        if len(row) != 2:
            raise _refuse(given, line, f"{len(row)} fields, expected 2 (path,label)")
        rel, label = row[0].strip(), row[1].strip()
        if not rel:
            raise _refuse(given, line, "empty path")
        if not label:
            raise _refuse(given, line, f"empty label for {rel!r}")
        pure = PurePosixPath(rel.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts:
            raise _refuse(given, line, f"{rel!r} is not inside {root}")
        rel = pure.as_posix()
        if rel in seen:
            raise _refuse(given, line, f"{rel!r} is listed twice")
        if not (root / rel).is_file():
            raise _refuse(given, line, f"no image {rel!r} in {root}")
        seen.add(rel)
        by_class.setdefault(label, []).append(rel)
    known = sorted(by_class)
    if not known:
        raise DataError(f"{given}: the labels file names no image", hint="rows path,label")
    chosen = choose_classes(known, classes, str(given), "no image labeled")
    samples = tuple((rel, label) for label, name in enumerate(chosen) for rel in sorted(by_class[name]))
    return root, chosen, samples
