"""Batched linear algebra on the CPU's cores: worker threads, BLAS limits, singular values of matrix batches.

The spectra of :mod:`auditor.analysis.spectra` and the extremes of
:mod:`auditor.analysis.block_extremes` solve thousands of small, independent
eigenproblems (one per frequency). They are split into slices
(:func:`chunk_slices`) and run on :func:`worker_count` threads
(:func:`parallel_map`; LAPACK releases the GIL), each with a single-threaded
BLAS (:func:`blas_single_thread`), which is faster than one multi-threaded
LAPACK call per batch on this kind of work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

__all__ = [
    "GRAM_MIN_RATIO",
    "blas_single_thread",
    "worker_count",
    "torch_single_thread",
    "parallel_map",
    "chunk_slices",
    "sigma_from_gram",
    "sigma_of_matrices",
]

# A frequency whose Gram eigenvalues span more than this ratio is recomputed
# with an SVD of the frequency matrix itself: squaring loses about
# eps * lambda_max / lambda_min relative accuracy on the smallest value, so the
# Gram route is kept only where that error stays below ~1e-8.
GRAM_MIN_RATIO = 1e-8


def blas_single_thread() -> Any:
    """Context that limits BLAS to one thread.

    It acts on the BLAS libraries loaded when it is entered (numpy's; scipy's
    once ``scipy.linalg`` is imported): import before entering.

    The batched LAPACK work is parallelised over frequencies by our own worker
    threads; a multi-threaded BLAS inside each call oversubscribes the cores
    and, on a loaded machine, runs an order of magnitude slower.
    """
    return threadpool_limits(limits=1, user_api="blas")


def worker_count() -> int:
    """Worker threads for the batched LAPACK work: torch's thread setting."""
    return max(1, torch.get_num_threads())


@contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the caller's setting.

    Lanczos applies the operator hundreds of times to one vector; for such
    tiny convolutions the OpenMP barriers of a multi-threaded torch cost
    100x the work on a busy machine (35 ms instead of 0.1 ms measured).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def parallel_map(function: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[function(item) for item in items]`` on ``workers`` threads (numpy releases the GIL)."""
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(function, items))


def chunk_slices(count: int, item_bytes: int, workers: int, budget: int = 1 << 25) -> list[slice]:
    """Split ``count`` items into ``k * workers`` near-equal slices of at most ~``budget`` bytes."""
    per_worker = max(1, math.ceil(count * item_bytes / (budget * workers)))
    edges = np.linspace(0, count, min(count, per_worker * workers) + 1).round().astype(int)
    return [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def sigma_from_gram(gram: np.ndarray, matrices: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Singular values, descending, from Gram matrices ``P P^H`` of shape (batch, m, m).

    ``matrices(index)`` returns the matrices ``P`` of the given rows; it is
    called for the rows whose eigenvalues span more than ``1 / GRAM_MIN_RATIO``,
    where squaring would cost accuracy, and those rows get an SVD of ``P``.
    """
    # torch's LAPACK (MKL in the CPU wheels) is ~20 % faster than numpy's here
    lam = torch.linalg.eigvalsh(torch.from_numpy(gram)).numpy()[:, ::-1]
    sigma = np.sqrt(np.clip(lam, 0.0, None))
    top = lam[:, 0]
    redo = np.flatnonzero((lam[:, -1] < GRAM_MIN_RATIO * top) & (top > 0))
    if redo.size:
        sigma[redo] = np.linalg.svd(matrices(redo), compute_uv=False)
    return sigma


def sigma_of_matrices(p: np.ndarray) -> np.ndarray:
    """Singular values, descending, of a batch of matrices (batch, r, c): min(r, c) each."""
    if p.shape[1] > p.shape[2]:
        p = p.conj().transpose(0, 2, 1)  # smaller side first
    if p.shape[1] < 8:  # tiny: the SVD itself is cheapest
        return np.linalg.svd(p, compute_uv=False)
    return sigma_from_gram(p @ p.conj().transpose(0, 2, 1), lambda index: p[index])


def extremes_of_matrices(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and smallest singular value of each matrix of a batch (batch, r, c), the smallest over min(r, c).

    Both from the eigenvalues of the Gram matrices, as :func:`sigma_of_matrices`;
    where those span more than ``1 / GRAM_MIN_RATIO`` (squaring would cost the
    smallest value its accuracy), a square matrix's smallest singular value is
    ``1 / sigma_max(P^{-1})``: one LU inverse and the largest eigenvalue of its
    Gram matrix (well conditioned), accurate to about ``eps sigma_max(P)`` in
    absolute terms like the SVD's own, at a fraction of its cost (a complex
    768 x 768 matrix, ConvNeXt-T's last stage: 5 s by SVD here, under 0.2 s so).
    A matrix whose inverse does not exist in floating point, and a rectangular
    one, get the SVD.
    """
    if p.shape[1] > p.shape[2]:
        p = p.conj().transpose(0, 2, 1)  # smaller side first
    if p.shape[1] < 8:  # tiny: the SVD itself is cheapest
        values = np.linalg.svd(p, compute_uv=False)
        return values[:, 0], values[:, -1]
    gram = torch.from_numpy(p @ p.conj().transpose(0, 2, 1))
    lam = torch.linalg.eigvalsh(gram).numpy()
    top, low = lam[:, -1], lam[:, 0]
    largest, smallest = np.sqrt(np.clip(top, 0.0, None)), np.sqrt(np.clip(low, 0.0, None))
    redo = np.flatnonzero((low < GRAM_MIN_RATIO * top) & (top > 0))
    if redo.size and p.shape[1] == p.shape[2]:
        inverse, info = torch.linalg.inv_ex(torch.from_numpy(np.ascontiguousarray(p[redo])))
        ok = (info == 0).numpy() & torch.isfinite(inverse).flatten(1).all(dim=1).numpy()
        if ok.any():
            lam_inverse = torch.linalg.eigvalsh(inverse[ok].mH @ inverse[ok])[:, -1].numpy()
            good = np.isfinite(lam_inverse) & (lam_inverse > 0)
            rows = redo[ok][good]
            smallest[rows] = 1.0 / np.sqrt(lam_inverse[good])
            redo = np.setdiff1d(redo, rows)
    if redo.size:
        smallest[redo] = np.linalg.svd(p[redo], compute_uv=False)[:, -1]
    return largest, smallest

