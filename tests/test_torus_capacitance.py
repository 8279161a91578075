"""The torus capacitance solver (issue 23) against numpy's dense solves of the operators' sparse matrices.

References: :func:`auditor.analysis.zero_matrices.sparse_matrix` builds the zero-padded operators entry by entry
from the kernels (the tests of ``test_zero_blocks`` compare it with torch modules); the solver works on the
torus with FFTs and a dense capacitance LU, and :meth:`GridStencil.apply` by shifted sums.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from auditor.analysis.spectra import ConvOperator, IdentityShortcut
from auditor.analysis.torus_capacitance import GridStencil, StencilTerm, TorusSolver, solver_bytes, torus_solver
from auditor.analysis.zero_matrices import block_stencil, bsr_product, conv_blocks, sparse_matrix

D = torch.float64


def _conv(c_in: int, shape: tuple[int, int], *, c_out: int | None = None, k: int = 3, groups: int = 1,
          seed: int = 0) -> ConvOperator:
    generator = torch.Generator().manual_seed(seed)
    c_out = c_out or c_in
    weight = torch.randn(c_out, c_in // groups, k, k, dtype=D, generator=generator) / (k * (c_in // groups) ** 0.5)
    scale = torch.rand(c_out, dtype=D, generator=generator) + 0.5
    return ConvOperator(weight, (c_in, *shape), padding=k // 2, groups=groups, out_scale=scale)


def _cases() -> dict[str, tuple[list[ConvOperator], object]]:
    square, wide = (6, 6), (5, 7)
    return {
        "one conv": ([_conv(3, square, seed=1)], None),
        "one conv, H != W": ([_conv(2, wide, seed=2)], None),
        "one 5x5 depthwise conv": ([_conv(4, square, k=5, groups=4, seed=3)], None),
        "basic block": ([_conv(3, square, seed=4), _conv(3, square, seed=5)], IdentityShortcut((3, *square))),
        "basic block, H != W": ([_conv(2, wide, seed=6), _conv(2, wide, seed=7)], IdentityShortcut((2, *wide))),
        "bottleneck, 1x1 projection": (
            [_conv(4, square, c_out=2, k=1, seed=8), _conv(2, square, seed=9), _conv(2, square, c_out=4, k=1, seed=10)],
            _conv(4, square, k=1, seed=11)),
        "one conv and the identity": ([_conv(3, square, seed=12)], IdentityShortcut((3, *square))),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_solves_equal_numpy(name: str) -> None:
    convs, shortcut = _cases()[name]
    stencil = block_stencil(convs, shortcut)
    assert stencil is not None
    matrix = sparse_matrix(convs, shortcut).toarray()
    n = matrix.shape[0]
    solver = torus_solver(stencil)
    assert solver is not None
    rhs = np.random.default_rng(1).standard_normal(stencil.n)
    rhs[n:] = 0.0  # the intermediate maps' rows: the first variable is then the block's own solve
    for trans, reference in (("N", matrix), ("T", matrix.T)):
        x = solver.solve(rhs, trans)[:n]
        expected = np.linalg.solve(reference, rhs[:n])
        assert np.abs(x - expected).max() <= 1e-10 * np.abs(expected).max()


@pytest.mark.parametrize("name", list(_cases()))
def test_stencil_products_equal_the_sparse_matrix(name: str) -> None:
    convs, shortcut = _cases()[name]
    stencil = block_stencil(convs, shortcut)
    x = np.random.default_rng(2).standard_normal(stencil.n)
    if len(stencil.channels) == 1 and shortcut is None:
        matrix = sparse_matrix(convs, None)
        assert np.abs(stencil.apply(x) - matrix @ x).max() < 1e-12
        assert np.abs(stencil.apply(x, True) - matrix.T @ x).max() < 1e-12
    # the Schur complement of the system's intermediate rows is the block's matrix
    dense = np.stack([stencil.apply(e) for e in np.eye(stencil.n)], axis=1)
    n = sparse_matrix(convs, shortcut).shape[0]
    a, b, c, d = dense[:n, :n], dense[:n, n:], dense[n:, :n], dense[n:, n:]
    schur = a - b @ np.linalg.solve(d, c) if d.size else a
    assert np.abs(schur - sparse_matrix(convs, shortcut).toarray()).max() < 1e-12


def test_absolute_row_sums_are_the_matrix_inf_norm() -> None:
    convs, shortcut = _cases()["basic block"]
    stencil = block_stencil(convs, shortcut)
    dense = np.stack([stencil.apply(e) for e in np.eye(stencil.n)], axis=1)
    ones = np.ones(stencil.n)
    assert np.allclose(stencil.apply(ones, absolute=True), np.abs(dense).sum(axis=1))
    assert np.allclose(stencil.apply(ones, True, absolute=True), np.abs(dense).sum(axis=0))


def test_a_singular_torus_is_refused() -> None:
    # the centred difference x[p - 1] - x[p + 1] along rows: its torus symbol vanishes at frequency 0 on every
    # torus, while on an even grid the zero-padded operator (tridiagonal, zero diagonal) is regular
    kernel = np.zeros((1, 1, 3, 3))
    kernel[0, 0, 1, 0], kernel[0, 0, 1, 2] = 1.0, -1.0
    stencil = GridStencil((1,), (4, 6), (StencilTerm(0, 0, kernel, (-1, -1)),))
    dense = np.stack([stencil.apply(e) for e in np.eye(stencil.n)], axis=1)
    assert np.linalg.matrix_rank(dense) == stencil.n
    with pytest.raises(np.linalg.LinAlgError):
        TorusSolver(stencil)
    assert torus_solver(stencil) is None


def test_an_inaccurate_torus_is_refused() -> None:
    # a symbol that nearly vanishes on the torus (1e-13 at frequency 0): the solve's backward error exceeds the
    # bar on every torus tried, and the solver is refused rather than used
    kernel = np.zeros((1, 1, 3, 3))
    kernel[0, 0, 1, 0], kernel[0, 0, 1, 2], kernel[0, 0, 1, 1] = 1.0, -1.0, 1e-13
    stencil = GridStencil((1,), (4, 6), (StencilTerm(0, 0, kernel, (-1, -1)),))
    assert torus_solver(stencil) is None


def test_limits_refuse_large_solvers() -> None:
    convs, shortcut = _cases()["basic block"]
    stencil = block_stencil(convs, shortcut)
    assert torus_solver(stencil, max_capacity=10) is None
    assert torus_solver(stencil, max_bytes=solver_bytes(stencil) - 1) is None
    assert torus_solver(stencil, max_bytes=solver_bytes(stencil)) is not None


def test_strided_and_option_a_blocks_are_not_stencils() -> None:
    strided = ConvOperator(torch.randn(4, 2, 3, 3, dtype=D), (2, 6, 6), stride=2, padding=1)
    assert block_stencil([strided], None) is None
    assert block_stencil([_conv(2, (6, 6)), _conv(2, (6, 6))], None) is None  # a plain product: no system


@pytest.mark.parametrize("transpose", [False, True])
def test_bsr_product_equals_scipy(transpose: bool) -> None:
    grid = (5, 6)
    left = conv_blocks(_conv(3, grid, c_out=2, seed=20))
    right = conv_blocks(_conv(3, grid, c_out=3 if not transpose else 2, k=5, seed=21)) if transpose else \
        conv_blocks(_conv(4, grid, c_out=3, k=5, seed=21))
    found = bsr_product(left, right, grid, transpose_right=transpose)
    expected = left @ (right.T if transpose else right)
    assert isinstance(found, sp.bsr_matrix)
    assert np.abs(found.toarray() - expected.toarray()).max() < 1e-13
