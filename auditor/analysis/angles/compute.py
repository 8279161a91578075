"""The entry points of the angles: check the input, run the passes (:class:`GramRun`), return the medians."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import StoreError, UsageError
from .gram import GramRun, Progress, Share
from .result import StageAngles
from .source import RowSource, check_labels, check_names, check_options, rows_of

__all__ = ["median_angles", "median_angles_h5", "products_of"]

_PRODUCTS = ("auto", "float32", "float64")
_FLOAT32_ROWS = (np.dtype(np.float16), np.dtype(np.float32))  # exact in float32
_FLOAT32_WORK = 10 ** 9  # multiply-adds of a stage's Gram from which "auto" takes float32 products


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
    products: str = "auto",
    share: Share | None = None,
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
        Rows held in memory at once (the panel), at most: the tile memory is
        about ``8 * n_features * (block_rows + min(block_rows, 256))`` bytes
        while that is within 1 GiB; wider rows are held as read, fewer at a
        time, within 1 GiB (see the package docstring).
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
    products : {"auto", "float32", "float64"}, default "auto"
        How the Gram products are taken; the medians are the same either way.
        ``"float64"``: float64 GEMMs (the reference). ``"float32"``: float32
        GEMMs over chunks of 2048 features with a rigorous error bound, then
        the few pairs whose angle the bound leaves ambiguous around a median
        recomputed in float64 (:mod:`auditor.analysis.angles.exact`); only for
        float32 or float16 rows and without ``subspace_k`` (whose class Grams
        need float64 entries), float64 otherwise, and float64 again when more
        than 1 % of the pairs are ambiguous. ``"auto"``: ``"float32"`` when a
        stage's Gram has at least 1e9 multiply-adds (``N (N - 1) / 2 x D``),
        where it pays.
    share : Share, optional
        Under torchrun (every process calls this with the same arguments): with
        float32 products, each process computes its share of the Gram tiles and
        every process gets the medians of all, equal to one process's; float64
        products are computed by rank 0 alone (``share.on_main``).

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
    package docstring (:mod:`auditor.analysis.angles`) for the algorithm and its memory.

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
    source = rows_of(features)
    names = check_names(class_names)
    lab = check_labels(labels, len(names), source)
    check_options(max_pairs=max_pairs, block_rows=block_rows, subspace_k=subspace_k, seed=seed)
    if products not in _PRODUCTS:
        raise UsageError(f"products must be one of {', '.join(_PRODUCTS)}, got {products!r}")
    # 2. Run the passes (see GramRun) and assemble the result; float64 where float32 gave up.
    def passes(float32: bool, part: Share | None = None) -> GramRun:
        return GramRun(
            source, lab, len(names), center=center, max_pairs=max_pairs, block_rows=block_rows,
            subspace_k=subspace_k, progress=progress, float32=float32, share=part,
        ).run(seed)

    if _float32(products, source, subspace_k):
        run = passes(True, share)
        if not run.gave_up:
            return run.result(names)
        del run  # its rows: the float64 passes hold their own
    if share is not None and share.size > 1:
        result: StageAngles = share.on_main(lambda: passes(False).result(names))
        return result
    return passes(False).result(names)


def products_of(features: Any, *, products: str = "auto", subspace_k: int | None = None) -> str:
    """``"float32"`` or ``"float64"``: the Gram products :func:`median_angles` takes (before any fallback)."""
    return "float32" if _float32(products, rows_of(features), subspace_k) else "float64"


def _float32(products: str, source: RowSource, subspace_k: int | None) -> bool:
    """Whether the Gram products are float32 (see :func:`median_angles`, ``products``)."""
    if products == "float64" or subspace_k or source.hold not in _FLOAT32_ROWS:
        return False
    return products == "float32" or source.n * (source.n - 1) // 2 * source.d >= _FLOAT32_WORK


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
    products: str = "auto",
    share: Share | None = None,
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
    labels, class_names, center, max_pairs, seed, block_rows, subspace_k, progress, products, share
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
        block_rows=block_rows, subspace_k=subspace_k, progress=progress, products=products, share=share,
    )
