"""Nested-dissection LU of grid operators (issue 23) against numpy's dense solve.

Small leaves force deep elimination trees on small grids, so every kind of
front (leaf, strip, root; boundaries on one to four sides) takes part.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from auditor.analysis.grid_lu import FrontSingular, GridLU, channel_major, grid_lu, pixel_blocks
from auditor.analysis.spectra import ConvOperator
from auditor.analysis.zero_matrices import conv_blocks as _conv_blocks, conv_matrix as _conv_sparse


def _grid_operator(grid: tuple[int, int, int], radius: int, seed: int, diagonal: float = 4.0) -> np.ndarray:
    """A dense channel-major matrix coupling every pair of pixels at most ``radius`` apart by a random block."""
    c, h, w = grid
    rng = np.random.default_rng(seed)
    matrix = np.zeros((c, h * w, c, h * w))
    for p in range(h * w):
        for q in range(h * w):
            if max(abs(p // w - q // w), abs(p % w - q % w)) <= radius:
                matrix[:, p, :, q] = rng.standard_normal((c, c))
    matrix = matrix.reshape(c * h * w, c * h * w)
    return matrix + diagonal * np.eye(len(matrix))


@pytest.mark.parametrize(("grid", "radius", "leaf"), [
    ((2, 9, 7), 1, 4), ((3, 6, 11), 2, 6), ((1, 12, 5), 1, 1), ((2, 5, 5), 3, 2), ((3, 4, 6), 0, 3),
])
def test_solves_equal_numpy(grid: tuple[int, int, int], radius: int, leaf: int) -> None:
    dense = _grid_operator(grid, radius, seed=sum(grid) + radius)
    factor = GridLU(pixel_blocks(sp.csr_matrix(dense), grid), grid, leaf=leaf)
    assert factor.radius == radius
    assert len(factor.fronts) > 3 or radius == 0  # the small leaf makes a real tree
    rhs = np.random.default_rng(1).standard_normal(len(dense))
    for trans, matrix in (("N", dense), ("T", dense.T)):
        expected = np.linalg.solve(matrix, rhs)
        assert np.abs(factor.solve(rhs, trans) - expected).max() < 1e-10 * np.abs(expected).max()


@pytest.mark.parametrize(("grid", "radius", "leaf"), [((2, 9, 7), 1, 4), ((3, 6, 11), 2, 6), ((2, 5, 5), 3, 2)])
def test_cholesky_fronts_solve_a_gram_matrix(grid: tuple[int, int, int], radius: int, leaf: int) -> None:
    # B B^T of a grid operator (radius r): symmetric positive definite, coupling radius 2r
    half = _grid_operator(grid, radius, seed=7 + radius)
    gram = half @ half.T
    blocks = pixel_blocks(sp.csr_matrix(gram), grid)
    factor = grid_lu(blocks, grid, leaf=leaf, symmetric=True)
    assert factor is not None and factor.symmetric and factor.radius <= 2 * radius
    rhs = np.random.default_rng(2).standard_normal(len(gram))
    expected = np.linalg.solve(gram, rhs)
    for trans in ("N", "T"):
        assert np.abs(factor.solve(rhs, trans) - expected).max() < 1e-9 * np.abs(expected).max()
    lu = GridLU(blocks, grid, leaf=leaf)
    assert factor.flops < 0.6 * lu.flops  # half the LU's arithmetic (and no pivoting)


def test_cholesky_fronts_refuse_an_indefinite_matrix() -> None:
    grid = (2, 6, 6)
    symmetric = _grid_operator(grid, 1, seed=8, diagonal=0.0)
    symmetric = symmetric + symmetric.T  # symmetric, indefinite
    blocks = pixel_blocks(sp.csr_matrix(symmetric), grid)
    with pytest.raises(FrontSingular):
        GridLU(blocks, grid, leaf=4, symmetric=True)
    assert grid_lu(blocks, grid, leaf=4, symmetric=True) is None
    assert grid_lu(blocks, grid, leaf=4) is not None  # LU fronts take it


def test_every_unknown_is_eliminated_once() -> None:
    grid = (2, 10, 13)
    factor = GridLU(pixel_blocks(sp.csr_matrix(_grid_operator(grid, 2, seed=3)), grid), grid, leaf=4)
    eliminated = np.concatenate([front.sep for front in factor.fronts])
    assert np.array_equal(np.sort(eliminated), np.arange(int(np.prod(grid))))


def test_conversions_round_trip() -> None:
    grid = (3, 4, 5)
    matrix = sp.csr_matrix(_grid_operator(grid, 1, seed=4))
    blocks = pixel_blocks(matrix, grid)
    assert blocks.blocksize == (3, 3)
    assert abs(channel_major(blocks, grid) - matrix).max() == 0


def test_singular_front_and_unstable_pivots_are_refused() -> None:
    grid = (1, 1, 4)
    # regular (a permutation), but each pixel's own 1x1 block is 0: static pivoting cannot start
    swap = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=float))
    assert GridLU(pixel_blocks(swap, grid), grid, leaf=4) is not None  # one front: LAPACK pivots
    assert grid_lu(pixel_blocks(swap, grid), grid, leaf=1) is None
    # a tiny own pivot: it factors, but the growth ruins the solve (partial pivoting would swap the rows)
    tiny = sp.csr_matrix(np.array([[1e-19, 1, 0, 0], [1, 1, 1, 0], [0, 1, 2, 1], [0, 0, 1, 3]], dtype=float))
    assert GridLU(pixel_blocks(tiny, grid), grid, leaf=1) is not None
    assert grid_lu(pixel_blocks(tiny, grid), grid, leaf=1) is None
    regular = sp.csr_matrix(_grid_operator((2, 6, 6), 1, seed=5))
    assert grid_lu(pixel_blocks(regular, (2, 6, 6)), (2, 6, 6)) is not None


@pytest.mark.parametrize(("kernel", "padding", "groups"), [(3, 1, 1), (5, 2, 2), (1, 0, 1), (3, 1, 4)])
def test_convolution_blocks_equal_its_sparse_matrix(kernel: int, padding: int, groups: int) -> None:
    torch.manual_seed(0)
    shape = (4, 6, 7)
    weight = torch.randn(4, 4 // groups, kernel, kernel, dtype=torch.float64)
    op = ConvOperator(weight, shape, stride=(1, 1), padding=(padding, padding), groups=groups,
                      out_scale=torch.rand(4, dtype=torch.float64) + 0.5)
    assert abs(channel_major(_conv_blocks(op), shape) - _conv_sparse(op)).max() < 1e-15


@pytest.mark.parametrize(("k1", "k2", "pad2"), [(3, 3, 1), (1, 3, 1), (3, 5, 2), (5, 3, 1)])
def test_two_convolutions_as_tap_products(k1: int, k2: int, pad2: int) -> None:
    # the product of a basic block's branch from tap products equals the product of the two sparse matrices
    from auditor.analysis.zero_matrices import operator_blocks

    torch.manual_seed(1)
    shape = (3, 6, 5)
    first = ConvOperator(torch.randn(4, 3, k1, k1, dtype=torch.float64), shape, stride=(1, 1), padding=(k1 // 2,) * 2)
    second_shape = (4, 6, 5)
    second = ConvOperator(torch.randn(3, 4, k2, k2, dtype=torch.float64), second_shape, stride=(1, 1),
                          padding=(pad2, pad2))
    assert tuple(second.output_shape) == shape
    expected = (_conv_sparse(second) @ _conv_sparse(first)).toarray()
    found = channel_major(operator_blocks([first, second], None), shape).toarray()
    assert np.abs(found - expected).max() < 1e-12 * np.abs(expected).max()


def test_factor_bytes_counts_what_the_factorization_keeps() -> None:
    from auditor.analysis.grid_lu import FactorTooLarge, factor_bytes

    grid = (2, 9, 8)
    blocks = pixel_blocks(sp.csr_matrix(_grid_operator(grid, 1, seed=6)), grid)
    factor = GridLU(blocks, grid)
    kept = sum(f.lu.nbytes + f.l21.nbytes + f.u12.nbytes for f in factor.fronts if f.lu is not None)
    assert factor_bytes(grid, 1) == kept
    with pytest.raises(FactorTooLarge, match="GiB"):
        GridLU(blocks, grid, max_bytes=kept - 1)


def test_a_factorization_over_the_budget_gives_an_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.analysis import zero_block_extremes as zbe

    torch.manual_seed(2)
    shape = (4, 12, 12)
    ops = [ConvOperator(torch.randn(4, 4, 3, 3, dtype=torch.float64), shape, stride=(1, 1), padding=(1, 1))
           for _ in range(2)]
    monkeypatch.setattr(zbe, "GRID_LU_MAX_BYTES", 1000)
    found = zbe.zero_operator_extremes(ops, zbe.IdentityShortcut(shape), dense_max=0)
    assert found.sigma_min is None and "GiB" in found.reason
    low, high = found.sigma_min_interval
    assert 0 <= low <= high
