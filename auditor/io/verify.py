"""Check an HDF5 store written by resdyn from end to end (``resdyn verify``).

What is checked, in order (each failure is one :class:`Problem`):

1. the file is HDF5 and a resdyn store (``format``) of a readable major
   ``format_version``;
2. an activation store has its provenance attributes, is ``complete``, and
   has the datasets of its ``stages`` attribute with the recorded shapes,
   module paths and encodings;
3. row counts agree: ``written`` = rows of ``samples/path``,
   ``samples/label`` and every stage; ``written`` + skipped images =
   ``num_selected``; labels index ``classes``; the sample list matches
   ``rows_sha256``;
4. every chunk of every numeric dataset is read (HDF5 checks its Fletcher-32
   checksum) and its values are finite (:mod:`auditor.io.integrity`).

A store of format 1.0 has no checksums: it is checked as far as it can be
and :attr:`StoreCheck.notes` says that damage inside its chunks cannot be
detected. Spectra files (``--save-spectra``, ``format`` = "resdyn-spectra")
get steps 1 and 4.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .integrity import attribute_value, chunk_problems, has_checksums

__all__ = ["Problem", "StoreCheck", "problem_line", "verify_store"]

SPECTRA_FORMAT = "resdyn-spectra"
_ACTIVATION_ATTRS = ("written", "skipped", "complete")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store.

    Attributes
    ----------
    key : str or None
        The dataset or attribute concerned (None: the file as a whole).
    rows : (int, int) or None
        Rows ``[start, stop)`` of ``key`` concerned, when it is a chunk.
    message : str
    """

    key: str | None
    rows: tuple[int, int] | None
    message: str

    def line(self) -> str:
        """The problem in one line (without the file name)."""
        return problem_line(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """``{"key", "rows", "problem"}`` for the JSON report."""
        return {"key": self.key, "rows": list(self.rows) if self.rows else None, "problem": self.message}


def problem_line(entry: Mapping[str, Any]) -> str:
    """One problem of a ``verify`` report (``{"key", "rows", "problem"}``) in one line, without the file name."""
    where = entry["key"] or ""
    if entry["rows"]:
        where += f" rows {entry['rows'][0]}:{entry['rows'][1]}"
    return f"{where}: {entry['problem']}" if where else entry["problem"]


@dataclass
class StoreCheck:
    """The result of :func:`verify_store`.

    Attributes
    ----------
    path : Path
    format, format_version : str or None
        As found in the file (None when missing).
    complete : bool or None
    samples : int or None
        Rows stored.
    stages : list of str
    checksums : bool
        Every numeric dataset carries Fletcher-32 checksums.
    datasets, chunks, values : int
        What was read back.
    problems : list of Problem
    notes : list of str
        Limits of the check that are not damage (no checksums in an old store).
    """

    path: Path
    format: str | None = None
    format_version: str | None = None
    complete: bool | None = None
    samples: int | None = None
    stages: list[str] = field(default_factory=list)
    checksums: bool = False
    datasets: int = 0
    chunks: int = 0
    values: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def problem(self, key: str | None, message: str, rows: tuple[int, int] | None = None) -> None:
        """Record one problem."""
        self.problems.append(Problem(key, rows, message))

    def to_dict(self) -> dict[str, Any]:
        """The ``store``, ``checked``, ``ok``, ``problems`` and ``notes`` of the JSON document."""
        return {
            "store": {
                "path": str(self.path), "format": self.format, "format_version": self.format_version,
                "complete": self.complete, "samples": self.samples, "stages": list(self.stages),
                "checksums": "fletcher32" if self.checksums else "none",
            },
            "checked": {"datasets": self.datasets, "chunks": self.chunks, "values": self.values},
            "ok": self.ok,
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
        }


def verify_store(path: str | Path, *, progress: Callable[[int, int], None] | None = None) -> StoreCheck:
    """Check a store written by resdyn; never raises for a damaged or foreign file.

    Parameters
    ----------
    path : str or Path
        An activation store (``.h5``, or an unfinished ``.h5.partial``) or a
        spectra file.
    progress : callable, optional
        ``progress(done, total)`` over the datasets read back.

    Returns
    -------
    StoreCheck
        ``ok`` when nothing is wrong; otherwise one :class:`Problem` per
        thing found.
    """
    import h5py

    from .store import FORMAT, FORMAT_VERSION

    path = Path(path)
    check = StoreCheck(path)
    if not path.is_file():
        check.problem(None, "no such file")
        return check
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        check.problem(None, "not an HDF5 file")
        return check
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        check.problem(None, f"cannot be opened as HDF5 ({' '.join(str(exc).split())})")
        return check
    with file:
        try:
            check.format = attribute_value(file.attrs.get("format"))
            check.format_version = attribute_value(file.attrs.get("format_version"))
        except (OSError, RuntimeError) as exc:
            check.problem(None, f"the root attributes cannot be read ({' '.join(str(exc).split())})")
            return check
        if check.format not in (FORMAT, SPECTRA_FORMAT):
            check.problem("format", f"not a resdyn store (format={check.format!r})")
            return check
        major = str(check.format_version or "").split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            check.problem("format_version", f"unsupported store version {check.format_version!r}")
            return check
        if check.format == FORMAT:
            keys = _check_activations(file, check)
        else:
            keys = []
            if "layers" in file:
                file["layers"].visit(lambda name: keys.append(f"layers/{name}"))
            keys = [k for k in keys if isinstance(file[k], h5py.Dataset)]
            check.complete = True
        _check_chunks(file, keys, check, progress)
    return check


def _check_activations(file: Any, check: StoreCheck) -> list[str]:
    """Steps 2 and 3 of the module docstring; the numeric datasets to read back."""
    import h5py

    from .store import PROVENANCE_KEYS, rows_digest
    from .store.resume import resume_refusal

    attrs = file.attrs
    missing = [k for k in (*PROVENANCE_KEYS, *_ACTIVATION_ATTRS) if k not in attrs]
    for key in missing:
        check.problem(key, "a required attribute is missing")
    for key in ("classes", "samples/path", "samples/label", "stages"):
        if key not in file:
            check.problem(key, "a required dataset is missing")
    if check.problems:
        return [k for k in ("samples/label",) if k in file]
    try:
        check.complete = bool(attribute_value(attrs["complete"]))
        written = int(attribute_value(attrs["written"]))
        selected = int(attribute_value(attrs["num_selected"]))
    except (ValueError, TypeError, OSError, RuntimeError) as exc:  # damaged counters: reported, never raised
        check.problem("written", f"the 'complete', 'written' or 'num_selected' attribute cannot be read ({exc})")
        return [k for k in ("samples/label",) if k in file]
    try:
        skipped = json.loads(attribute_value(attrs["skipped"]))
        listed = json.loads(attribute_value(attrs["stages"]))
        if not isinstance(skipped, list) or not isinstance(listed, list):
            raise TypeError("not a list")
    except (ValueError, TypeError):
        check.problem("skipped", "the 'skipped' or 'stages' attribute is not valid JSON")
        skipped, listed = [], []
    if not check.complete:
        refusal = resume_refusal(file)
        if refusal is None:
            check.problem("complete", f"incomplete: an unfinished extraction ({written + len(skipped)} of {selected} "
                                      "samples handled); rerun the same extract command to resume it")
        else:  # the same checks a resume makes: never "resumable" where a resume would refuse
            check.problem("complete", f"incomplete: an unfinished extraction that cannot be resumed ({refusal}); "
                                      "delete it and extract again")
    elif written + len(skipped) != selected:
        check.problem("written", f"{written} rows stored + {len(skipped)} skipped != {selected} samples selected")
    check.samples = written
    labels_ds, paths_ds = file["samples/label"], file["samples/path"]
    for key, ds in (("samples/path", paths_ds), ("samples/label", labels_ds)):
        if ds.shape[0] != written:
            check.problem(key, f"{ds.shape[0]} rows, 'written' says {written}")
    stages = file["stages"]
    check.stages = list(stages.keys())
    dtype = attribute_value(attrs["dtype"])
    for entry in listed:
        name, location, shape = entry[0], entry[1], tuple(entry[2])
        key = f"stages/{name}"
        if name not in stages:
            check.problem(key, "a stage listed in the 'stages' attribute is missing")
            continue
        ds = stages[name]
        if not isinstance(ds, h5py.Dataset) or tuple(ds.shape[1:]) != shape:
            check.problem(key, f"shape {getattr(ds, 'shape', None)}, the 'stages' attribute says (N, *{shape})")
            continue
        if ds.shape[0] != written:
            check.problem(key, f"{ds.shape[0]} rows, 'written' says {written}")
        if attribute_value(ds.attrs.get("module_path")) != location:
            check.problem(key, f"module_path {attribute_value(ds.attrs.get('module_path'))!r}, expected {location!r}")
        if attribute_value(ds.attrs.get("encoding")) != dtype:
            check.problem(key, f"encoding {attribute_value(ds.attrs.get('encoding'))!r}, the store's dtype is {dtype!r}")
    unlisted = sorted(set(check.stages) - {entry[0] for entry in listed})
    for name in unlisted:
        check.problem(f"stages/{name}", "a stage not listed in the 'stages' attribute")
    keys = ["samples/label", *(f"stages/{entry[0]}" for entry in listed if entry[0] in stages)]
    try:
        classes = len(file["classes"][()])
        labels = np.asarray(labels_ds[()])
        paths = [attribute_value(p) for p in paths_ds[()]]
    except (OSError, RuntimeError):
        return keys  # the chunk scan names the damaged rows
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        check.problem("samples/label", f"{bad.size} labels outside 0..{classes - 1} (first at row {bad[0]})")
    if len(set(paths)) != len(paths) or not all(paths):
        check.problem("samples/path", "empty or repeated sample paths")
    digest = attribute_value(attrs.get("rows_sha256"))
    if digest is not None and digest != rows_digest(labels, paths):
        check.problem("samples/path", "the sample list (paths and labels) does not match rows_sha256")
    elif digest is None and check.complete and str(check.format_version) != "1.0":
        check.problem("rows_sha256", "a required attribute is missing")
    return keys


def _check_chunks(file: Any, keys: list[str], check: StoreCheck, progress: Callable[[int, int], None] | None) -> None:
    """Step 4: read every chunk back (checksums, finite values)."""
    protected = True
    for done, key in enumerate(keys):
        ds = file[key]
        protected = protected and has_checksums(ds)
        per_chunk = int(ds.chunks[0]) if ds.chunks else max(1, ds.shape[0])
        rows = ds.shape[0] if ds.shape else 1
        check.datasets += 1
        check.chunks += math.ceil(rows / per_chunk) if ds.shape else 1
        check.values += int(np.prod(ds.shape, dtype=np.int64))
        for found in chunk_problems(ds, finite=True):
            check.problem(found.key, found.detail, (found.start, found.stop))
        if progress is not None:
            progress(done + 1, len(keys))
    check.checksums = protected and bool(keys)
    if not check.checksums:
        check.notes.append(
            f"written without checksums (store format {check.format_version}): the structure and the values "
            "were checked, but damage inside a chunk cannot be detected; extract again to add checksums"
        )
