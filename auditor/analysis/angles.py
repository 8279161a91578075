"""Median principal angles between class activations at one stage (Definition 1).

For a stage, every sample's activation is flattened to a vector ``u_i``. The
*intra* angle of class ``c`` is the median, over pairs ``i < j`` of class ``c``,
of ``arccos(cos(u_i, u_j))``; the *inter* angle of classes ``c`` and ``d`` is
the median over every ``i`` in ``c`` and ``j`` in ``d``. Results are in degrees.

Algorithm (:func:`median_angles`)
---------------------------------
The cosines come from Gram matrices of the unit-normalised rows, computed in
float64 tiles with one torch GEMM per tile: a *panel* of ``block_rows`` rows is
held in memory and the rows after it are streamed in tiles of at most 256 rows,
so only the upper triangle of the Gram matrix is computed (the waste is the
diagonal 256-row tiles, about ``256 / N`` of the work) and the source is read
about ``(1 + N / block_rows) / 2`` times (once more with ``center`` or
``max_pairs``, once more with ``subspace_k``), always in sample order, a few
MiB at a time (an HDF5 dataset chunked by sample reads at page-cache speed).

Why float64: a float32 GEMM over ``D ~ 1e5`` features has cosine errors of
about ``1e-7 .. 1e-6``; on ReLU activations with ``D = 102400`` the medians
from a float32 Gram were off by up to ``3e-5`` degrees (bench/bench_angles.py),
from a float64 Gram by ``6e-14``. The medians are specified to ``1e-6``
degrees, so the tiles are float64 (about half the float32 GEMM speed on CPU;
computing only the upper triangle wins most of it back).

``arccos`` is ill-conditioned near 0 and 180 degrees, so every pair with
``|cos| > 0.9999`` (closer than about 0.81 degrees to 0 or 180) is recomputed
from the two unit vectors as ``2 * atan2(||a - b||, ||a + b||)``, which is
accurate to a few ulps at every angle.

Medians are exact (all pairs) unless ``max_pairs`` is given. The median of an
even count is the mean of the two middle values (numpy's convention).

Memory: ``8 * D * (block_rows + min(block_rows, 256))`` bytes of tiles, plus
8 bytes per pair kept for the exact medians (``N * (N - 1) / 2`` pairs in all
when every pair is kept; bounded by ``max_pairs`` per class pair otherwise),
plus, with ``subspace_k``, ``8 * sum_c n_c ** 2`` bytes of class Gram matrices
and ``8 * n_classes * D * subspace_k`` bytes of principal directions. Nothing
of size ``N * D`` is ever held, so the features may live on disk.

References
----------
.. [1] "Understanding ResNet from a Discrete Dynamical System Perspective",
   ICLR 2022 submission, Definition 1 (median principal angle) and Sec. 4.4.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DataError, InputError, StoreError, UsageError
from ..io.integrity import damage_hint, fails_checksum

__all__ = ["StageAngles", "median_angles", "median_angles_h5"]

_TILE_ROWS = 256  # rows of a streamed tile and of an in-panel strip
_REFINE_COS = 0.9999  # |cos| above this: recompute the angle with atan2
_READ_BYTES = 8 << 20  # bytes per read from a lazy source (8 MiB)
_REFINE_ELEMS = 1 << 21  # float64 elements per chunk of atan2 refinement (16 MiB)
_TINY_NORM = 1e-150  # below (or non-finite above): rescale the row before its norm
_RANK_RTOL = 1e-12  # eigenvalues of a class Gram below rtol * max are rank-deficient
_SMALL_GEMM = 1 << 22  # m * n * k below this: numpy, no thread start-up (ms under load)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class StageAngles:
    """Median angles of one stage, in degrees.

    Attributes
    ----------
    intra : dict of str to float or None
        Class name to the median angle over pairs of its valid samples; None
        when the class has fewer than 2 valid samples.
    intra_reason : dict of str to str
        Class name to why its ``intra`` is None (only those classes).
    inter : dict of str to float or None
        ``"a|b"`` (``a`` before ``b`` in the given class order) to the median
        angle over pairs with one valid sample in each class; None when either
        class has no valid sample.
    inter_reason : dict of str to str
        ``"a|b"`` to why its ``inter`` is None (only those pairs).
    counts : dict of str to int
        Valid samples per class (finite, non-zero vectors).
    excluded_zero : dict of str to int
        Zero vectors excluded per class (no direction, hence no angle). With
        ``center=True`` this includes samples that equal the stage mean.
    separation : float or None
        ``min(inter) - max(intra)`` over the non-None values; positive when
        every class is tighter than every class pair is apart. None when there
        is no intra or no inter value.
    pairs_sampled : bool
        True when at least one median was estimated from a random sample of
        pairs (``max_pairs``); False when every median is exact.
    subspace : dict of str to float or None, or None
        With ``subspace_k``: ``"a|b"`` to the median of the principal angles
        between the two classes' principal subspaces (see
        :func:`median_angles`); None when either class has no valid sample.
        None without ``subspace_k``.
    subspace_dims : dict of str to int, or None
        With ``subspace_k``: the dimension of each class's principal subspace,
        ``min(subspace_k, rank)``.
    """

    intra: dict[str, float | None]
    intra_reason: dict[str, str]
    inter: dict[str, float | None]
    inter_reason: dict[str, str]
    counts: dict[str, int]
    excluded_zero: dict[str, int]
    separation: float | None
    pairs_sampled: bool
    subspace: dict[str, float | None] | None = None
    subspace_dims: dict[str, int] | None = None


def median_angles(
    features: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    center: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
    block_rows: int = 1024,
    subspace_k: int | None = None,
    progress: Progress | None = None,
) -> StageAngles:
    """Median intra- and inter-class angles of one stage's activations.

    Parameters
    ----------
    features : array-like of shape (n_samples, n_features) or (n_samples, C, H, W)
        Anything with ``shape``, ``dtype`` and row slicing ``features[a:b]``:
        a numpy array, a torch tensor, an ``h5py.Dataset`` (read in sample
        order, never loaded whole) or a lazy wrapper of one. Each row is
        flattened to one vector. Real (float or integer) values.
    labels : array-like of int, shape (n_samples,)
        Index into ``class_names`` of every sample.
    class_names : sequence of str
        Unique names, none containing ``"|"``. Classes without samples are
        allowed (their angles are None with a reason).
    center : bool, default False
        Subtract the stage mean (over the valid samples) before taking angles.
        Costs one more read of ``features``.
    max_pairs : int, optional
        At most this many pairs per class and per class pair, drawn uniformly
        without replacement (``numpy.random.Generator(seed)``) from the pairs
        of valid samples; exact medians when a class (pair) has no more pairs
        than that. Bounds the memory of the medians; the GEMM work shrinks
        only when few rows take part. Costs one more read of ``features``.
    seed : int, default 0
        Seed of the pair sampling.
    block_rows : int, default 1024
        Rows held in memory at once (the panel); the tile memory is about
        ``8 * n_features * (block_rows + min(block_rows, 256))`` bytes.
    subspace_k : int, optional
        Also compare class subspaces: the principal subspace of class ``c`` is
        spanned by the top ``k_c = min(subspace_k, rank)`` right singular
        vectors of its matrix of unit-normalised (and, with ``center``,
        centred) sample rows; for each class pair, ``subspace`` holds the
        median of the ``min(k_c, k_d)`` principal angles between the two
        subspaces (``scipy.linalg.subspace_angles``), in degrees. The singular
        vectors come from the eigendecomposition of the class Gram matrix
        (method of snapshots), so they cost one more read, not an SVD of a
        ``n_c x n_features`` matrix; directions with eigenvalue below
        ``1e-12`` times the largest are dropped as rank-deficient.
    progress : callable, optional
        Called as ``progress(done, total)`` after every unit of work.

    Returns
    -------
    StageAngles

    Raises
    ------
    InputError
        A shape, dtype or label that does not fit (the message names the
        shapes).
    UsageError
        An option out of range.
    DataError
        NaN or inf in the activations (the message says how many rows).
    StoreError
        A read from an HDF5 dataset failed (the message names the file and
        the dataset).

    Notes
    -----
    The medians of an even number of angles are the mean of the two middle
    values (numpy's convention). Zero vectors (for example a stage of dead
    ReLU maps) have no direction: they are excluded and counted in
    ``excluded_zero``. Cosines are clipped to ``[-1, 1]`` before ``arccos``;
    pairs within about 0.81 degrees of 0 or 180 use the atan2 form. See the
    module docstring for the algorithm and its memory.

    References
    ----------
    .. [1] "Understanding ResNet from a Discrete Dynamical System
       Perspective", ICLR 2022 submission, Definition 1.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 2.0]])
    >>> r = median_angles(x, [0, 0, 1, 1], ["a", "b"])
    >>> round(r.intra["a"], 6), r.intra["b"], r.inter["a|b"]
    (45.0, 0.0, 67.5)
    """
    # 1. Validate everything before reading a single row.
    source = _rows_of(features)
    names = _check_names(class_names)
    lab = _check_labels(labels, len(names), source)
    _check_options(max_pairs=max_pairs, block_rows=block_rows, subspace_k=subspace_k, seed=seed)
    # 2. Run the passes (see _GramRun) and assemble the result.
    run = _GramRun(
        source, lab, len(names), center=center, max_pairs=max_pairs,
        block_rows=block_rows, subspace_k=subspace_k, progress=progress,
    )
    return run.run(seed).result(names)


def median_angles_h5(
    dataset: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    center: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
    block_rows: int = 1024,
    subspace_k: int | None = None,
    progress: Progress | None = None,
) -> StageAngles:
    """:func:`median_angles` of a stage dataset of an activation store, out of core.

    Parameters
    ----------
    dataset : h5py.Dataset of shape (n_samples, C, H, W)
        An open stage dataset (``stages/<name>``), ideally chunked by sample.
        It is read in sample order, ``read_direct`` into a reused buffer of
        whole chunks (about 8 MiB), never loaded whole. A lazy wrapper with
        ``shape``, ``dtype``, ``name`` and row slicing (the store's bfloat16
        stages) is read by slicing, in the same order and sizes.
    labels, class_names, center, max_pairs, seed, block_rows, subspace_k, progress
        As in :func:`median_angles` (``labels`` is the store's
        ``samples/label``, ``class_names`` its ``classes``).

    Returns
    -------
    StageAngles

    Raises
    ------
    StoreError
        ``dataset`` is neither an open h5py dataset nor a wrapper of one, or a
        read failed; the message names the file (when known) and the key.
    InputError, UsageError, DataError
        As in :func:`median_angles`.

    References
    ----------
    .. [1] "Understanding ResNet from a Discrete Dynamical System
       Perspective", ICLR 2022 submission, Definition 1.
    """
    h5py = sys.modules.get("h5py")
    if h5py is not None and isinstance(dataset, h5py.Dataset):
        if not dataset.id.valid:
            raise StoreError(
                f"dataset {dataset.name!r} is closed",
                hint="keep the store open while computing",
            )
    elif isinstance(dataset, np.ndarray) or not all(
        hasattr(dataset, a) for a in ("shape", "dtype", "name", "__getitem__")
    ):
        raise StoreError(
            f"expected an h5py.Dataset (or a lazy wrapper of one), got {type(dataset).__name__}",
            hint="pass store.stage(name) of an open activation store, or call median_angles",
        )
    return median_angles(
        dataset, labels, class_names, center=center, max_pairs=max_pairs, seed=seed,
        block_rows=block_rows, subspace_k=subspace_k, progress=progress,
    )


# --------------------------------------------------------------------------- sources


class _Rows:
    """Rows ``[a, b)`` of a 2-D or higher array-like, flattened, into float64 buffers."""

    def __init__(self, data: Any, shape: tuple[int, ...], dtype: np.dtype | None) -> None:
        self.data = data
        self.shape = shape
        self.n = int(shape[0])
        self.d = int(math.prod(shape[1:]))
        self.dtype = dtype
        chunk = getattr(data, "chunks", None)
        per_chunk = int(chunk[0]) if chunk else 1
        itemsize = dtype.itemsize if dtype is not None else 8
        rows = max(1, _READ_BYTES // max(1, self.d * itemsize))
        self.read_rows = max(per_chunk, rows // per_chunk * per_chunk)
        self._stage: np.ndarray | None = None

    def read_into(self, a: int, b: int, out: np.ndarray) -> None:
        """Fill ``out`` (float64, shape ``(b - a, d)``) with rows ``a:b``."""
        if isinstance(self.data, np.ndarray):
            out[...] = self.data[a:b].reshape(b - a, self.d)
            return
        # Lazy sources: read in sample order, a few MiB at a time.
        for s in range(a, b, self.read_rows):
            e = min(b, s + self.read_rows)
            out[s - a:e - a] = self._read(s, e).reshape(e - s, self.d)

    def _read(self, s: int, e: int) -> np.ndarray:
        try:
            if hasattr(self.data, "read_direct") and self.dtype is not None:
                if self._stage is None:
                    self._stage = np.empty((self.read_rows, *self.shape[1:]), self.dtype)
                self.data.read_direct(self._stage, np.s_[s:e], np.s_[0:e - s])
                return self._stage[:e - s]
            block = self.data[s:e]
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            where = getattr(getattr(self.data, "file", None), "filename", None)
            name = getattr(self.data, "name", None) or type(self.data).__name__
            place = f"{where}: {name!r}" if where else repr(name)
            if fails_checksum(self.data, exc):
                raise StoreError(
                    f"{place}: the store is damaged, rows {s}:{e} fail their Fletcher-32 checksum",
                    hint=damage_hint(where or "STORE"),
                ) from exc
            raise StoreError(
                f"{place}: cannot read rows {s}:{e}: {exc}",
                hint="the store may be truncated or being written; re-run the extraction",
            ) from exc
        if isinstance(block, torch.Tensor):
            block = block.detach().cpu().numpy()
        block = np.asarray(block)
        if block.shape != (e - s, *self.shape[1:]):
            raise InputError(
                f"features[{s}:{e}] has shape {block.shape}, expected {(e - s, *self.shape[1:])}",
                hint="features must support row slicing like a numpy array",
            )
        _check_dtype(block.dtype, self.shape)
        return block


def _rows_of(features: Any) -> _Rows:
    """Wrap ``features`` without reading it; check its shape and dtype."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    if not hasattr(features, "shape") or not hasattr(features, "__getitem__"):
        features = np.asarray(features)
    shape = tuple(int(s) for s in features.shape)
    if len(shape) < 2:
        raise InputError(
            f"features must have shape (n_samples, n_features) or (n_samples, C, H, W), "
            f"got shape {shape}",
            hint="pass one row per sample",
        )
    if shape[0] == 0 or math.prod(shape[1:]) == 0:
        raise DataError(f"features of shape {shape} hold no values", hint="select some samples")
    dtype = getattr(features, "dtype", None)
    try:
        dtype = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        dtype = None
    if dtype is not None:
        _check_dtype(dtype, shape)
    return _Rows(features, shape, dtype)


def _check_dtype(dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if dtype.kind not in "fiu":
        raise InputError(
            f"features of shape {shape} have dtype {dtype}; expected real numbers",
            hint="pass float or integer activations",
        )


def _check_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        raise InputError("class_names must be a sequence of names, not one string")
    names = [str(n) for n in class_names]
    if not names:
        raise InputError("class_names is empty", hint="pass one name per label")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"class_names repeat {dup}", hint="class names must be unique")
    bad = [n for n in names if "|" in n]
    if bad:
        raise InputError(
            f"class names {bad} contain '|', which separates class pairs in the output",
            hint="rename those classes",
        )
    return names


def _check_labels(labels: Any, n_classes: int, source: _Rows) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    lab = np.asarray(lab)
    if lab.ndim != 1 or lab.shape[0] != source.n:
        raise InputError(
            f"labels of shape {lab.shape} do not match features of shape {source.shape}",
            hint=f"pass one label per sample: shape ({source.n},)",
        )
    if lab.dtype.kind not in "iu":
        if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            pass  # integral floats (e.g. from a CSV) are accepted
        else:
            raise InputError(
                f"labels of shape {lab.shape} have dtype {lab.dtype}; expected integers",
                hint="labels index class_names",
            )
    lab = lab.astype(np.int64)
    out = (lab < 0) | (lab >= n_classes)
    if out.any():
        raise InputError(
            f"{int(out.sum())} of {lab.size} labels are outside [0, {n_classes}) "
            f"(min {int(lab.min())}, max {int(lab.max())}) for {n_classes} class names",
            hint="labels index class_names",
        )
    return lab


def _check_options(
    *, max_pairs: int | None, block_rows: int, subspace_k: int | None, seed: int
) -> None:
    for name, value, allow_none in (
        ("max_pairs", max_pairs, True),
        ("block_rows", block_rows, False),
        ("subspace_k", subspace_k, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")


# --------------------------------------------------------------------------- math helpers


def _row_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norms of the rows of ``x`` (float64, modified in place).

    Rows whose norm under- or overflows (only possible for float64 input) are
    divided by their largest magnitude first, which leaves their direction
    unchanged. Rows with NaN or inf get a NaN norm.
    """
    norms = torch.linalg.vector_norm(torch.from_numpy(x), dim=1).numpy().copy()
    for i in np.flatnonzero(~np.isfinite(norms) | (norms < _TINY_NORM)):
        row = x[i]
        if not np.isfinite(row).all():
            norms[i] = np.nan
            continue
        top = np.abs(row).max()
        if top == 0.0:
            norms[i] = 0.0
            continue
        row /= top
        norms[i] = np.linalg.norm(row)
    return norms


def _atan2_degrees(a: torch.Tensor, b: torch.Tensor, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Angles between unit rows ``a[ia]`` and ``b[ib]`` as ``2 atan2(|a-b|, |a+b|)``."""
    out = np.empty(ia.size)
    step = max(1, _REFINE_ELEMS // max(1, a.shape[1]))
    for s in range(0, ia.size, step):
        ra = a[torch.from_numpy(ia[s:s + step])]
        rb = b[torch.from_numpy(ib[s:s + step])]
        diff = torch.linalg.vector_norm(ra - rb, dim=1)
        summ = torch.linalg.vector_norm(ra + rb, dim=1)
        out[s:s + step] = torch.rad2deg(2.0 * torch.atan2(diff, summ)).numpy()
    return out


def _degrees(
    cos: np.ndarray,
    a: torch.Tensor,
    b: torch.Tensor,
    ia: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> np.ndarray:
    """Angles in degrees from cosines; near 0 or 180 degrees recomputed by atan2.

    ``ia()`` returns the row indices into ``a`` and ``b`` of every cosine (only
    called, lazily, when some pair needs the atan2 form).
    """
    ang = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    near = np.flatnonzero(np.abs(cos) > _REFINE_COS)
    if near.size:
        ra, rb = ia()
        ang[near] = _atan2_degrees(a, b, ra[near], rb[near])
    return ang


def _gemm(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``a @ b.T`` in float64: torch (MKL, all intra-op threads) unless tiny."""
    if a.shape[0] * b.shape[0] * a.shape[1] < _SMALL_GEMM:
        return a.numpy() @ b.numpy().T
    return torch.mm(a, b.T).numpy()


def _unrank_pairs(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major index ``k`` of the pairs ``i < j < n`` to ``(i, j)``."""
    i = np.arange(n - 1, dtype=np.int64)
    start = i * (2 * n - i - 1) // 2  # index of the pair (i, i + 1)
    row = np.searchsorted(start, k, side="right") - 1
    return row, k - start[row] + row + 1


# --------------------------------------------------------------------------- the run


class _Pool:
    """Angles of every class pair in one preallocated float64 array.

    Key ``c * n_classes + d`` (``c <= d``) owns ``capacity[key]`` slots from
    ``offset[key]``; tiles append to many keys at once without a Python loop.
    """

    def __init__(self, capacity: np.ndarray) -> None:
        self.capacity = capacity
        self.offset = np.concatenate([[0], np.cumsum(capacity)[:-1]]).astype(np.int64)
        self.size = np.zeros_like(capacity)
        self.data = np.empty(int(capacity.sum()))

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if keys.size == 0:
            return
        # 1. Group by key (stable), 2. rank inside each group, 3. write after the fill.
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        count = np.diff(np.r_[start, keys.size])
        rank = np.arange(keys.size) - np.repeat(start, count)
        self.data[self.offset[keys] + self.size[keys] + rank] = values[order]
        self.size[keys[start]] += count

    def median(self, key: int) -> float | None:
        n = int(self.size[key])
        if n == 0:
            return None
        o = int(self.offset[key])
        return float(np.median(self.data[o:o + n], overwrite_input=True))


@dataclass
class _Loaded:
    """Rows ``[start, start + n)``: unit-normalised rows, labels, validity."""

    start: int
    rows: torch.Tensor  # (n, d) float64, unit rows (invalid rows: anything)
    labels: np.ndarray  # (n,) int64
    valid: np.ndarray  # (n,) bool

    def sub(self, lo: int, hi: int) -> _Loaded:
        """Positions ``[lo, hi)`` of these rows."""
        return _Loaded(self.start + lo, self.rows[lo:hi], self.labels[lo:hi], self.valid[lo:hi])


class _GramRun:
    """State of one :func:`median_angles` call: scan, Gram tiles, subspaces.

    The rows are read in panels of ``panel_rows`` (and tiles of ``tile_rows``)
    so that a stage larger than memory streams from HDF5; :meth:`run` makes the
    passes in order and each pass fills the state the next one reads:

    1. ``_prescan`` (with ``center`` or ``max_pairs``): ``valid``, ``bad_rows``,
       ``mean`` (the stage mean when centring).
    2. ``_plan``: per class pair key ``c * n_classes + d``, whether it is
       ``sampled`` or ``full``, the ``pool`` of cosines it keeps, and for sampled
       pairs ``tile_pairs`` (the pairs bucketed by tile).
    3. ``_gram_pass``: every tile of the row Gram matrix once; cosines go to the
       ``pool`` (and, with ``subspace_k``, into the class Gram matrices ``gram``).
    4. ``_subspaces`` (with ``subspace_k``): principal angles between the class
       subspaces, into ``subspace_angles`` and ``subspace_dims``.

    :meth:`result` turns the pool into medians (``StageAngles``). ``done`` /
    ``total`` count the tiles and panels for ``progress``.
    """

    def __init__(
        self, source: _Rows, labels: np.ndarray, n_classes: int, *, center: bool,
        max_pairs: int | None, block_rows: int, subspace_k: int | None,
        progress: Progress | None,
    ) -> None:
        self.src = source
        self.labels = labels
        self.n_classes = n_classes
        self.max_pairs = max_pairs
        self.subspace_k = subspace_k
        self.progress = progress
        self.center = center
        self.prescan = center or max_pairs is not None
        n = source.n
        self.panel_rows = min(int(block_rows), n)
        self.tile_rows = min(self.panel_rows, _TILE_ROWS)
        self.panels = [(p, min(p + self.panel_rows, n)) for p in range(0, n, self.panel_rows)]
        self.label_counts = np.bincount(labels, minlength=n_classes)
        self.valid = np.zeros(n, dtype=bool)  # filled when rows are first seen
        self.scanned = 0  # rows [0, scanned) have been seen
        self.bad_rows = 0
        self.first_bad = -1
        self.mean: torch.Tensor | None = None
        self.raw_valid: np.ndarray | None = None
        self._buf_panel = np.empty((self.panel_rows, source.d))
        self._buf_tile = np.empty((self.tile_rows, source.d))
        self.done = 0
        self.total = self._count_tiles() + (len(self.panels) if self.prescan else 0)
        self.total += len(self.panels) if subspace_k else 0
        # Filled by _plan: per key c * n_classes + d, exact or sampled, and the pool.
        self.pool = _Pool(np.zeros(n_classes * n_classes, dtype=np.int64))
        self.sampled = np.zeros(n_classes * n_classes, dtype=bool)
        self.full = np.zeros(n_classes * n_classes, dtype=bool)  # needs every entry
        self.tile_pairs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.gram: np.ndarray | None = None  # class Gram matrices, flattened
        self.subspace_angles: dict[tuple[int, int], float | None] | None = None
        self.subspace_dims: list[int] | None = None

    def run(self, seed: int) -> _GramRun:
        """Every pass, in order; returns self."""
        # 1. Optional pre-scan: validate, find zero rows, stage mean.
        if self.prescan:
            self._prescan(self.center)
        # 2. Where the pairs go: exact keys, or sampled pairs bucketed by tile.
        self._plan(seed)
        if self.subspace_k:
            self.local = np.empty(self.src.n, dtype=np.int64)
            for c in range(self.n_classes):
                idx = np.flatnonzero(self.labels == c)
                self.local[idx] = np.arange(idx.size)
            sizes = self.label_counts.astype(np.int64) ** 2
            self.gram_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            self.gram = np.zeros(int(sizes.sum()))
        # 3. The Gram tiles: every pair once.
        self._gram_pass()
        # 4. Optional principal subspaces (one more pass).
        if self.subspace_k:
            self._subspaces(self.subspace_k)
        return self

    # ------------------------------------------------------------------ bookkeeping

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _count_tiles(self) -> int:
        count = 0
        for p0, p1 in self.panels:
            count += -(-(p1 - p0) // self.tile_rows) + -(-(self.src.n - p1) // self.tile_rows)
        return count

    def _note_rows(self, a: int, b: int, norms: np.ndarray, valid: np.ndarray) -> None:
        """Record validity of rows ``[a, b)`` the first time they are seen."""
        finite = np.isfinite(norms)
        if not finite.all():
            self.bad_rows += int((~finite).sum())
            if self.first_bad < 0:
                self.first_bad = a + int(np.flatnonzero(~finite)[0])
        self.valid[a:b] = valid
        self.scanned = b

    def _raise_bad(self) -> None:
        raise DataError(
            f"{self.bad_rows} of {self.src.n} rows of features (shape {self.src.shape}) "
            f"contain NaN or inf (first: row {self.first_bad})",
            hint="the activations overflowed or the store is corrupt; re-extract in float32",
        )

    def _key(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Key ``min * n_classes + max`` of the class pairs ``(a, b)``."""
        return np.minimum(a, b) * self.n_classes + np.maximum(a, b)

    # ------------------------------------------------------------------ passes

    def _prescan(self, center: bool) -> None:
        """Validate every row, find zero rows, sum the rows for the mean."""
        total = torch.zeros(self.src.d, dtype=torch.float64)
        for p0, p1 in self.panels:
            x = self._buf_panel[:p1 - p0]
            self.src.read_into(p0, p1, x)
            if center:
                total += torch.from_numpy(x).sum(dim=0)  # zero rows add nothing
            norms = _row_norms(x)
            self._note_rows(p0, p1, norms, norms > 0)
            self._tick()
        if self.bad_rows:
            self._raise_bad()
        self.raw_valid = self.valid.copy()
        n_valid = int(self.raw_valid.sum())
        if center and n_valid:
            self.mean = total / n_valid
        self.scanned = 0  # the Gram pass notes rows again (centring may zero some)
        self.valid[:] = False

    def _load(self, a: int, b: int, buf: np.ndarray) -> _Loaded:
        """Read, centre and unit-normalise rows ``[a, b)``; note them if new."""
        x = buf[:b - a]
        self.src.read_into(a, b, x)
        t = torch.from_numpy(x)
        if self.mean is not None:
            t -= self.mean
        norms = _row_norms(x)
        valid = norms > 0  # False for NaN too
        if self.raw_valid is not None:
            valid &= self.raw_valid[a:b]
        t /= torch.from_numpy(np.where(valid, norms, 1.0))[:, None]
        if a >= self.scanned:
            if a != self.scanned:  # pragma: no cover - the passes read in order
                raise RuntimeError("rows must be seen in order")
            self._note_rows(a, b, norms, valid)
        else:
            valid &= self.valid[a:b]
        return _Loaded(a, t, self.labels[a:b], valid)

    def _plan(self, seed: int) -> None:
        """Size the pool per class pair and draw the sampled pairs (``max_pairs``)."""
        nk = self.n_classes
        counts = (
            np.bincount(self.labels[self.raw_valid], minlength=nk)
            if self.raw_valid is not None else self.label_counts
        ).astype(np.int64)
        # 1. Pairs per key: n (n - 1) / 2 within a class, n_c n_d between classes.
        pop = np.outer(counts, counts)
        pop[np.diag_indices(nk)] = counts * (counts - 1) // 2
        pop = np.triu(pop)
        upper = np.triu(np.ones((nk, nk), dtype=bool)).ravel()
        pop = pop.ravel()
        k = self.max_pairs
        self.sampled = upper & (pop > k) if k is not None else np.zeros(nk * nk, dtype=bool)
        self.full = upper & ~self.sampled
        if self.subspace_k:  # class Grams need every intra-class entry
            self.full[np.arange(nk) * (nk + 1)] = True
        self.pool = _Pool(np.where(self.sampled, k or 0, pop))
        if not self.sampled.any():
            return
        # 2. Uniform without replacement over the pairs of valid samples, key by key.
        rng = np.random.default_rng(seed)
        firsts, seconds, keys = [], [], []
        for key in np.flatnonzero(self.sampled):
            c, d = divmod(int(key), nk)
            draw = np.sort(rng.choice(int(pop[key]), size=k, replace=False))
            vc = np.flatnonzero(self.raw_valid & (self.labels == c))
            if c == d:
                i, j = _unrank_pairs(draw, int(counts[c]))
                g1, g2 = vc[i], vc[j]
            else:
                vd = np.flatnonzero(self.raw_valid & (self.labels == d))
                g1, g2 = vc[draw // counts[d]], vd[draw % counts[d]]
            firsts.append(np.minimum(g1, g2))
            seconds.append(np.maximum(g1, g2))
            keys.append(np.full(k, key))
        # 3. Bucket the drawn pairs by the tile that computes them.
        g1, g2, key = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(keys)
        tile = self._tile_of(g1, g2)
        order = np.argsort(tile, kind="stable")
        tile, g1, g2, key = tile[order], g1[order], g2[order], key[order]
        cuts = np.flatnonzero(np.diff(tile)) + 1
        for part in np.split(np.arange(tile.size), cuts):
            self.tile_pairs[int(tile[part[0]])] = (g1[part], g2[part], key[part])

    def _tile_of(self, g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
        """Tile number (in execution order) of the pairs ``g1 < g2``."""
        n, pr, tr = self.src.n, self.panel_rows, self.tile_rows
        p = g1 // pr
        p0 = p * pr
        p1 = np.minimum(p0 + pr, n)
        strips = -(-(p1 - p0) // tr)
        starts = np.cumsum([0] + [
            -(-(b - a) // tr) + -(-(n - b) // tr) for a, b in self.panels
        ])[:-1]
        inside = g2 < p1
        return np.where(
            inside, starts[p] + (g1 - p0) // tr, starts[p] + strips + (g2 - p1) // tr
        )

    def _gram_pass(self) -> None:
        """Every pair once: panel strips (upper triangle) and streamed tiles."""
        n, tr = self.src.n, self.tile_rows
        tile = 0
        for p0, p1 in self.panels:
            first = p0 == 0
            panel = self._load(p0, p1, self._buf_panel)
            for s0 in range(p0, p1, tr):
                s1 = min(s0 + tr, p1)
                if not self.bad_rows:
                    rows = panel.sub(s0 - p0, s1 - p0)
                    cols = panel.sub(s0 - p0, p1 - p0)
                    self._tile(tile, rows, cols, triangular=True)
                tile += 1
                self._tick()
            for j0 in range(p1, n, tr):
                j1 = min(j0 + tr, n)
                if first and j0 >= self.scanned:
                    block = self._load(j0, j1, self._buf_tile)  # first sight: always read
                    if not self.bad_rows:
                        self._tile(tile, panel, block, triangular=False)
                elif self._needed(tile, panel, j0, j1):
                    block = self._load(j0, j1, self._buf_tile)
                    self._tile(tile, panel, block, triangular=False)
                tile += 1
                self._tick()
            if first and self.bad_rows:
                self._raise_bad()

    def _needed(self, tile: int, panel: _Loaded, j0: int, j1: int) -> bool:
        """Whether the streamed tile ``[j0, j1)`` against ``panel`` has work."""
        if tile in self.tile_pairs:
            return True
        nk = self.n_classes
        here_r = np.bincount(panel.labels[panel.valid], minlength=nk) > 0
        here_c = np.bincount(self.labels[j0:j1][self.valid[j0:j1]], minlength=nk) > 0
        full = self.full.reshape(nk, nk)
        full = full | full.T
        return bool(full[np.ix_(here_r, here_c)].any())

    def _tile(self, tile: int, rows: _Loaded, cols: _Loaded, *, triangular: bool) -> None:
        """One Gram tile, rows x cols; only pairs with col > row when triangular."""
        # 1. Entries wanted in full: valid pairs of exact keys (and of class Grams).
        key = self._key(rows.labels[:, None], cols.labels[None, :])
        want = rows.valid[:, None] & cols.valid[None, :]
        if triangular:
            r = rows.start + np.arange(rows.labels.size)
            q = cols.start + np.arange(cols.labels.size)
            want &= q[None, :] > r[:, None]
        want &= self.full[key]
        pairs = self.tile_pairs.get(tile)
        # 2. One GEMM for the tile, or a sub-GEMM for the sampled pairs only.
        g = _gemm(rows.rows, cols.rows) if want.any() else None
        if g is not None:
            self._take(g, key, want & ~self.sampled[key], rows, cols)
            if self.gram is not None:
                self._gram_add(g, want & (rows.labels[:, None] == cols.labels[None, :]), rows, cols)
        if pairs is None:
            return
        g1, g2, pkey = pairs
        ok = self.valid[g1] & self.valid[g2]  # centring may have zeroed rows
        ri, ci, pkey = g1[ok] - rows.start, g2[ok] - cols.start, pkey[ok]
        if g is not None:
            cos = g[ri, ci]
        else:
            ur, uc = np.unique(ri), np.unique(ci)
            sub = _gemm(rows.rows[torch.from_numpy(ur)], cols.rows[torch.from_numpy(uc)])
            cos = sub[np.searchsorted(ur, ri), np.searchsorted(uc, ci)]
        self.pool.add(pkey, _degrees(cos, rows.rows, cols.rows, lambda: (ri, ci)))

    def _take(
        self, g: np.ndarray, key: np.ndarray, mask: np.ndarray, rows: _Loaded, cols: _Loaded
    ) -> None:
        """Angles of the masked entries of Gram tile ``g`` into the pool."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return
        q = g.shape[1]
        ang = _degrees(g.ravel()[idx], rows.rows, cols.rows, lambda: (idx // q, idx % q))
        self.pool.add(key.ravel()[idx], ang)

    def _gram_add(self, g: np.ndarray, mask: np.ndarray, rows: _Loaded, cols: _Loaded) -> None:
        """Same-class entries of ``g`` into the class Gram matrices (both halves)."""
        assert self.gram is not None
        ri, ci = np.nonzero(mask)
        c = rows.labels[ri]
        li, lj = self.local[rows.start + ri], self.local[cols.start + ci]
        n = self.label_counts[c]
        base = self.gram_offset[c]
        self.gram[base + li * n + lj] = g[ri, ci]
        self.gram[base + lj * n + li] = g[ri, ci]

    def _subspaces(self, k_max: int) -> None:
        """Principal subspaces from the class Grams (method of snapshots), then angles."""
        from scipy.linalg import subspace_angles

        assert self.gram is not None
        # 1. Top eigenpairs of each class Gram over its valid rows (unit diagonal).
        coef: list[np.ndarray | None] = []
        dims: list[int] = []
        for c in range(self.n_classes):
            m = int(self.label_counts[c])
            keep = self.valid[self.labels == c]
            if not keep.any():
                coef.append(None)
                dims.append(0)
                continue
            base = int(self.gram_offset[c])
            gram = self.gram[base:base + m * m].reshape(m, m)
            np.fill_diagonal(gram, 1.0)
            lam, vec = np.linalg.eigh(gram[np.ix_(keep, keep)])
            lam, vec = lam[::-1], vec[:, ::-1]
            k = int(min(k_max, np.count_nonzero(lam > _RANK_RTOL * lam[0])))
            w = np.zeros((m, k))
            w[keep] = vec[:, :k] / np.sqrt(lam[:k])
            coef.append(w)
            dims.append(k)
        self.gram = None  # free
        # 2. One more pass: V_c = U_c^T W_c Lambda_c^{-1/2}, shape (d, k_c).
        basis = [
            torch.zeros((self.src.d, k), dtype=torch.float64) if w is not None else None
            for w, k in zip(coef, dims)
        ]
        for p0, p1 in self.panels:
            rows = self._load(p0, p1, self._buf_panel)
            for c in np.unique(rows.labels[rows.valid]):
                pos = np.flatnonzero(rows.valid & (rows.labels == c))
                w = torch.from_numpy(np.ascontiguousarray(coef[c][self.local[p0 + pos]]))
                basis[c] += rows.rows[torch.from_numpy(pos)].T @ w
            self._tick()
        # 3. Principal angles per class pair, median in degrees.
        self.subspace_dims = dims
        self.subspace_angles = {}
        for c in range(self.n_classes):
            for d in range(c + 1, self.n_classes):
                if basis[c] is None or basis[d] is None:
                    self.subspace_angles[(c, d)] = None
                    continue
                theta = subspace_angles(basis[c].numpy(), basis[d].numpy())
                self.subspace_angles[(c, d)] = float(np.degrees(np.median(theta)))

    # ------------------------------------------------------------------ result

    def result(self, names: list[str]) -> StageAngles:
        nk = self.n_classes
        counts = np.bincount(self.labels[self.valid], minlength=nk)
        intra: dict[str, float | None] = {}
        intra_reason: dict[str, str] = {}
        for c, name in enumerate(names):
            intra[name] = self.pool.median(c * nk + c) if counts[c] >= 2 else None
            if intra[name] is None:
                intra_reason[name] = (
                    _why_not(int(self.label_counts[c]), int(counts[c]), 2)
                    if counts[c] < 2 else "no valid pair was drawn"
                )
        inter: dict[str, float | None] = {}
        inter_reason: dict[str, str] = {}
        for c in range(nk):
            for d in range(c + 1, nk):
                key = f"{names[c]}|{names[d]}"
                if not (counts[c] and counts[d]):
                    e = c if not counts[c] else d
                    inter[key] = None
                    inter_reason[key] = f"class {names[e]!r}: " + _why_not(
                        int(self.label_counts[e]), int(counts[e]), 1
                    )
                    continue
                inter[key] = self.pool.median(c * nk + d)
                if inter[key] is None:
                    inter_reason[key] = "no valid pair was drawn"
        a = [v for v in inter.values() if v is not None]
        b = [v for v in intra.values() if v is not None]
        subspace = dims = None
        if self.subspace_angles is not None and self.subspace_dims is not None:
            subspace = {f"{names[c]}|{names[d]}": v for (c, d), v in self.subspace_angles.items()}
            dims = dict(zip(names, self.subspace_dims))
        return StageAngles(
            intra=intra,
            intra_reason=intra_reason,
            inter=inter,
            inter_reason=inter_reason,
            counts={n: int(counts[c]) for c, n in enumerate(names)},
            excluded_zero={n: int(self.label_counts[c] - counts[c]) for c, n in enumerate(names)},
            separation=(min(a) - max(b)) if a and b else None,
            pairs_sampled=bool(self.sampled.any()),
            subspace=subspace,
            subspace_dims=dims,
        )


def _why_not(n_samples: int, n_valid: int, need: int) -> str:
    if n_samples == 0:
        return "no samples"
    zeros = n_samples - n_valid
    if n_valid == 0:
        return f"all {n_samples} samples are zero vectors"
    tail = f" ({zeros} zero vectors excluded)" if zeros else ""
    return f"only {n_valid} valid sample, need at least {need}{tail}"
