"""The result of the angles of one stage: medians per class and class pair, and why some are missing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pairs import AnglePool

__all__ = ["StageAngles", "stage_angles"]


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


def stage_angles(
    names: list[str],
    labels: np.ndarray,
    valid: np.ndarray,
    label_counts: np.ndarray,
    pool: AnglePool,
    sampled: np.ndarray,
    subspace_angles: dict[tuple[int, int], float | None] | None,
    subspace_dims: list[int] | None,
) -> StageAngles:
    """The medians of ``pool`` per class and class pair, with the reasons for the missing ones.

    ``labels`` and ``valid`` (shape (n_samples,)) are the samples' classes and whether each has a
    direction; ``label_counts`` the samples per class; ``sampled`` (per class pair key) whether a key's
    pairs were drawn (``max_pairs``); ``subspace_angles`` / ``subspace_dims`` the subspace comparison
    (None without ``subspace_k``).
    """
    nk = len(names)
    counts = np.bincount(labels[valid], minlength=nk)
    intra: dict[str, float | None] = {}
    intra_reason: dict[str, str] = {}
    for c, name in enumerate(names):
        intra[name] = pool.median(c * nk + c) if counts[c] >= 2 else None
        if intra[name] is None:
            intra_reason[name] = (
                _why_not(int(label_counts[c]), int(counts[c]), 2)
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
                    int(label_counts[e]), int(counts[e]), 1
                )
                continue
            inter[key] = pool.median(c * nk + d)
            if inter[key] is None:
                inter_reason[key] = "no valid pair was drawn"
    a = [v for v in inter.values() if v is not None]
    b = [v for v in intra.values() if v is not None]
    subspace = dims = None
    if subspace_angles is not None and subspace_dims is not None:
        subspace = {f"{names[c]}|{names[d]}": v for (c, d), v in subspace_angles.items()}
        dims = dict(zip(names, subspace_dims))
    return StageAngles(
        intra=intra,
        intra_reason=intra_reason,
        inter=inter,
        inter_reason=inter_reason,
        counts={n: int(counts[c]) for c, n in enumerate(names)},
        excluded_zero={n: int(label_counts[c] - counts[c]) for c, n in enumerate(names)},
        separation=(min(a) - max(b)) if a and b else None,
        pairs_sampled=bool(sampled.any()),
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
