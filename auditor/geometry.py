"""Class geometry of an activation store: median principal angles per stage."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .analysis.angles import StageAngles, median_angles, median_angles_h5
from .errors import DataError
from .io.store import ActivationStore

__all__ = ["store_angles", "stage_entry", "separation_warning"]

Progress = Callable[[int, int], None]


class _RowSubset:
    """Rows ``indices`` (increasing) of a stage dataset, read lazily by slices."""

    def __init__(self, data: Any, indices: np.ndarray) -> None:
        self._data = data
        self._indices = indices
        self.shape = (len(indices), *data.shape[1:])
        self.dtype = data.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = self._indices[key]
        return np.asarray(self._data[np.atleast_1d(rows).tolist()], dtype=self.dtype)


def _separation_reason(result: StageAngles) -> str:
    """Why a stage has no separation (smallest inter minus largest intra angle)."""
    if len(result.counts) < 2:
        return (f"one class only ({', '.join(result.counts) or 'none'}): separation needs at least two classes")
    if not any(v is not None for v in result.inter.values()):
        return "no between-class angle is defined (see inter_reason)"
    return "no within-class angle is defined (see intra_reason)"


def separation_warning(entries: Sequence[Mapping[str, Any]]) -> str | None:
    """One line for the stages whose separation is null, with the (first) reason; None when all are defined."""
    undefined = [e for e in entries if e.get("separation") is None]
    if not undefined:
        return None
    names = ", ".join(e["name"] for e in undefined)
    return f"class separation is undefined at stage(s) {names}: {undefined[0].get('separation_reason', 'no valid angles')}"


def stage_entry(name: str, shape: Sequence[int], result: StageAngles) -> dict[str, Any]:
    """One ``stages`` entry of the JSON report (degrees; null with a reason where undefined)."""
    entry: dict[str, Any] = {
        "name": name,
        "shape": [int(s) for s in shape],
        "intra": dict(result.intra),
        "inter": dict(result.inter),
        "counts": dict(result.counts),
        "excluded_zero": dict(result.excluded_zero),
        "separation": result.separation,
        "pairs_sampled": result.pairs_sampled,
    }
    if result.separation is None:
        entry["separation_reason"] = _separation_reason(result)
    if result.intra_reason:
        entry["intra_reason"] = dict(result.intra_reason)
    if result.inter_reason:
        entry["inter_reason"] = dict(result.inter_reason)
    if result.subspace is not None:
        entry["subspace"] = dict(result.subspace)
        entry["subspace_dims"] = dict(result.subspace_dims or {})
    return entry


def store_angles(
    store: ActivationStore,
    *,
    stages: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    center: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
    subspace_k: int | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Median principal angles of every (selected) stage of ``store``.

    Parameters
    ----------
    store : ActivationStore
    stages : sequence of str, optional
        Stage names, in the order wanted; default all (network order).
    classes : sequence of str, optional
        Classes to keep, in the order wanted; default all.
    center, max_pairs, seed, subspace_k, progress
        As in :func:`auditor.analysis.angles.median_angles`.

    Returns
    -------
    list of dict
        ``stages`` entries (see :func:`stage_entry`).
    """
    names = list(stages) if stages else list(store.stage_names)
    for name in names:
        store.stage(name)  # refuses unknown stages, naming the ones in the file
    class_names = list(store.classes)
    labels = store.labels
    keep_rows = None
    if classes:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise DataError(
                f"{store.path}: no class {unknown[0]!r} in the store",
                hint="classes in the file: " + ", ".join(class_names),
            )
        old_index = {c: i for i, c in enumerate(class_names)}
        remap = np.full(len(class_names), -1, dtype=np.int64)
        for new, name in enumerate(classes):
            remap[old_index[name]] = new
        keep_rows = np.flatnonzero(remap[labels] >= 0)
        labels = remap[labels[keep_rows]]
        class_names = list(classes)
    results = []
    for index, name in enumerate(names):
        data = store.stage(name)
        inner = None
        if progress is not None:
            inner = lambda done, total, i=index: progress(i * 1000 + done * 1000 // max(total, 1), len(names) * 1000)  # noqa: E731
        options = dict(center=center, max_pairs=max_pairs, seed=seed, subspace_k=subspace_k, progress=inner)
        if keep_rows is not None:
            result = median_angles(_RowSubset(data, keep_rows), labels, class_names, **options)
        elif hasattr(data, "id"):
            result = median_angles_h5(data, labels, class_names, **options)
        else:
            result = median_angles(data, labels, class_names, **options)
        results.append(stage_entry(name, data.shape[1:], result))
    return results
