"""Which pairs of samples are kept (every pair, or a seeded sample of them per class pair) and their angles."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .kernels import unrank_pairs
from .tiling import Tiling

__all__ = ["AnglePool", "PairPlan", "pair_key", "plan_pairs"]


class AnglePool:
    """Angles of every class pair in one preallocated float64 array.

    Key ``c * n_classes + d`` (``c <= d``) owns ``capacity[key]`` slots from
    ``offset[key]``; tiles append to many keys at once without a Python loop.
    With ``ids`` the pool holds cosines from float32 products instead (see
    :mod:`.exact`) and each pair's id ``i * n_samples + j`` beside it (8 more bytes
    a pair); :attr:`medians` then holds the exact medians once repaired.
    """

    def __init__(self, capacity: np.ndarray, *, ids: bool = False) -> None:
        self.capacity = capacity
        self.offset = np.concatenate([[0], np.cumsum(capacity)[:-1]]).astype(np.int64)
        self.size = np.zeros_like(capacity)
        self.data = np.empty(int(capacity.sum()))
        self.ids = np.empty(int(capacity.sum()), dtype=np.int64) if ids else None
        self.medians: dict[int, float] | None = None  # set by exact.exact_medians (ids only)

    def add(self, keys: np.ndarray, values: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Append ``values`` (and, for a pool with ids, the pairs' ``ids``) to their ``keys``."""
        if keys.size == 0:
            return
        # 1. Group by key (stable), 2. rank inside each group, 3. write after the fill.
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        count = np.diff(np.r_[start, keys.size])
        rank = np.arange(keys.size) - np.repeat(start, count)
        slots = self.offset[keys] + self.size[keys] + rank
        self.data[slots] = values[order]
        if self.ids is not None:
            assert ids is not None
            self.ids[slots] = ids[order]
        self.size[keys[start]] += count

    def median(self, key: int) -> float | None:
        """The median angle of ``key`` (None without pairs)."""
        n = int(self.size[key])
        if n == 0:
            return None
        if self.medians is not None:
            return self.medians[key]
        o = int(self.offset[key])
        return float(np.median(self.data[o:o + n], overwrite_input=True))


def pair_key(a: np.ndarray, b: np.ndarray, n_classes: int) -> np.ndarray:
    """Key ``min * n_classes + max`` of the class pairs ``(a, b)``."""
    return np.minimum(a, b) * n_classes + np.maximum(a, b)


@dataclass
class PairPlan:
    """Where the pairs go, per class pair key ``c * n_classes + d`` (``c <= d``).

    Attributes
    ----------
    sampled : ndarray of bool
        Keys whose pairs are a seeded sample of ``max_pairs`` (more pairs than that).
    full : ndarray of bool
        Keys that need every entry (exact medians, and the class Grams with ``subspace_k``).
    pool : AnglePool
        The angles kept, per key.
    tile_pairs : dict of int to (ndarray, ndarray, ndarray)
        For the sampled keys: the drawn pairs ``(first, second, key)``, bucketed by the tile
        that computes them.
    """

    sampled: np.ndarray
    full: np.ndarray
    pool: AnglePool
    tile_pairs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


def plan_pairs(
    labels: np.ndarray, raw_valid: np.ndarray | None, label_counts: np.ndarray, n_classes: int, *,
    max_pairs: int | None, subspace_k: int | None, seed: int, tiling: Tiling, ids: bool = False,
) -> PairPlan:
    """Size the pool per class pair and draw the sampled pairs (``max_pairs``).

    ``raw_valid`` (from the pre-scan; None without one) marks the samples with a direction;
    ``ids``: the pool keeps cosines and pair ids (float32 products, :mod:`.exact`).
    """
    nk = n_classes
    counts = (
        np.bincount(labels[raw_valid], minlength=nk)
        if raw_valid is not None else label_counts
    ).astype(np.int64)
    # 1. Pairs per key: n (n - 1) / 2 within a class, n_c n_d between classes.
    pop = np.outer(counts, counts)
    pop[np.diag_indices(nk)] = counts * (counts - 1) // 2
    pop = np.triu(pop)
    upper = np.triu(np.ones((nk, nk), dtype=bool)).ravel()
    pop = pop.ravel()
    k = max_pairs
    sampled = upper & (pop > k) if k is not None else np.zeros(nk * nk, dtype=bool)
    full = upper & ~sampled
    if subspace_k:  # class Grams need every intra-class entry
        full[np.arange(nk) * (nk + 1)] = True
    plan = PairPlan(sampled, full, AnglePool(np.where(sampled, k or 0, pop), ids=ids))
    if not sampled.any():
        return plan
    # 2. Uniform without replacement over the pairs of valid samples, key by key.
    rng = np.random.default_rng(seed)
    firsts, seconds, keys = [], [], []
    for key in np.flatnonzero(sampled):
        c, d = divmod(int(key), nk)
        draw = np.sort(rng.choice(int(pop[key]), size=k, replace=False))
        vc = np.flatnonzero(raw_valid & (labels == c))
        if c == d:
            i, j = unrank_pairs(draw, int(counts[c]))
            g1, g2 = vc[i], vc[j]
        else:
            vd = np.flatnonzero(raw_valid & (labels == d))
            g1, g2 = vc[draw // counts[d]], vd[draw % counts[d]]
        firsts.append(np.minimum(g1, g2))
        seconds.append(np.maximum(g1, g2))
        keys.append(np.full(k, key))
    # 3. Bucket the drawn pairs by the tile that computes them.
    g1, g2, key = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(keys)
    tile = tiling.tile_of(g1, g2)
    order = np.argsort(tile, kind="stable")
    tile, g1, g2, key = tile[order], g1[order], g2[order], key[order]
    cuts = np.flatnonzero(np.diff(tile)) + 1
    for part in np.split(np.arange(tile.size), cuts):
        plan.tile_pairs[int(tile[part[0]])] = (g1[part], g2[part], key[part])
    return plan
