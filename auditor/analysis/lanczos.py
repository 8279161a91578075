"""Largest eigenvalue of many Hermitian positive semi-definite operators at once.

A batched Lanczos iteration in torch (so the same code runs on a GPU): one
operator per batch row, applied to a batch of vectors by the caller's function.
The report needs only the extreme singular values of every layer and block;
per frequency they are the largest eigenvalue of ``P^H P`` (for ``sigma_max``)
or of ``(P^H P)^{-1}`` (for ``sigma_min``), so matrix-vector products of cost
``O(n^2)`` replace the ``O(n^3)`` eigen-decompositions of the full spectrum.

References
----------
.. [1] B. N. Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998,
   ch. 11 (Ritz values, the residual bound) and 13 (Lanczos in finite
   precision).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["LanczosResult", "largest_eigenvalues", "DEFAULT_TOL"]

# Relative residual at which a Ritz value counts as converged (see the Notes of
# largest_eigenvalues: the eigenvalue error is at most this, so 5e-7 in a
# singular value, and in practice its square over the relative gap).
DEFAULT_TOL = 1e-6


@dataclass(frozen=True)
class LanczosResult:
    """Top Ritz values of a batch of operators.

    Attributes
    ----------
    value : torch.Tensor of shape (batch,), float64
        Largest Ritz value: a lower bound of the largest eigenvalue.
    residual : torch.Tensor of shape (batch,), float64
        ``||B y - value y||`` of its unit Ritz vector ``y``: an eigenvalue of
        ``B`` lies in ``[value - residual, value + residual]``.
    converged : torch.Tensor of shape (batch,), bool
        ``residual <= tol * value`` (or an exact invariant subspace was found).
    steps : int
        Operator applications (each on the rows still running).
    vector : torch.Tensor of shape (batch, n) or None
        The unit Ritz vectors of ``value`` (a warm start for another run).
    """

    value: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    steps: int
    vector: torch.Tensor | None = None


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x^H y`` per batch row: (b, n), (b, n) -> (b,)."""
    return (x.conj() * y).sum(dim=1)


def _combine(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``sum_k coefficients[:, k] basis[:, k]``: (b, k), (b, k, n) -> (b, n)."""
    return torch.bmm(coefficients.unsqueeze(1), basis).squeeze(1)


def _ritz(alpha: torch.Tensor, beta: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top eigenpair of the (steps x steps) tridiagonal matrices; residual ``|beta_k s_k|``."""
    t = torch.diag_embed(alpha[:, :steps])
    if steps > 1:
        off = torch.diag_embed(beta[:, : steps - 1], offset=1)
        t = t + off + off.transpose(1, 2)
    values, vectors = torch.linalg.eigh(t)
    top = values[:, -1]
    coefficients = vectors[:, :, -1]
    residual = (beta[:, steps - 1] * coefficients[:, -1]).abs()
    return top, coefficients, residual


def _subset_apply(apply: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor,
                  batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``apply`` on the batch rows ``rows`` only, for an operator that cannot be restricted.

    The other rows get zero vectors (a linear operator maps them to zero);
    nothing is saved but the bookkeeping stays that of a restricted operator.
    """

    def on_rows(x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(batch, x.shape[1])
        full[rows] = x
        return apply(full)[rows]

    return on_rows


def largest_eigenvalues(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    *,
    tol: float = DEFAULT_TOL,
    max_dim: int = 64,
    restarts: int = 10,
    check_every: int = 1,
    restrict: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> LanczosResult:
    """Largest eigenvalue of each of a batch of Hermitian PSD operators.

    Parameters
    ----------
    apply : callable
        ``apply(x)`` maps a (batch, n) tensor to ``B_i x_i`` row by row; every
        ``B_i`` Hermitian positive semi-definite.
    start : torch.Tensor of shape (batch, n)
        Starting vectors (random: a start orthogonal to the top eigenvector
        would never see it). Real or complex; the result has its dtype.
    tol : float
        Convergence test: ``||B y - theta y|| <= tol * theta``.
    max_dim : int
        Krylov dimension before an explicit restart from the Ritz vector.
    restarts : int
        Restarts before giving up; rows still not converged are flagged.
    check_every : int
        Steps between convergence tests (an eigen-decomposition of the small
        tridiagonal matrices). Every step by default: the test costs about a
        millisecond against 5-15 ms for a step on ResNet-50's blocks, and each
        row stops at the first step that passes (7 % faster than every 5th).
    restrict : callable, optional
        ``restrict(rows)`` returns the ``apply`` of the operators of the batch
        rows ``rows`` (a sorted int64 tensor of original row indices), on
        (len(rows), n) tensors. The converged rows then cost nothing: the
        iteration continues on the others alone once at most three quarters
        of its current rows are left. Without it they are multiplied by zero.

    Returns
    -------
    LanczosResult

    Notes
    -----
    1. The Lanczos three-term recurrence, each new vector orthogonalized
       once more against the last two: ``V^H B V = T`` tridiagonal, ``alpha_j``
       on its diagonal, ``beta_j`` beside it. No full reorthogonalization:
       the lost orthogonality only makes converged Ritz values reappear as
       copies, and a Ritz value whose residual bound is small is accurate
       all the same (Paige; Parlett, ch. 13): the top one is all we need, at
       ``O(n)`` per row and step instead of ``O(k n)``.
    2. Every ``check_every`` steps the top eigenpair ``(theta, s)`` of ``T_k``
       gives the Ritz pair ``(theta, V_k s)`` with residual norm
       ``|beta_k s_k|`` (Parlett, Thm 13.1.1). ``theta <= lambda_max`` always
       (Cauchy interlacing), and an eigenvalue of ``B`` lies within the
       residual of ``theta`` (Parlett, Thm 4.5.1); once the others are
       separated from it by a gap ``delta``, the error is at most
       ``residual^2 / delta`` (Thm 11.7.1). Stopping at ``residual <= tol
       theta`` with ``tol = 1e-6`` leaves a relative error below ``1e-6`` in
       the eigenvalue (``5e-7`` in the singular value: the report's promise
       of 1e-6 relative), and far less once the top eigenvalue is separated
       (measured on ResNet-50's blocks: within 5e-16 of tol = 1e-8). It saves a fifth
       of the steps of ``tol = 1e-8``.
    3. A zero ``beta_j`` means ``V_j`` spans an invariant subspace: its Ritz
       values are exact (residual 0) and the row stops there.
    4. A row that passes the test is frozen: its Ritz pair is the one of that
       step, whatever the other rows do, so a row's result depends on its own
       operator and start only (not on the batch it runs in).
    5. After ``max_dim`` steps without convergence, restart from the Ritz
       vector (its Rayleigh quotient never decreases).
    """
    if start.ndim != 2:
        raise ValueError(f"start must have shape (batch, n), got {tuple(start.shape)}")
    batch, n = start.shape
    device = start.device
    real = start.dtype.to_real() if start.is_complex() else start.dtype
    tiny = torch.finfo(real).tiny
    k_max = max(1, min(n, max_dim))
    vector = start / torch.linalg.vector_norm(start, dim=1, keepdim=True).clamp_min(tiny)
    # results of every row, frozen when the row converges
    value = torch.zeros(batch, dtype=real, device=device)
    residual = torch.full((batch,), float("inf"), dtype=real, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    ritz_vector = vector.clone()
    rows = torch.arange(batch, device=device)  # original indices of the rows still iterated
    step_apply = apply
    steps = 0

    def narrow(keep: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return restrict(keep) if restrict is not None else _subset_apply(apply, keep, batch)

    for _ in range(restarts + 1):
        b = len(rows)
        basis = torch.zeros(b, k_max + 1, n, dtype=start.dtype, device=device)
        alpha = torch.zeros(b, k_max, dtype=real, device=device)
        beta = torch.zeros(b, k_max, dtype=real, device=device)
        running = torch.ones(b, dtype=torch.bool, device=device)  # rows of this cycle not yet frozen
        basis[:, 0] = vector
        for j in range(k_max):
            # 1. one step of the three-term recurrence, with the new vector
            #    orthogonalized once more against the last two (local
            #    reorthogonalization: O(n) per row and step)
            current = basis[:, j]
            w = step_apply(current)
            steps += 1
            if j:
                w = w - beta[:, j - 1, None].to(w.dtype) * basis[:, j - 1]
            a = _dot(current, w)
            w = w - a[:, None] * current
            again = _dot(current, w)
            w = w - again[:, None] * current
            if j:
                w = w - _dot(basis[:, j - 1], w)[:, None] * basis[:, j - 1]
            alpha[:, j] = (a + again).real
            norm = torch.linalg.vector_norm(w, dim=1)
            # 3. breakdown: an invariant subspace, the Ritz values are exact
            scale = alpha[:, : j + 1].abs().amax(dim=1).clamp_min(tiny)
            alive = norm > 64 * torch.finfo(real).eps * scale
            beta[:, j] = torch.where(alive, norm, torch.zeros_like(norm))
            basis[:, j + 1] = torch.where(alive[:, None], w / norm.clamp_min(tiny)[:, None], torch.zeros_like(w))
            # 2. convergence test on the Ritz pairs of the running rows
            last = j + 1 == k_max
            if not (last or (j + 1) % check_every == 0 or not bool(alive.any())):
                continue
            theta, coefficients, res = _ritz(alpha, beta, j + 1)
            done = running & ((res <= tol * theta.abs()) | (res == 0))
            # 4. freeze the rows that pass (and record every running row at the cycle's end)
            record = running if last else done
            if bool(record.any()):
                where = rows[record]
                value[where], residual[where] = theta[record], res[record]
                converged[where] = done[record]
                found = _combine(coefficients[record].to(start.dtype), basis[record, : j + 1])
                ritz_vector[where] = found / torch.linalg.vector_norm(found, dim=1, keepdim=True).clamp_min(tiny)
            running &= ~done
            if last or not bool(running.any()):
                break
            if restrict is not None and int(running.sum()) <= 0.75 * b:
                # continue on the running rows alone
                rows, basis, alpha, beta = rows[running], basis[running], alpha[running], beta[running]
                b = len(rows)
                running = running[running]
                step_apply = narrow(rows)
        # 5. restart the rows still running from their Ritz vectors
        rows = rows[running]
        if not len(rows):
            break
        vector = ritz_vector[rows]
        step_apply = narrow(rows)
    return LanczosResult(value, residual, converged, steps, ritz_vector)
