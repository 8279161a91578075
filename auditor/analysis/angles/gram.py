"""One :func:`~auditor.analysis.angles.median_angles` call: the passes over the rows, in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .exact import bound_holds, cos_bound, exact_angles, exact_medians, predicted_repairs, probe_after, repair_limit
from .kernels import degrees
from .pairs import AnglePool, PairPlan, pair_key, plan_pairs
from .products import GramProducts
from .result import StageAngles, stage_angles
from .rows import LoadedRows, RowLoader
from .source import RowSource
from .subspaces import ClassGrams
from .tiling import Tiling

__all__ = ["GramRun", "Progress", "Share"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Share:
    """This process's part of a stage's Gram tiles among ``size`` processes (torchrun), and how the parts meet.

    Attributes
    ----------
    rank, size : int
        This process and the number of processes.
    split : callable
        ``split(costs, size)``: the tile numbers of each process, balancing the costs; the
        same on every process (:func:`auditor.distributed.split`).
    everyone : callable
        ``everyone(work)``: ``work()`` on every process, every process's result in rank
        order on every process (a failure anywhere raises everywhere).
    on_main : callable
        ``on_main(work)``: ``work()`` on rank 0 alone, its result on every process (the
        float64 products, whose rounding depends on the thread count).
    """

    rank: int
    size: int
    split: Callable[[list[float], int], list[list[int]]]
    everyone: Callable[[Callable[[], Any]], list[Any]]
    on_main: Callable[[Callable[[], Any]], Any]


class GramRun:
    """State of one :func:`median_angles` call: scan, Gram tiles, subspaces.

    The rows are read in panels (and tiles) of :attr:`tiling` so that a stage
    larger than memory streams from HDF5; :meth:`run` makes the passes in order
    and each pass fills the state the next one reads:

    1. the pre-scan (with ``center`` or ``max_pairs``, :meth:`RowLoader.prescan`):
       the rows' validity and the stage mean when centring;
    2. the plan (:func:`plan_pairs`): per class pair key ``c * n_classes + d``,
       whether it is sampled or kept in full, the pool of angles it keeps, and the
       sampled pairs bucketed by tile;
    3. the Gram pass (:meth:`_gram_pass`): every tile of the row Gram matrix once;
       angles go to the pool (and, with ``subspace_k``, into the :class:`ClassGrams`);
       with ``float32`` products, cosines and pair ids, then the exact medians
       (:meth:`_repair`, :mod:`.exact`; ``gave_up`` when the caller must use float64);
    4. the subspaces (with ``subspace_k``, :meth:`ClassGrams.subspace_angles`):
       principal angles between the class subspaces.

    :meth:`result` turns the pool into medians (``StageAngles``). ``done`` /
    ``total`` count the tiles and panels for ``progress``.
    """

    def __init__(
        self, source: RowSource, labels: np.ndarray, n_classes: int, *, center: bool,
        max_pairs: int | None, block_rows: int, subspace_k: int | None,
        progress: Progress | None, float32: bool = False, share: Share | None = None,
    ) -> None:
        self.src = source
        self.labels = labels
        self.n_classes = n_classes
        self.max_pairs = max_pairs
        self.subspace_k = subspace_k
        self.progress = progress
        self.center = center
        self.prescan = center or max_pairs is not None
        self.float32 = float32
        self.tiling = (
            Tiling.of_float32(source.n, block_rows, source.d, parts=share.size if share else 1) if float32
            else Tiling.of(source.n, block_rows, source.d, source.hold.itemsize)
        )
        self.label_counts = np.bincount(labels, minlength=n_classes)
        self.rows = RowLoader(source, labels, self.tiling)
        self.products = GramProducts(self.tiling)
        self.done = 0
        panels = len(self.tiling.panels)
        self.total = self.tiling.count_tiles() + (panels if self.prescan else 0)
        self.total += panels if subspace_k else 0
        self.plan: PairPlan | None = None  # by run()
        self.grams: ClassGrams | None = None  # with subspace_k
        self.subspace_angles: dict[tuple[int, int], float | None] | None = None
        self.subspace_dims: list[int] | None = None
        self.share = share if float32 and share is not None and share.size > 1 else None
        self.mine = self._my_tiles() if self.share is not None else None  # tiles of this process (None: all)
        self.ambiguous = 0  # float32: pairs recomputed in float64
        self.gave_up = False  # float32: the bound does not hold or too many pairs are ambiguous: use float64
        self.probed = False  # float32: the repairs were predicted (see _hopeless)

    def run(self, seed: int) -> GramRun:
        """Every pass, in order; returns self."""
        # 1. Optional pre-scan: validate, find zero rows, stage mean.
        if self.prescan:
            self.rows.prescan(self.tiling.panels, self.center, self._tick)
        # 2. Where the pairs go: exact keys, or sampled pairs bucketed by tile.
        self.plan = plan_pairs(
            self.labels, self.rows.raw_valid, self.label_counts, self.n_classes,
            max_pairs=self.max_pairs, subspace_k=self.subspace_k, seed=seed, tiling=self.tiling,
            ids=self.float32,
        )
        if self.subspace_k:
            self.grams = ClassGrams(self.labels, self.label_counts, self.n_classes)
        # 3. The Gram tiles: every pair once (this process's tiles, then every process's pairs together);
        # float32 products: then the exact medians (the same on every process).
        if self.share is not None:
            self._shared_pass(self.share, self.plan)
        else:
            self._gram_pass(self.plan)
        if self.float32 and not self.gave_up:
            self._repair(self.plan)
        # 4. Optional principal subspaces (one more pass).
        if self.subspace_k:
            assert self.grams is not None
            self.subspace_dims, self.subspace_angles = self.grams.subspace_angles(
                self.subspace_k, self.rows, self.tiling.panels, self._tick,
            )
        return self

    def result(self, names: list[str]) -> StageAngles:
        """The medians (after :meth:`run`)."""
        assert self.plan is not None
        return stage_angles(
            names, self.labels, self.rows.valid, self.label_counts, self.plan.pool, self.plan.sampled,
            self.subspace_angles, self.subspace_dims,
        )

    def _repair(self, plan: PairPlan) -> None:
        """Exact medians from the float32 cosines (:mod:`.exact`); ``gave_up`` when the bound cannot be used."""
        low, high = self.rows.norm_range
        if not plan.pool.size.any():
            plan.pool.medians = {}
            return
        if not bound_holds(low, high):
            self.gave_up = True
            return
        e = cos_bound(self.src.d, rounded=self.center, min_norm=low)
        counted: list[int] = []

        def angles(ids: np.ndarray) -> np.ndarray:
            counted.append(ids.size)
            share = self.share
            if share is None:
                return exact_angles(ids, self.rows)
            # Under torchrun each process repairs a part (each pair computed alike anywhere).
            cuts = np.linspace(0, ids.size, share.size + 1).astype(np.int64)
            mine = ids[cuts[share.rank]:cuts[share.rank + 1]]
            return np.concatenate(share.everyone(lambda: exact_angles(mine, self.rows)))

        medians = exact_medians(plan.pool, e, angles)
        self.ambiguous = sum(counted)
        if medians is None:
            self.gave_up = True
        plan.pool.medians = medians

    def _my_tiles(self) -> set[int]:
        """The tiles this process computes: the tiles in pass order, split by their pairs."""
        assert self.share is not None
        n, tr, sr = self.src.n, self.tiling.tile_rows, self.tiling.strip
        costs: list[float] = []
        for p0, p1 in self.tiling.panels:
            costs += [float(min(sr, p1 - s0) * (p1 - s0)) for s0 in range(p0, p1, sr)]
            costs += [float((p1 - p0) * min(tr, n - j0)) for j0 in range(p1, n, tr)]
        return set(self.share.split(costs, self.share.size)[self.share.rank])

    def _shared_pass(self, share: Share, plan: PairPlan) -> None:
        """This process's tiles, then every process's cosines and pair ids in one pool (on every process)."""
        pool = plan.pool

        def mine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            self._gram_pass(plan)
            assert pool.ids is not None
            used = np.flatnonzero(pool.size)
            keys = np.repeat(used, pool.size[used])
            at = np.concatenate([np.arange(pool.offset[k], pool.offset[k] + pool.size[k]) for k in used]) \
                if used.size else np.empty(0, dtype=np.int64)
            return keys, pool.data[at], pool.ids[at]

        parts = share.everyone(mine)
        merged = AnglePool(pool.capacity, ids=True)
        for keys, values, ids in parts:
            merged.add(keys, values, ids)
        plan.pool = merged

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    # ------------------------------------------------------------------ the Gram pass

    def _gram_pass(self, plan: PairPlan) -> None:
        """Every pair once: panel strips (upper triangle) and streamed tiles."""
        n, tr, sr = self.src.n, self.tiling.tile_rows, self.tiling.strip
        loader = self.rows
        tile = 0
        for p0, p1 in self.tiling.panels:
            first = p0 == 0
            panel = loader.load(p0, p1)
            for s0 in range(p0, p1, sr):
                s1 = min(s0 + sr, p1)
                if not loader.bad_rows and self._owned(tile):
                    rows = panel.sub(s0 - p0, s1 - p0)
                    cols = panel.sub(s0 - p0, p1 - p0)
                    self._tile(plan, tile, rows, cols, triangular=True)
                    if self._hopeless(plan):
                        return
                tile += 1
                self._tick()
            for j0 in range(p1, n, tr):
                j1 = min(j0 + tr, n)
                if first and j0 >= loader.scanned:
                    block = loader.load(j0, j1, tile=True)  # first sight: always read
                    if not loader.bad_rows and self._owned(tile):
                        self._tile(plan, tile, panel, block, triangular=False)
                elif self._owned(tile) and self._needed(plan, tile, panel, j0, j1):
                    block = loader.load(j0, j1, tile=True)
                    self._tile(plan, tile, panel, block, triangular=False)
                if self._hopeless(plan):
                    return
                tile += 1
                self._tick()
            if first and loader.bad_rows:
                loader.raise_bad()

    def _hopeless(self, plan: PairPlan) -> bool:
        """Float32 products, once an eighth of the pairs are in: whether the repairs will pass their limit
        (then ``gave_up``, and the pass stops). Not when shared: every process must decide alike."""
        pool = plan.pool
        if not self.float32 or self.share is not None or self.probed:
            return False
        total = int(pool.capacity.sum())
        if int(pool.size.sum()) < probe_after(total) or self.rows.bad_rows:
            return False
        self.probed = True
        low, high = self.rows.norm_range
        if not bound_holds(low, high):
            return False  # decided after the pass
        e = cos_bound(self.src.d, rounded=self.center, min_norm=low)
        self.gave_up = predicted_repairs(pool, e) > repair_limit(total)
        return self.gave_up

    def _owned(self, tile: int) -> bool:
        return self.mine is None or tile in self.mine

    def _needed(self, plan: PairPlan, tile: int, panel: LoadedRows, j0: int, j1: int) -> bool:
        """Whether the streamed tile ``[j0, j1)`` against ``panel`` has work."""
        if tile in plan.tile_pairs:
            return True
        nk = self.n_classes
        valid = self.rows.valid
        here_r = np.bincount(panel.labels[panel.valid], minlength=nk) > 0
        here_c = np.bincount(self.labels[j0:j1][valid[j0:j1]], minlength=nk) > 0
        full = plan.full.reshape(nk, nk)
        full = full | full.T
        return bool(full[np.ix_(here_r, here_c)].any())

    def _tile(self, plan: PairPlan, tile: int, rows: LoadedRows, cols: LoadedRows, *, triangular: bool) -> None:
        """One Gram tile, rows x cols; only pairs with col > row when triangular."""
        # 1. Entries wanted in full: valid pairs of exact keys (and of class Grams).
        key = pair_key(rows.labels[:, None], cols.labels[None, :], self.n_classes)
        want = rows.valid[:, None] & cols.valid[None, :]
        if triangular:
            r = rows.start + np.arange(rows.labels.size)
            q = cols.start + np.arange(cols.labels.size)
            want &= q[None, :] > r[:, None]
        want &= plan.full[key]
        pairs = plan.tile_pairs.get(tile)
        # 2. One GEMM for the tile, or a sub-GEMM for the sampled pairs only.
        g = self.products.gram(rows, cols) if want.any() else None
        n = self.src.n
        if g is not None:
            self._take(plan, g, key, want & ~plan.sampled[key], rows, cols)
            if self.grams is not None:
                self.grams.add(g, want & (rows.labels[:, None] == cols.labels[None, :]), rows, cols)
        if pairs is None:
            return
        g1, g2, pkey = pairs
        valid = self.rows.valid
        ok = valid[g1] & valid[g2]  # centring may have zeroed rows
        ri, ci, pkey = g1[ok] - rows.start, g2[ok] - cols.start, pkey[ok]
        if g is not None:
            cos = g[ri, ci]
        else:
            ur, uc = np.unique(ri), np.unique(ci)
            sub = self.products.gram(rows, cols, ur, uc)
            cos = sub[np.searchsorted(ur, ri), np.searchsorted(uc, ci)]
        if self.float32:
            plan.pool.add(pkey, cos, (g1[ok] * n + g2[ok]).astype(np.int64))
            return
        plan.pool.add(pkey, degrees(cos, rows.unit_rows, cols.unit_rows, lambda: (ri, ci), self.src.d))

    def _take(
        self, plan: PairPlan, g: np.ndarray, key: np.ndarray, mask: np.ndarray, rows: LoadedRows, cols: LoadedRows
    ) -> None:
        """Angles of the masked entries of Gram tile ``g`` into the pool."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return
        q = g.shape[1]
        if self.float32:  # cosines and pair ids: the exact medians come after the pass
            ids = (rows.start + idx // q) * self.src.n + cols.start + idx % q
            plan.pool.add(key.ravel()[idx], g.ravel()[idx], ids)
            return
        ang = degrees(g.ravel()[idx], rows.unit_rows, cols.unit_rows, lambda: (idx // q, idx % q), self.src.d)
        plan.pool.add(key.ravel()[idx], ang)
