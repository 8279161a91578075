"""Float32 Gram products with a rigorous error bound, and exact medians by repairing only the ambiguous pairs.

Float32 rows (a store's float32 or float16 activations) are exact in float32, so
their dot products can be taken by float32 GEMMs (twice the float64 rate, half the
bytes) if the rounding is bounded. :func:`float32_products` sums, in float64, float32
GEMMs over chunks of ``_CHUNK`` (``k``) columns; for every chunk (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., Thm 3.1 and 3.5: any order of summation,
FMA included, no underflow)::

    |fl(x . y) - x . y| <= gamma_k * sum_i |x_i| |y_i|,   gamma_k = k u / (1 - k u),  u = 2**-24,

and ``sum_i |x_i| |y_i| <= ||x|| ||y||`` (Cauchy-Schwarz, over every chunk together),
so a cosine is within ``gamma_k`` of the computed one, plus the float64 parts
(:func:`cos_bound`: the sum of the chunks, the norms, the divisions, and the float64
value this must agree with). Centred rows are rounded to float32 once (each value
within a relative ``u``), which adds ``2 u + u**2``. With ``k = 1024``, ``e`` is
about ``6.1e-5`` (an angle of 30 degrees known to about 0.007 degrees).

Each angle is then known to lie in ``[acos(min(1, c + e)), acos(max(-1, c - e))]``
(bounds rounded outwards, :func:`angle_bounds`). The ``k``-th smallest of values
known in intervals ``[lo_i, hi_i]`` lies in ``[L, U]``, ``L`` the ``k``-th smallest
``lo``, ``U`` the ``k``-th smallest ``hi``; a pair with ``hi < L`` is below it, one
with ``lo > U`` above it; every other pair is recomputed exactly in float64 (today's
formula: unit rows, their dot product, the atan2 form near 0 and 180 degrees) and the
``(k - #below)``-th of them is the order statistic (:func:`exact_medians`). The
medians are those of the float64 angles, to the last bit wherever the pair at the
median was recomputed by the same operations (a GEMM entry and a dot product may
differ in the last bits: about 1e-14 degrees).

When more than ``max(_REPAIR_MIN, pairs / _REPAIR_FRACTION)`` pairs of a stage are
ambiguous (ties and near-ties at a median), or a norm is outside
``[_NORM_MIN, _NORM_MAX]`` (float32 under- or overflow could break the bound),
:func:`exact_medians` gives up (None) and the stage is computed in float64; so does
the Gram pass itself when, an eighth of the way through, :func:`predicted_repairs`
already passes that limit (angles crowded at their medians: on 800 rows of
relu(class mean + noise) with 102,400 features, 4.8 % of the pairs were ambiguous).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .kernels import degrees
from .pairs import AnglePool
from .rows import RowLoader

__all__ = [
    "float32_products", "bound_holds", "cos_bound", "angle_bounds", "repair_limit", "predicted_repairs",
    "probe_after", "exact_medians", "exact_angles",
]

_CHUNK = 1024  # columns per float32 GEMM: gamma_1024 = 6.1e-5
_BATCH_BYTES = 32 << 20  # float32 GEMM results held at once (batched chunks)
_REPAIR_MIN = 4096  # ambiguous pairs always repaired ...
_REPAIR_FRACTION = 100  # ... or 1 % of the pairs, whichever is more; beyond: the stage in float64
_PROBE_PAIRS = 20_000  # predict the repairs once this many pairs (and an eighth of all) are computed
_PROBE_KEY = 50  # pairs of a key seen for its prediction
_NORM_MIN = 1e-12  # valid rows' norms within these bounds: no float32 under- or overflow matters
_NORM_MAX = 1e18
_PAIRS_PER_THREAD = 8  # fewer pairs per thread: one thread (a thread's start costs about a pair)
_U32 = 2.0 ** -24
_U64 = 2.0 ** -53


def float32_products(
    a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor | None = None, ib: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a[ia] @ b[ib].T`` (float32 rows, default all) as float32 GEMMs over ``_CHUNK`` columns, summed in float64.

    Chunks are batched (one ``torch.bmm`` for many) so that a tile is a few calls whatever
    the width of the rows; the result is float64, within :func:`cos_bound` times the
    rows' norms of the exact products.
    """
    m = a.shape[0] if ia is None else int(ia.numel())
    q = b.shape[0] if ib is None else int(ib.numel())
    d = a.shape[1]
    out = torch.zeros((m, q), dtype=torch.float64)
    if m == 0 or q == 0:
        return out
    group = max(1, _BATCH_BYTES // (4 * m * q))
    width = group * _CHUNK
    for c0 in range(0, d, width):
        c1 = min(d, c0 + width)
        left = a[:, c0:c1] if ia is None else a[ia, c0:c1]
        right = b[:, c0:c1] if ib is None else b[ib, c0:c1]
        full = (c1 - c0) // _CHUNK * _CHUNK
        if full:
            pa = left[:, :full].unflatten(1, (full // _CHUNK, _CHUNK)).transpose(0, 1)
            pb = right[:, :full].unflatten(1, (full // _CHUNK, _CHUNK)).transpose(0, 1)
            chunks = torch.bmm(pa, pb.transpose(1, 2)).numpy()
            out += torch.from_numpy(np.add.reduce(chunks, axis=0, dtype=np.float64))  # numpy: 4x torch's sum
        if full < c1 - c0:
            out += torch.mm(left[:, full:], right[:, full:].T)
    return out


def _gamma(k: float, u: float) -> float:
    return k * u / (1.0 - k * u)


def bound_holds(min_norm: float, max_norm: float) -> bool:
    """Whether valid rows with norms in ``[min_norm, max_norm]`` keep :func:`cos_bound` (no float32 overflow,
    negligible underflow)."""
    return _NORM_MIN <= min_norm and max_norm <= _NORM_MAX


def cos_bound(d: int, *, rounded: bool, min_norm: float) -> float:
    """Bound on ``|c - c64|``: a cosine ``c`` of :func:`float32_products` against the float64 path's ``c64``.

    Parameters
    ----------
    d : int
        Values per row.
    rounded : bool
        The rows were rounded to float32 (centred rows): ``2 u + u**2`` more.
    min_norm : float
        The smallest norm of a valid row (the underflow terms, at most ``2**-149``
        per operation, relative to the product of two norms).

    Returns
    -------
    float
        ``e``: both ``c64`` and the exact cosine lie within ``e`` of ``c``.
    """
    nc = -(-d // _CHUNK)
    g32 = _gamma(min(d, _CHUNK), _U32)
    e32 = g32 * (1.0 + _U32) ** 2 + ((2.0 * _U32 + _U32 ** 2) if rounded else 0.0)
    # float64: the sum of nc chunk results, norms and divisions (here and in c64's own path), generously
    e64 = _gamma(nc + 1, _U64) * (1.0 + e32) + 8.0 * _gamma(d + 8, _U64)
    tiny = 2.0 ** -149
    under = 2.0 * (d + nc) * tiny / min_norm ** 2 + ((2.0 * math.sqrt(d) * tiny / min_norm) if rounded else 0.0)
    return (e32 + e64 + under) * (1.0 + 1e-6)


def angle_bounds(cos: np.ndarray, e: float) -> tuple[np.ndarray, np.ndarray]:
    """Degrees ``[lo, hi]`` holding the angle of every cosine known to ``e``, rounded outwards."""
    top = np.minimum(1.0, np.nextafter(cos + e, np.inf))
    bottom = np.maximum(-1.0, np.nextafter(cos - e, -np.inf))
    lo = np.degrees(np.arccos(top))
    hi = np.degrees(np.arccos(bottom))
    # arccos and degrees are within an ulp or two; the float64 path's atan2 form within a few
    return lo * (1.0 - 1e-12) - 1e-12, hi * (1.0 + 1e-12) + 1e-12


def _middle(n: int) -> list[int]:
    """0-based ranks of the median of ``n`` values: one, or the two middle ones."""
    return [n // 2] if n % 2 else [n // 2 - 1, n // 2]


def probe_after(pairs: int) -> int:
    """Pairs computed (of ``pairs`` in all) after which :func:`predicted_repairs` is asked once."""
    return max(_PROBE_PAIRS, pairs // 8)


def repair_limit(pairs: int) -> int:
    """The most ambiguous pairs repaired among ``pairs`` (beyond: float64 products are cheaper)."""
    return max(_REPAIR_MIN, pairs // _REPAIR_FRACTION)


def predicted_repairs(pool: AnglePool, e: float) -> float:
    """The ambiguous pairs :func:`exact_medians` would repair, predicted from a part of the pool.

    A pair is ambiguous when its cosine is within about ``2 e`` of its key's median; the
    fraction of each key's pairs seen so far (at least ``_PROBE_KEY`` of them) that are,
    times the key's pairs in all. Lets a stage whose angles crowd at their medians (wide
    rows of near-random directions) give up early rather than after every float32 product.
    """
    total = 0.0
    for key in np.flatnonzero(pool.size >= _PROBE_KEY):
        o, n = int(pool.offset[key]), int(pool.size[key])
        c = pool.data[o:o + n]
        near = np.count_nonzero(np.abs(c - np.median(c)) <= 2.0 * e)
        total += near / n * float(pool.capacity[key])
    return total


def exact_medians(
    pool: AnglePool, e: float, angles: Callable[[np.ndarray], np.ndarray],
) -> dict[int, float] | None:
    """Exact medians of every key of ``pool`` (cosines and pair ids), repairing only the ambiguous pairs.

    ``angles(ids)`` gives the float64 angles (degrees) of the pairs ``ids`` (increasing).
    Returns None (the caller computes in float64) when too many pairs are ambiguous.
    """
    assert pool.ids is not None
    plans = []
    wanted = []
    total = 0
    for key in np.flatnonzero(pool.size):
        o, n = int(pool.offset[key]), int(pool.size[key])
        lo, hi = angle_bounds(pool.data[o:o + n], e)
        ids = pool.ids[o:o + n]
        parts = []
        for k in _middle(n):
            low = np.partition(lo, k)[k]
            up = np.partition(hi, k)[k]
            below = int(np.count_nonzero(hi < low))
            cand = ids[(hi >= low) & (lo <= up)]
            parts.append((k, below, cand))
            wanted.append(cand)
            total += cand.size
        plans.append((int(key), parts))
    if total > repair_limit(int(pool.size.sum())):
        return None
    every = np.unique(np.concatenate(wanted)) if wanted else np.empty(0, dtype=np.int64)
    exact = angles(every)
    medians: dict[int, float] = {}
    for key, parts in plans:
        picks = []
        for k, below, cand in parts:
            values = np.sort(exact[np.searchsorted(every, cand)])
            rank = k - below
            if not 0 <= rank < values.size:  # pragma: no cover - only if a bound were wrong
                return None
            picks.append(values[rank])
        medians[key] = float(np.median(np.array(picks)))
    return medians


def _pair_dots(x: np.ndarray, pa: np.ndarray, pb: np.ndarray, center: np.ndarray | None) -> np.ndarray:
    """Float64 dot products of rows ``x[pa[p]]`` and ``x[pb[p]]`` (minus ``center`` when given), pair by pair.

    Each pair is one numpy call (the same operations whatever the split); the pairs are split
    among torch's intra-op thread count of threads (numpy releases the GIL in them).
    """
    dots = np.empty(pa.size)

    def part(lo: int, hi: int) -> None:
        for p in range(lo, hi):
            if center is None:
                dots[p] = np.einsum("i,i->", x[pa[p]], x[pb[p]], dtype=np.float64)
            else:
                dots[p] = np.dot(np.subtract(x[pa[p]], center), np.subtract(x[pb[p]], center))

    parts = max(1, min(torch.get_num_threads(), pa.size // _PAIRS_PER_THREAD))
    if parts == 1:
        part(0, pa.size)
        return dots
    cuts = np.linspace(0, pa.size, parts + 1).astype(int)
    with ThreadPoolExecutor(parts) as pool:
        for done in [pool.submit(part, int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]:
            done.result()
    return dots


def exact_angles(ids: np.ndarray, loader: RowLoader) -> np.ndarray:
    """Float64 angles (degrees) of the pairs ``ids`` (``i * n + j``, increasing), as the float64 path computes them.

    The rows taking part (as many as the loader's panel holds at once; more in turns) come
    from the panel when it still holds them as read, else are read again; a cosine is the
    float64 dot product of the two (centred) rows divided by their float64 norms (the
    float64 path's dot product is of the unit rows: the same to rounding, about 1e-16).
    Within about 0.81 degrees of 0 or 180 the angle is the atan2 form of the unit rows, as
    in the float64 path (:func:`.kernels.degrees`).
    """
    n, d = loader.src.n, loader.src.d
    assert loader.norms is not None
    out = np.empty(ids.size)
    first, second = ids // n, ids % n
    cap = loader.tiling.panel_rows
    mean = loader.mean
    start = 0
    while start < ids.size:
        # 1. The pairs of as many rows as the panel holds.
        rows: set[int] = set()
        end = start
        while end < ids.size:
            new = {int(first[end]), int(second[end])} - rows
            if end > start and len(rows) + len(new) > cap:
                break
            rows |= new
            end += 1
        pick = np.array(sorted(rows), dtype=np.int64)
        x, local = loader.raw_rows(pick)
        norms = torch.from_numpy(loader.norms[pick])
        pa = local[np.searchsorted(pick, first[start:end])]
        pb = local[np.searchsorted(pick, second[start:end])]
        rank_a = torch.from_numpy(np.searchsorted(pick, first[start:end]))
        rank_b = torch.from_numpy(np.searchsorted(pick, second[start:end]))
        raw = torch.from_numpy(x)
        # 2. Cosines: float64 dot products of the (centred) rows, divided by the float64 norms. Not
        # centred: products of float32 values are exact in float64, summed in float64 by one pass over
        # the two rows (no float64 copy).
        dots = _pair_dots(x, pa, pb, None if mean is None else mean.numpy())
        cos = dots / (loader.norms[first[start:end]] * loader.norms[second[start:end]])

        def unit(index: np.ndarray) -> torch.Tensor:
            rows64 = raw[torch.from_numpy(np.asarray(index, dtype=np.int64))].to(torch.float64)
            if mean is not None:
                rows64 -= mean
            return rows64

        def unit_a(index: np.ndarray) -> torch.Tensor:
            return unit(pa[index]) / norms[rank_a[index]][:, None]

        def unit_b(index: np.ndarray) -> torch.Tensor:
            return unit(pb[index]) / norms[rank_b[index]][:, None]

        out[start:end] = degrees(cos, unit_a, unit_b, lambda: (np.arange(end - start),) * 2, d)
        start = end
    return out
