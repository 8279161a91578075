"""Reading a finished store: checked when opened, every chunk checked by HDF5 when read."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...errors import StoreError
from ..integrity import attribute_value, damage_hint, fails_checksum, has_checksums
from ..safe_output import note_input
from .encoding import BFloat16Stage
from .layout import FORMAT, FORMAT_VERSION, rows_digest

__all__ = ["ActivationStore", "UnverifiedStoreWarning", "open_store"]


class ActivationStore:
    """A finished activation store, open for reading (see :func:`open_store`).

    Attributes
    ----------
    path : Path
    attrs : dict
        Root attributes as plain Python values.
    classes : list of str
        By label.
    labels : ndarray of shape (n_samples,), int64
    paths : list of str
        Relative to ``attrs["data_root"]``.
    stage_names : list of str
        In network order (``penultimate`` last).
    checksums : bool
        Whether every chunk carries a Fletcher-32 checksum, checked by HDF5 on
        every read (stores of format 1.1 on); False for older stores, whose
        damage cannot be detected.
    """

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._file = file
        self.attrs = {k: attribute_value(v) for k, v in file.attrs.items()}
        self.classes = [attribute_value(c) for c in file["classes"][()]]
        try:
            self.labels = np.asarray(file["samples/label"][()], dtype=np.int64)
        except (OSError, RuntimeError) as exc:
            raise _damaged(path, file["samples/label"], exc) from None
        self.paths = [attribute_value(p) for p in file["samples/path"][()]]
        stages = file["stages"]
        self.checksums = has_checksums(file["samples/label"]) and all(
            has_checksums(stages[name]) for name in stages
        )
        order = self.attrs.get("stages")
        names = list(file["stages"].keys())
        try:
            listed = [entry[0] for entry in json.loads(order)] if order else []
        except (ValueError, TypeError, IndexError):
            listed = []
        self.stage_names = [n for n in listed if n in names] + [n for n in names if n not in listed]

    @property
    def skipped(self) -> list[dict[str, str]]:
        """``{"path", "reason"}`` of the images left out."""
        return json.loads(self.attrs.get("skipped") or "[]")

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing used (``size``, ``resize``, ``mean``, ``std``)."""
        return json.loads(self.attrs.get("preprocessing") or "{}")

    def __len__(self) -> int:
        return len(self.labels)

    def stage(self, name: str) -> h5py.Dataset | BFloat16Stage:
        """The activations of stage ``name``, shape (n_samples, *shape), read lazily.

        float32 and float16 stages are the h5py datasets themselves; bfloat16
        stages are wrapped so that slicing returns float32.

        Raises
        ------
        StoreError
            Unknown stage.
        """
        if name not in self.stage_names:
            raise StoreError(
                f"{self.path}: no stage {name!r} (key stages/{name})",
                hint=f"stages in the file: {', '.join(self.stage_names)}",
            )
        dataset = self._file["stages"][name]
        if attribute_value(dataset.attrs.get("encoding")) == "bfloat16":
            return BFloat16Stage(dataset)
        return dataset

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refuse(path: Path, key: str, problem: str, hint: str | None = None) -> StoreError:
    return StoreError(f"{path}: {problem} (key {key!r})", hint=hint)


def _damaged(path: Path, dataset: Any, exc: BaseException) -> StoreError:
    """The error for a read of ``dataset`` that failed (a chunk that fails its checksum, ...)."""
    cause = "a chunk fails its Fletcher-32 checksum" if fails_checksum(dataset, exc) else " ".join(str(exc).split())
    return _refuse(path, str(dataset.name).lstrip("/"), f"the store is damaged, {cause}", damage_hint(path))


class UnverifiedStoreWarning(UserWarning):
    """A store without checksums (format 1.0) was opened: damage in it cannot be detected."""


def open_store(path: str | Path, *, warn_unverified: bool = True) -> ActivationStore:
    """Open a finished activation store for reading.

    Every chunk read later is checked against its Fletcher-32 checksum by
    HDF5 (a failed check raises instead of returning wrong numbers; the
    angles check a row once, then read it again raw:
    :class:`auditor.analysis.angles.source.RowSource`); the
    sample list is checked against ``rows_sha256`` here.

    Parameters
    ----------
    path : str or Path
    warn_unverified : bool
        Issue :class:`UnverifiedStoreWarning` for a store written without
        checksums (format 1.0), which stays readable.

    Returns
    -------
    ActivationStore
        A context manager; closing it closes the file.

    Raises
    ------
    StoreError
        Missing file, not HDF5, not a resdyn store (no ``format``), an
        unknown major ``format_version``, an incomplete store, or a missing
        dataset. Every message names the file and the key.
    """
    path = Path(path)
    note_input(path)  # no output of this run may replace it
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        hint = (
            "an unfinished extraction exists; rerun the same extract command to resume it"
            if partial.exists() else "run 'resdyn extract' first"
        )
        raise StoreError(f"{path}: no such file", hint=hint)
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        raise StoreError(f"{path}: not an HDF5 file", hint="pass a store written by 'resdyn extract'")
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path}: cannot open as HDF5 ({exc})") from None
    try:
        attrs = file.attrs
        if attribute_value(attrs.get("format")) != FORMAT:
            raise _refuse(
                path, "format", f"not a resdyn activation store (format={attribute_value(attrs.get('format'))!r})",
                "pass a store written by 'resdyn extract'",
            )
        version = str(attribute_value(attrs.get("format_version", "")))
        major = version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise _refuse(
                path, "format_version", f"unsupported store version {version!r} "
                f"(this resdyn reads {FORMAT_VERSION.split('.')[0]}.x)",
                "upgrade resdyn or extract the activations again",
            )
        if not bool(attribute_value(attrs.get("complete", False))):
            raise _refuse(
                path, "complete", "the store is incomplete",
                "rerun the extract command to finish it",
            )
        for key in ("classes", "samples/path", "samples/label", "stages"):
            if key not in file:
                raise _refuse(path, key, "a required dataset is missing")
        store = ActivationStore(path, file)
        if len(store.paths) != len(store.labels):
            raise _refuse(path, "samples/path", "paths and labels differ in length")
        for name in store.stage_names:
            if file["stages"][name].shape[0] != len(store.labels):
                raise _refuse(path, f"stages/{name}", "row count differs from samples/label")
        digest = store.attrs.get("rows_sha256")
        if digest is not None and digest != rows_digest(store.labels, store.paths):
            raise _refuse(path, "samples/path", "the store is damaged, the sample list does not match rows_sha256",
                          damage_hint(path))
        if warn_unverified and not store.checksums:
            warnings.warn(
                f"{path}: written without checksums (store format {version}), so damage in it cannot be "
                "detected; 'resdyn extract --overwrite' rewrites it with checksums",
                UnverifiedStoreWarning, stacklevel=2,
            )
        return store
    except BaseException:
        file.close()
        raise
