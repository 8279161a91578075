"""Where an unfinished store (``<name>.partial``) can be resumed: its provenance, counters and rows read back.

Nothing here writes: the writer cuts the file back to the point found (:class:`ResumePoint`).
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
from .layout import FORMAT, LIBVER, PROVENANCE_KEYS, StoreHeader, dataset_keys

__all__ = ["ResumePoint", "open_partial", "find_resume_point"]


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
    """The unfinished file, open for appending.

    Raises
    ------
    StoreError
        It cannot be opened as HDF5.
    """
    try:
        return h5py.File(partial_path, "r+", libver=LIBVER)
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
        written = int(f.attrs["written"])
        skipped = json.loads(attribute_value(f.attrs["skipped"]))
        datasets = [f[key] for key in dataset_keys(header)]
        positions = _skipped_positions(header, written, skipped)
    except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:
        raise _refusal(partial_path, f"cannot resume, the unfinished file is damaged ({exc})") from None
    if written < 0 or any(d.shape[0] < written for d in datasets):
        raise _refusal(partial_path, f"cannot resume, 'written' = {written} does not match the data")
    unprotected = [d.name for d in datasets[1:] if not has_checksums(d)]
    if unprotected:
        raise _refusal(partial_path, f"cannot resume, {unprotected[0]} has no checksums to verify it")
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
