"""Class subspaces (``subspace_k``): each class's Gram matrix, filled by the Gram pass, then principal angles."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .rows import LoadedRows, RowLoader

__all__ = ["ClassGrams"]

_RANK_RTOL = 1e-12  # eigenvalues of a class Gram below rtol * max are rank-deficient


class ClassGrams:
    """The Gram matrix of each class's unit rows (flattened, both halves), and the subspaces they give.

    ``local[i]`` is the position of sample ``i`` within its class; class ``c``'s
    ``n_c x n_c`` matrix starts at ``offset[c]`` of ``data``.
    """

    def __init__(self, labels: np.ndarray, label_counts: np.ndarray, n_classes: int) -> None:
        self.labels = labels
        self.label_counts = label_counts
        self.n_classes = n_classes
        self.local = np.empty(labels.size, dtype=np.int64)
        for c in range(n_classes):
            idx = np.flatnonzero(labels == c)
            self.local[idx] = np.arange(idx.size)
        sizes = label_counts.astype(np.int64) ** 2
        self.offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.data: np.ndarray | None = np.zeros(int(sizes.sum()))

    def add(self, g: np.ndarray, mask: np.ndarray, rows: LoadedRows, cols: LoadedRows) -> None:
        """Same-class entries of ``g`` into the class Gram matrices (both halves)."""
        assert self.data is not None
        ri, ci = np.nonzero(mask)
        c = rows.labels[ri]
        li, lj = self.local[rows.start + ri], self.local[cols.start + ci]
        n = self.label_counts[c]
        base = self.offset[c]
        self.data[base + li * n + lj] = g[ri, ci]
        self.data[base + lj * n + li] = g[ri, ci]

    def subspace_angles(
        self, k_max: int, loader: RowLoader, panels: Sequence[tuple[int, int]], tick: Callable[[], None],
    ) -> tuple[list[int], dict[tuple[int, int], float | None]]:
        """Principal subspaces from the class Grams (method of snapshots), then angles.

        Returns each class's subspace dimension and, per class pair ``(c, d)``, the
        median principal angle in degrees (None when either class has no valid row).
        Frees the Gram matrices.
        """
        from scipy.linalg import subspace_angles  # start-up cost: scipy only when subspaces are asked for

        assert self.data is not None
        # 1. Top eigenpairs of each class Gram over its valid rows (unit diagonal).
        coef: list[np.ndarray | None] = []
        dims: list[int] = []
        for c in range(self.n_classes):
            m = int(self.label_counts[c])
            keep = loader.valid[self.labels == c]
            if not keep.any():
                coef.append(None)
                dims.append(0)
                continue
            base = int(self.offset[c])
            gram = self.data[base:base + m * m].reshape(m, m)
            np.fill_diagonal(gram, 1.0)
            lam, vec = np.linalg.eigh(gram[np.ix_(keep, keep)])
            lam, vec = lam[::-1], vec[:, ::-1]
            k = int(min(k_max, np.count_nonzero(lam > _RANK_RTOL * lam[0])))
            w = np.zeros((m, k))
            w[keep] = vec[:, :k] / np.sqrt(lam[:k])
            coef.append(w)
            dims.append(k)
        self.data = None  # free
        # 2. One more pass: V_c = U_c^T W_c Lambda_c^{-1/2}, shape (d, k_c).
        basis = [
            torch.zeros((loader.src.d, k), dtype=torch.float64) if w is not None else None
            for w, k in zip(coef, dims)
        ]
        for p0, p1 in panels:
            rows = loader.load(p0, p1)
            for c in np.unique(rows.labels[rows.valid]):
                pos = np.flatnonzero(rows.valid & (rows.labels == c))
                w = torch.from_numpy(np.ascontiguousarray(coef[c][self.local[p0 + pos]]))
                pick = torch.from_numpy(pos)
                for k0, k1 in loader.tiling.column_blocks():  # one block unless the rows are wide
                    basis[c][k0:k1] += rows.unit(k0, k1, pick).T @ w
            tick()
        # 3. Principal angles per class pair, median in degrees.
        angles: dict[tuple[int, int], float | None] = {}
        for c in range(self.n_classes):
            for d in range(c + 1, self.n_classes):
                if basis[c] is None or basis[d] is None:
                    angles[(c, d)] = None
                    continue
                theta = subspace_angles(basis[c].numpy(), basis[d].numpy())
                angles[(c, d)] = float(np.degrees(np.median(theta)))
        return dims, angles
