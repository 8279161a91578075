"""Where an unfinished store (``<name>.partial``) can be resumed: its provenance, counters and rows read back.

Nothing here writes: the writer copies the rows below the point found (:class:`ResumePoint`) into a fresh file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...errors import Remedy, StoreError
from ..integrity import ChunkProblem, attribute_value, first_problem, has_checksums
from .layout import FORMAT, PROVENANCE_KEYS, StoreHeader, dataset_keys

__all__ = ["ResumePoint", "open_partial", "find_resume_point", "resume_refusal"]


@dataclass(frozen=True)
class ResumePoint:
    """What an unfinished store holds that a resume keeps.

    Attributes
    ----------
    written : int
        The ``written`` counter found in the file.
    rows : int
        Rows below it that read back intact: the store goes on from there.
    skipped : list of dict
        The ``{"path", "reason"}`` entries of images skipped before the first row computed again.
    datasets : list of h5py.Dataset
        The growing datasets (:func:`~auditor.io.store.layout.dataset_keys`).
    repaired : str or None
        What was found damaged and is cut back (None: nothing).
    """

    written: int
    rows: int
    skipped: list[dict[str, str]]
    datasets: list[Any]
    repaired: str | None


def _refusal(partial_path: Path, problem: str) -> StoreError:
    """The error for an unfinished file that cannot be resumed: delete it or pass --overwrite."""
    return StoreError(f"{partial_path}: {problem}",
                      hint=f"delete {partial_path} or pass {{remedy}} to start over", remedy=Remedy("overwrite"))


def _same(a: Any, b: Any) -> bool:
    return attribute_value(a) == attribute_value(b)


def open_partial(partial_path: Path) -> h5py.File:
    """The unfinished file, open read-only (a resume copies from it: :mod:`.rebuild`).

    Raises
    ------
    StoreError
        It cannot be opened as HDF5.
    """
    try:
        return h5py.File(partial_path, "r")
    except OSError as exc:
        raise _refusal(partial_path, f"cannot resume, the unfinished file is unreadable ({exc})") from None


def find_resume_point(f: h5py.File, header: StoreHeader, partial_path: Path) -> ResumePoint:
    """Check that ``f`` was started with ``header``'s provenance and find the rows that read back intact.

    Raises
    ------
    StoreError
        Other provenance, damaged attributes, counters that do not match the
        data, or datasets without checksums to verify them.
    """
    expected = header.provenance()
    try:
        differs = [
            k for k in ("format", *PROVENANCE_KEYS)
            if not _same(f.attrs.get(k), FORMAT if k == "format" else expected[k])
        ]
    except (OSError, RuntimeError) as exc:
        raise _refusal(partial_path, f"cannot resume, the unfinished file is damaged ({exc})") from None
    if differs:
        raise _refusal(
            partial_path, f"an unfinished extraction with other settings ({', '.join(differs)} differ) is in the way",
        )
    try:
        written, skipped, datasets = _progress(f, dataset_keys(header))
        positions = _skipped_positions(header, written, skipped)
    except _Unresumable as exc:
        raise _refusal(partial_path, f"cannot resume, {exc}") from None
    except ValueError as exc:
        raise _refusal(partial_path, f"cannot resume, the unfinished file is damaged ({exc})") from None
    good, problem = _verified_rows(f, header, written, positions)
    repaired = None
    if good < written:
        # Keep the skipped images met before the first row that is computed again.
        left_out = set(positions)
        restart = [p for p in range(written + len(skipped)) if p not in left_out][good]
        skipped = [s for s, p in zip(skipped, positions) if p < restart]
        repaired = (
            f"{partial_path}: {problem}; resuming from sample {restart} "
            f"(the {written - good} rows from there on are computed again)"
        )
    return ResumePoint(written, good, skipped, datasets, repaired)


class _Unresumable(Exception):
    """Why an unfinished file cannot be resumed, whatever the command (the text follows "cannot resume, ")."""


def _progress(f: h5py.File, keys: list[str]) -> tuple[int, list[dict[str, str]], list[Any]]:
    """The ``written`` counter, the ``skipped`` list and the growing datasets ``keys``, checked for a resume.

    Raises
    ------
    _Unresumable
        Attributes or datasets that cannot be read, a counter beyond the
        rows, datasets without checksums.
    """
    try:
        written = int(f.attrs["written"])
        skipped = json.loads(attribute_value(f.attrs["skipped"]))
        if not isinstance(skipped, list) or not all(isinstance(s, dict) and "path" in s for s in skipped):
            raise ValueError("the 'skipped' attribute is not a list of skipped images")
        datasets = [f[key] for key in keys]
    except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:
        raise _Unresumable(f"the unfinished file is damaged ({' '.join(str(exc).split())})") from None
    if written < 0 or any(d.shape[0] < written for d in datasets):
        raise _Unresumable(f"'written' = {written} does not match the data")
    unprotected = [d.name for d in datasets[1:] if not has_checksums(d)]
    if unprotected:
        raise _Unresumable(f"{unprotected[0]} has no checksums to verify it")
    return written, skipped, datasets


def resume_refusal(f: h5py.File) -> str | None:
    """Why the unfinished store ``f`` cannot be resumed by any command (None: a resume can use it).

    The checks of :func:`find_resume_point` that need no command: what
    ``resdyn verify`` says of a ``.partial``. A resume also needs the same
    settings (provenance) and the same sample list; it keeps the rows that
    read back intact (possibly none).
    """
    try:
        stages = json.loads(attribute_value(f.attrs["stages"]))
        keys = ["samples/path", "samples/label", *(f"stages/{entry[0]}" for entry in stages)]
    except (KeyError, ValueError, TypeError, IndexError, OSError, RuntimeError) as exc:
        return f"the unfinished file is damaged ({' '.join(str(exc).split())})"
    try:
        _progress(f, keys)
    except _Unresumable as exc:
        return str(exc)
    return None


def _skipped_positions(header: StoreHeader, written: int, skipped: list[dict[str, str]]) -> list[int]:
    """Positions in the sample list of the skipped images (increasing), from their paths."""
    consumed = written + len(skipped)
    samples = header.samples
    if consumed > len(samples):
        raise ValueError(f"{consumed} samples handled, only {len(samples)} selected")
    index = {rel: i for i, (rel, _) in enumerate(samples[:consumed])}
    positions = [index.get(str(s["path"]), -1) for s in skipped]
    if any(b <= a for a, b in zip(positions, positions[1:])) or (positions and positions[0] < 0):
        raise ValueError("the 'skipped' list does not follow the sample list")
    return positions


def _verified_rows(f: h5py.File, header: StoreHeader, written: int,
                   skipped_positions: list[int]) -> tuple[int, str | None]:
    """Rows below ``written`` that read back intact, and what stopped the count there.

    Labels and stages are read chunk by chunk (checksums, finite values);
    paths and labels are compared with the sample list.
    """
    good, problem = written, None
    for key in dataset_keys(header)[1:]:
        found: ChunkProblem | None = first_problem(f[key], good)
        if found is not None and found.start < good:
            good, problem = found.start, found.line()
    skipped = set(skipped_positions)
    samples = header.samples
    expected = [samples[p] for p in range(written + len(skipped)) if p not in skipped][:good]
    try:
        paths = [attribute_value(p) for p in f["samples/path"][:good]]
        labels = np.asarray(f["samples/label"][:good])
        mismatch = next((i for i, ((rel, label), p, l) in enumerate(zip(expected, paths, labels))
                         if rel != p or int(label) != int(l)), None)
    except (OSError, RuntimeError, ValueError) as exc:
        return 0, f"samples/path cannot be read ({' '.join(str(exc).split())})"
    if mismatch is not None:
        return mismatch, f"samples/path or samples/label row {mismatch} does not match the sample list"
    return good, problem
