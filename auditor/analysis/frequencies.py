"""Frequencies of a circular convolution: the half plane of conjugate pairs, phases and kernel symbols.

A real multi-channel convolution on an H x W torus is block-diagonalised by
the 2-D DFT; its matrix at frequency ``(u, v)`` is the kernel's symbol
``P(u, v)`` (Sedghi et al., ICLR 2019). For real kernels ``P(-u, -v)`` is the
complex conjugate of ``P(u, v)`` and has the same singular values, so only one
frequency of each conjugate pair is needed (:func:`half_plane`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["half_plane", "frequency_phases", "tap_offsets", "constant_tap", "kernel_symbols"]


def half_plane(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frequency of each conjugate pair ``(u, v) ~ (-u, -v)`` on an h x w grid.

    Returns ``(u, v, multiplicity)``; multiplicities are 1 for self-conjugate
    frequencies, 2 otherwise, and sum to ``h * w``.
    """
    u, v = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    u, v = u.ravel(), v.ravel()
    # lexicographic representative: keep (u, v) if it is <= (-u mod h, -v mod w)
    nu, nv = (-u) % h, (-v) % w
    keep = (v < nv) | ((v == nv) & (u <= nu))
    self_conj = (u == nu) & (v == nv)
    return u[keep], v[keep], np.where(self_conj, 1, 2)[keep]


def frequency_phases(u: np.ndarray, v: np.ndarray, grid: tuple[int, int], dh: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """``exp(-2 pi i (u dh / H + v dw / W))``, shape (n_freq, n_offsets), for offset pairs (dh, dw)."""
    h, w = grid
    # exact integer reduction before scaling keeps the angles accurate on large grids
    angle = 2 * np.pi * ((np.multiply.outer(u, dh) % h) / h + (np.multiply.outer(v, dw) % w) / w)
    return np.exp(-1j * angle)


def tap_offsets(kh: int, kw: int, padding: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Spatial offsets ``(a - p_h, b - p_w)`` of every tap, row-major."""
    a, b = np.meshgrid(np.arange(kh) - padding[0], np.arange(kw) - padding[1], indexing="ij")
    return a.ravel(), b.ravel()


def constant_tap(weight: np.ndarray, padding: tuple[int, int], grid: tuple[int, int]) -> int | None:
    """The tap whose matrix is the kernel's symbol at every frequency, else None.

    That is the only nonzero tap of ``weight`` (..., kh, kw) when its offset is
    zero on the grid (its phase is 1 everywhere); an all-zero kernel is its
    tap 0 (the zero matrix) at every frequency.
    """
    kh, kw = weight.shape[-2:]
    nonzero = np.flatnonzero(weight.reshape(-1, kh * kw).any(axis=0))
    if nonzero.size == 0:
        return 0
    if nonzero.size > 1:
        return None
    dh, dw = tap_offsets(kh, kw, padding)
    tap = int(nonzero[0])
    return tap if dh[tap] % grid[0] == 0 and dw[tap] % grid[1] == 0 else None


def kernel_symbols(weight: np.ndarray, padding: tuple[int, int], grid: tuple[int, int],
             u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``P(u, v) = sum_ab K[..., a, b] exp(-2 pi i (u (a - p_h) / H + v (b - p_w) / W))``.

    ``weight`` has shape (..., kh, kw); the result (n_freq, ...), complex128.
    This is the 2-D DFT of the kernel placed at its offsets (``fft2`` of the
    zero-padded kernel), evaluated only at the requested frequencies as one
    (n_freq x taps) @ (taps x rest) product: no gather, no transpose, and
    exact when the kernel is larger than the grid (offsets wrap).
    """
    kh, kw = weight.shape[-2:]
    e = frequency_phases(u, v, grid, *tap_offsets(kh, kw, padding))
    taps = weight.reshape(-1, kh * kw).T
    if np.iscomplexobj(taps):
        return (e @ taps).reshape(len(u), *weight.shape[:-2])
    # real taps: two real products (a complex @ real product in numpy skips BLAS)
    taps = np.ascontiguousarray(taps, dtype=np.float64)
    out = np.empty((len(u), taps.shape[1]), dtype=np.complex128)
    out.real = np.ascontiguousarray(e.real) @ taps
    out.imag = np.ascontiguousarray(e.imag) @ taps
    return out.reshape(len(u), *weight.shape[:-2])
