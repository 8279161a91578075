"""Lanczos with full reorthogonalization for the extreme eigenvalues of one symmetric PSD operator.

The batched, GPU-ready iteration of :mod:`auditor.analysis.lanczos` runs many small per-frequency operators at
once; this one runs one large operator (a zero-padded block's Gram matrix, or its inverse) to a tight residual,
keeping the whole basis.

The zero boundary's ``sigma_max^2`` (the top eigenvalue of a Gram operator) and ``1 / sigma_min^2`` (the top one of
its inverse) both come from :func:`lanczos`, stopped by the Ritz residual test of Parlett [1]_, Thm 4.5.1: an
eigenvalue lies within ``|beta_k s_k|`` of the Ritz value.

References
----------
.. [1] B. N. Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998.
.. [2] J. W. Daniel, W. B. Gragg, L. Kaufman, G. W. Stewart, "Reorthogonalization and stable algorithms for
   updating the Gram-Schmidt QR factorization", Math. Comp. 30 (1976).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LanczosRun", "lanczos", "restarted_top"]

_SEED = 0
_DGKS = 1 / math.sqrt(2)  # a reorthogonalization pass that keeps more of the norm than this needs no second one


@dataclass(frozen=True)
class LanczosRun:
    """What a :func:`lanczos` run found: the top Ritz value and whether its residual test passed, the Rayleigh
    quotient of the smallest Ritz vector (``>= lambda_min``) and the smallest Ritz value, the products spent."""

    top: float
    top_converged: bool
    bottom_upper: float  # Rayleigh quotient of the smallest Ritz vector: >= lambda_min
    bottom_ritz: float
    steps: int


def lanczos(apply: Callable[[torch.Tensor], torch.Tensor], n: int, max_steps: int, tol: float,
             *, want_bottom: bool, dtype: torch.dtype = torch.float64) -> LanczosRun:
    """Lanczos with full reorthogonalization on a symmetric PSD operator of size ``n``.

    Stops when the top Ritz pair's residual ``|beta_k s_k| <= tol theta`` (an
    eigenvalue lies within it, Parlett Thm 4.5.1), on an invariant subspace,
    or after ``max_steps`` products. With ``want_bottom`` the smallest Ritz
    vector's Rayleigh quotient is evaluated (one more product): an upper bound
    of the smallest eigenvalue.
    """
    from scipy.linalg import eigh_tridiagonal

    generator = torch.Generator().manual_seed(_SEED)
    steps = max(1, min(n, max_steps))
    start = torch.randn(n, dtype=dtype, generator=generator)
    basis = torch.empty(steps + 1, n, dtype=dtype)  # pages are committed as rows are written
    basis[0] = start / torch.linalg.vector_norm(start)
    alpha, beta = [], []
    top, converged, vectors, values, used = 0.0, False, None, None, 0
    for j in range(steps):
        w = apply(basis[j])
        used += 1
        alpha.append(float(basis[j] @ w))
        # the three-term recurrence, then full reorthogonalization: once, and again where that pass removed
        # much of w (the Daniel-Gragg-Kaufman-Stewart test; twice is enough)
        w = w - alpha[-1] * basis[j] - (beta[-1] * basis[j - 1] if j else 0.0)
        before = float(torch.linalg.vector_norm(w))
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
            norm = float(torch.linalg.vector_norm(w))
            if norm > _DGKS * before:
                break
            before = norm
        beta.append(norm)
        # LAPACK's tridiagonal solver: numpy's dense eigh on a busy machine's threads took ~90 ms for k = 72
        values, vectors = eigh_tridiagonal(np.asarray(alpha), np.asarray(beta[:-1]))
        top = float(values[-1])
        residual = abs(norm * vectors[-1, -1])
        invariant = norm <= 64 * np.finfo(float).eps * max(abs(top), np.finfo(float).tiny)
        if invariant or residual <= tol * abs(top):
            converged = True
            break
        basis[j + 1] = w / norm
    k = len(alpha)
    bottom_upper = bottom_ritz = float(values[0]) if values is not None else 0.0
    if want_bottom and vectors is not None:
        y = basis[:k].T @ torch.from_numpy(vectors[:, 0]).to(dtype)
        y = y / torch.linalg.vector_norm(y)
        bottom_upper = float(y @ apply(y))
        used += 1
    return LanczosRun(top, converged, bottom_upper, bottom_ritz, used)


def restarted_top(apply: Callable[[torch.Tensor], torch.Tensor], n: int, max_products: int, tol: float,
                  *, basis: int = 20) -> tuple[float, bool, int]:
    """The top eigenvalue by ARPACK's implicitly restarted Lanczos, keeping ``basis`` vectors.

    For operators whose full basis of ``max_products`` vectors would not fit: about ``max_products`` products
    (restarts of ``basis`` vectors), stopped by ARPACK's test ``||A y - theta y|| <= tol |theta|``, the same
    Ritz residual test as :func:`lanczos`.

    Returns
    -------
    (float, bool, int)
        The top Ritz value (a lower bound of the eigenvalue when not converged), whether it converged, and the
        products spent.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    used = 0

    def matvec(x: np.ndarray) -> np.ndarray:
        nonlocal used
        used += 1
        return apply(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).ravel())).numpy()

    ncv = max(2, min(basis, n - 1))
    start = np.random.default_rng(_SEED).standard_normal(n)
    operator = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    try:
        value = eigsh(operator, k=1, which="LA", tol=tol, ncv=ncv, v0=start, maxiter=max(1, max_products // ncv),
                      return_eigenvectors=False)[0]
        return float(value), True, used
    except ArpackNoConvergence as err:
        values = err.eigenvalues
        return (float(np.max(values)) if len(values) else 0.0), False, used
