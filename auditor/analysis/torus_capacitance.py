"""Solves with a zero-padded grid operator through a slightly larger torus: the capacitance matrix method.

A stride-1 convolution that keeps its ``H x W`` grid, or a system of them
(several variables on the same grid, each row a sum of convolutions of the
variables), is a *stencil*: output pixel ``p`` of row ``i`` reads
``K[d] u_j[p + d]`` for the taps ``d`` of each term ``(i, j, K)``, and zero
padding drops the reads that leave the grid. On a torus of ``M_h x M_w``
pixels with ``M >= H + r`` (``r`` the largest tap offset) the same stencil
``A_c`` is block circulant, and the zero-padded operator is its compression
``A_z = P A_c E`` (``E`` embeds the grid ``Omega`` with zeros on the rest of
the torus, ``Gamma``; ``P = E^T``): a read that leaves ``Omega`` wraps into
``Gamma``, where the embedded vector is zero.

``A_c^{-1}`` is diagonal in the Fourier basis (one ``c x c`` inverse per
frequency, ``c`` the channels of all variables), and the capacitance matrix
method [1]_ [2]_ solves ``A_z u = b`` with it: ``A_c E u = E b + E_Gamma g``
for the unknown values ``g`` that ``A_c`` gives on ``Gamma``, and
``P_Gamma E u = 0`` makes ``g`` the solution of

    ``G g = -P_Gamma A_c^{-1} E b``,   ``G = P_Gamma A_c^{-1} E_Gamma``,

after which ``u = P A_c^{-1} (E b + E_Gamma g)``. ``G`` has
``|Gamma| c = ((H + r)(W + r) - H W) c`` rows, a strip of the torus, and its
entries are the torus Green's function (the inverse FFT of the per-frequency
inverses) at the differences of ``Gamma``'s pixels. Its dense LU costs far less
than a factorization of ``A_z`` itself (``H W c`` unknowns): for ResNet-56's
32x32x16 blocks ``|Gamma| c = 2,080`` against ``16,384``. Transposed solves use
the same LU: ``P_Gamma A_c^{-T} E_Gamma = G^T``.

The method needs ``A_c`` regular on the torus, and its accuracy depends on
``A_c``'s conditioning there, which a zero-padded operator does not control:
:func:`torus_solver` tries a few torus sizes and keeps a solver only where a
random solve, plain and transposed, has a normwise backward error of at most
:data:`BACKWARD_ERROR_MAX`, measured with :meth:`GridStencil.apply` (direct
shifted sums, independent of the FFTs). Otherwise the caller factors ``A_z``
another way.

References
----------
.. [1] B. L. Buzbee, F. W. Dorr, J. A. George, G. H. Golub, "The direct solution of the discrete Poisson
   equation on irregular regions", SIAM J. Numer. Anal. 8 (1971).
.. [2] W. Proskurowski, O. Widlund, "On the numerical solution of Helmholtz's equation by the capacitance
   matrix method", Math. Comp. 30 (1976).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .frequencies import kernel_symbols
from .grid_lu import BACKWARD_ERROR_MAX, normwise_backward_error

__all__ = ["StencilTerm", "GridStencil", "shifted_slices", "TorusSolver", "torus_solver", "torus_feasible",
           "solver_bytes", "BACKWARD_ERROR_MAX", "TORUS_TRIES", "MAX_CAPACITY"]

# Torus sizes tried: H + r, H + r + 1, ... (a torus where A_c is singular or ill-conditioned gives way to the next).
TORUS_TRIES = 3
# Capacitance matrices of more rows are not formed: a dense LU of 10,240 rows takes 7e11 flops (about 25 s on one
# core) and 0.8 GB (a 128-channel residual block at 16x16 has 8,448 rows, a 64-channel 3x3 convolution at 56x56 7,232).
MAX_CAPACITY = 10240


def shifted_slices(offset: tuple[int, int], grid: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
    """The pixels ``p`` of an ``H x W`` grid whose ``p + offset`` lies in it (rows, columns), and those
    ``p + offset``."""
    (h, w), (dy, dx) = grid, offset
    y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
    return slice(y0, y1), slice(x0, x1), slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx)


@dataclass(frozen=True)
class StencilTerm:
    """``out_row[:, p] += sum_taps kernel[:, :, a, b] @ u_col[:, p + origin + (a, b)]`` (zero outside the grid).

    Attributes
    ----------
    row, col : int
        The variables written and read.
    kernel : numpy.ndarray of shape (c_row, c_col, kh, kw)
    origin : (int, int)
        The offset of tap ``(0, 0)``: minus the convolution's padding.
    """

    row: int
    col: int
    kernel: np.ndarray
    origin: tuple[int, int]

    def offsets(self) -> list[tuple[int, int, int, int]]:
        """``(a, b, dy, dx)`` for every tap."""
        kh, kw = self.kernel.shape[2:]
        return [(a, b, self.origin[0] + a, self.origin[1] + b) for a in range(kh) for b in range(kw)]


@dataclass(frozen=True)
class GridStencil:
    """A square system of stencils on one ``H x W`` grid; its unknowns are the variables' channel-major vectors,
    concatenated.

    Attributes
    ----------
    channels : tuple of int
        Channels of each variable (row ``i`` has as many as variable ``i``).
    grid : (int, int)
        ``(H, W)``.
    terms : tuple of StencilTerm
    """

    channels: tuple[int, ...]
    grid: tuple[int, int]
    terms: tuple[StencilTerm, ...]

    def __post_init__(self) -> None:
        for t in self.terms:
            if t.kernel.shape[:2] != (self.channels[t.row], self.channels[t.col]):
                raise ValueError(f"a {t.kernel.shape} kernel from variable {t.col} to {t.row} of {self.channels}")

    @property
    def n(self) -> int:
        """Unknowns: ``sum(channels) H W``."""
        return sum(self.channels) * self.grid[0] * self.grid[1]

    @property
    def radius(self) -> tuple[int, int]:
        """The largest tap offset along each axis."""
        dy = [abs(o[2]) for t in self.terms for o in t.offsets()]
        dx = [abs(o[3]) for t in self.terms for o in t.offsets()]
        return max(dy, default=0), max(dx, default=0)

    def _split(self, x: np.ndarray) -> list[np.ndarray]:
        h, w = self.grid
        bounds = np.cumsum([0, *self.channels]) * h * w
        return [x[bounds[i]:bounds[i + 1]].reshape(c, h, w) for i, c in enumerate(self.channels)]

    def apply(self, x: np.ndarray, trans: bool = False, *, absolute: bool = False) -> np.ndarray:
        """``A x`` (``A^T x``; ``absolute``: with ``|kernel|``) by shifted sums over the taps, zero padding."""
        h, w = self.grid
        parts = self._split(np.asarray(x, dtype=np.float64))
        out = [np.zeros_like(p) for p in parts]
        for t in self.terms:
            kernel = np.abs(t.kernel) if absolute else t.kernel
            source, target = (parts[t.row], out[t.col]) if trans else (parts[t.col], out[t.row])
            for a, b, dy, dx in t.offsets():
                ys, xs, shifted_ys, shifted_xs = shifted_slices((dy, dx), (h, w))
                if ys.start >= ys.stop or xs.start >= xs.stop:
                    continue
                tap = kernel[:, :, a, b]
                if trans:  # the adjoint scatters: u_col[p + d] += tap^T out_row[p]
                    target[:, shifted_ys, shifted_xs] += np.tensordot(tap.T, source[:, ys, xs], 1)
                else:
                    target[:, ys, xs] += np.tensordot(tap, source[:, shifted_ys, shifted_xs], 1)
        return np.concatenate([o.ravel() for o in out])


class TorusSolver:
    """``A_z^{-1}`` of a :class:`GridStencil` by the capacitance matrix method on an ``(H + r_h + extra) x (W +
    r_w + extra)`` torus (see the module docstring).

    Parameters
    ----------
    stencil : GridStencil
    extra : int
        Torus pixels beyond the least size, along each axis that has a boundary.

    Raises
    ------
    numpy.linalg.LinAlgError
        ``A_c`` or the capacitance matrix is exactly singular.
    """

    def __init__(self, stencil: GridStencil, extra: int = 0) -> None:
        from scipy.linalg import lu_factor

        self.stencil = stencil
        h, w = stencil.grid
        self.size = _torus_size(stencil, extra)
        m_h, m_w = self.size
        offsets = np.cumsum([0, *stencil.channels])
        c = int(offsets[-1])
        # the symbol sum_d K[d] exp(2 pi i (k_h d_y / M_h + k_w d_x / M_w)) at rfft2's frequencies: numpy's fft of
        # A_c u (u read at p + d) is it times u's; kernel_symbols' sign convention, at the frequencies -k
        k_h, k_w = np.meshgrid(np.fft.fftfreq(m_h, 1 / m_h).astype(int), np.arange(m_w // 2 + 1), indexing="ij")
        symbol = np.zeros((m_h, m_w // 2 + 1, c, c), dtype=np.complex128)
        for t in stencil.terms:
            rows, cols = slice(offsets[t.row], offsets[t.row + 1]), slice(offsets[t.col], offsets[t.col + 1])
            padding = (-t.origin[0], -t.origin[1])
            symbol[:, :, rows, cols] += kernel_symbols(t.kernel, padding, (m_h, m_w), -k_h.ravel(),
                                                       -k_w.ravel()).reshape(m_h, m_w // 2 + 1, *t.kernel.shape[:2])
        self._inverse = np.linalg.inv(symbol).reshape(-1, c, c)  # LinAlgError where A_c is singular
        # Gamma: the torus pixels outside the grid; G's entries are the Green's function at their differences
        gy, gx = np.nonzero((np.arange(m_h)[:, None] >= h) | (np.arange(m_w)[None, :] >= w))
        self._gamma = (gy, gx)
        self.capacity = len(gy) * c
        self._channels = c
        if len(gy):
            green = np.fft.irfft2(self._inverse.reshape(m_h, m_w // 2 + 1, c, c), s=(m_h, m_w), axes=(0, 1))
            # G^T in C order is G in Fortran order: LAPACK factors it in place, without a copy of K^2 entries
            transposed = green[(gy[None, :] - gy[:, None]) % m_h, (gx[None, :] - gx[:, None]) % m_w]
            transposed = transposed.transpose(0, 3, 1, 2).reshape(self.capacity, self.capacity)
            self._lu = lu_factor(transposed.T, overwrite_a=True, check_finite=False)
            if not np.all(np.diagonal(self._lu[0])):
                raise np.linalg.LinAlgError("the capacitance matrix is exactly singular")

    def _torus_inverse(self, x: np.ndarray, trans: bool) -> np.ndarray:
        """``A_c^{-1} x`` (``A_c^{-T} x``) for ``x`` of shape ``(c, M_h, M_w)``."""
        m_h, m_w = self.size
        c = self._channels
        spectrum = np.fft.rfft2(x, axes=(1, 2)).reshape(c, -1).T
        if trans:  # A_c^T's symbol is the conjugate transpose: y = conj(conj(x)^T S^{-1})^T, no copy of S^{-1}
            product = np.matmul(spectrum.conj()[:, None, :], self._inverse)[:, 0, :].conj()
        else:
            product = np.matmul(self._inverse, spectrum[:, :, None])[:, :, 0]
        product = product.T.reshape(c, m_h, m_w // 2 + 1)
        return np.fft.irfft2(product, s=(m_h, m_w), axes=(1, 2))

    def solve(self, rhs: np.ndarray, trans: str = "N") -> np.ndarray:
        """``A_z^{-1} rhs`` (``trans="T"``: ``A_z^{-T} rhs``) for a vector of length ``stencil.n``."""
        from scipy.linalg import lu_solve

        if trans not in ("N", "T"):
            raise ValueError(f"trans is 'N' or 'T', not {trans!r}")
        transposed = trans == "T"
        h, w = self.stencil.grid
        m_h, m_w = self.size
        c = self._channels
        torus = np.zeros((c, m_h, m_w))
        torus[:, :h, :w] = np.asarray(rhs, dtype=np.float64).reshape(c, h, w)
        solution = self._torus_inverse(torus, transposed)
        gy, gx = self._gamma
        if len(gy):
            values = lu_solve(self._lu, -solution[:, gy, gx].T.ravel(), trans=1 if transposed else 0,
                              check_finite=False)
            torus[:] = 0.0
            torus[:, gy, gx] = values.reshape(len(gy), c).T
            solution += self._torus_inverse(torus, transposed)
        return np.ascontiguousarray(solution[:, :h, :w]).ravel()


def backward_error(stencil: GridStencil, x: np.ndarray, rhs: np.ndarray, trans: bool,
                   row_sums: np.ndarray) -> float:
    """Normwise backward error of a solve with the stencil (``A^T`` with its own absolute row sums)."""
    return normwise_backward_error(rhs - stencil.apply(x, trans), float(row_sums.max()), x, rhs)


def torus_solver(stencil: GridStencil, *, tries: int = TORUS_TRIES, seed: int = 0,
                 max_capacity: int = MAX_CAPACITY, max_bytes: float = float("inf")) -> TorusSolver | None:
    """A checked :class:`TorusSolver`, or None where no torus size gives one.

    Parameters
    ----------
    stencil : GridStencil
    tries : int
        Torus sizes tried (``extra = 0, 1, ...``).
    seed : int
        Seed of the random right-hand side of the backward-error check.
    max_capacity : int
        Larger capacitance matrices are not formed (None): their dense LU costs more than nested dissection.
    max_bytes : float
        Nor are solvers whose arrays (:func:`solver_bytes`) would take more memory.

    Returns
    -------
    TorusSolver or None
        Kept only where a random solve, plain and transposed, has a normwise backward error of at most
        :data:`BACKWARD_ERROR_MAX` against :meth:`GridStencil.apply`.
    """
    rhs = np.random.default_rng(seed).standard_normal(stencil.n)
    ones = np.ones(stencil.n)
    sums = {False: stencil.apply(ones, absolute=True), True: stencil.apply(ones, True, absolute=True)}
    for extra in range(tries):
        try:
            fits = _capacity(stencil, extra) <= max_capacity and solver_bytes(stencil, extra) <= max_bytes
            solver = TorusSolver(stencil, extra) if fits else None
        except np.linalg.LinAlgError:
            continue
        if solver is None:
            return None
        if all(_accurate(solver, rhs, trans, sums[trans]) for trans in (False, True)):
            return solver
    return None


def torus_feasible(stencil: GridStencil | None, *, max_capacity: int = MAX_CAPACITY,
                   max_bytes: float = float("inf")) -> bool:
    """Whether :func:`torus_solver` would form a solver for ``stencil`` (None: no stencil) within the limits."""
    return stencil is not None and _capacity(stencil, 0) <= max_capacity and solver_bytes(stencil) <= max_bytes


def _torus_size(stencil: GridStencil, extra: int) -> tuple[int, int]:
    (h, w), (r_h, r_w) = stencil.grid, stencil.radius
    return h + r_h + (extra if r_h else 0), w + r_w + (extra if r_w else 0)


def _capacity(stencil: GridStencil, extra: int) -> int:
    """Rows of the capacitance matrix on the torus of ``extra``."""
    (h, w), (m_h, m_w) = stencil.grid, _torus_size(stencil, extra)
    return (m_h * m_w - h * w) * sum(stencil.channels)


def solver_bytes(stencil: GridStencil, extra: int = 0) -> int:
    """Bytes a :class:`TorusSolver` keeps: the capacitance LU and the per-frequency inverses."""
    m_h, m_w = _torus_size(stencil, extra)
    c = sum(stencil.channels)
    return 8 * _capacity(stencil, extra) ** 2 + 16 * m_h * (m_w // 2 + 1) * c * c


def _accurate(solver: TorusSolver, rhs: np.ndarray, trans: bool, row_sums: np.ndarray) -> bool:
    x = solver.solve(rhs, "T" if trans else "N")
    return bool(np.all(np.isfinite(x))) and backward_error(solver.stencil, x, rhs, trans,
                                                           row_sums) <= BACKWARD_ERROR_MAX

