"""Zero-padded block extremes (issue 23) against the dense operators of torch modules.

The reference is the block built from torch modules (``nn.Conv2d`` with its
padding, stride, groups; eval ``nn.BatchNorm2d``; ReLU taken as the identity):
its matrix is the module's response to the identity's columns minus its
response to zero (the BatchNorm shift), and numpy's SVD gives every singular
value. The operators under test are built by hand from the same modules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditor.analysis import zero_block_extremes as zero_module
from auditor.analysis.batched import blas_single_thread
from auditor.analysis.pooled_projection import pooled_projection
from auditor.analysis.spectra import ConvOperator, IdentityShortcut, OptionAShortcut
from auditor.analysis.zero_block_extremes import sparse_matrix, zero_block_extremes, zero_operator_extremes

from conftest import run_json

D = torch.float64


def _conv(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, bn: bool = True,
          seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)]
    if bn:
        norm = nn.BatchNorm2d(c_out)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-1, 1)
        norm.running_var.uniform_(0.3, 2.0)
        norm.running_mean.uniform_(-1, 1)
        layers.append(norm)
    return nn.Sequential(*layers).to(D).eval()


def _op(module: nn.Sequential, shape: tuple[int, int, int]) -> ConvOperator:
    conv = module[0]
    scale = None
    if len(module) > 1:
        bn = module[1]
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return ConvOperator(conv.weight.detach(), shape, stride=conv.stride, padding=conv.padding, groups=conv.groups,
                        out_scale=scale)


def _values(matrix: np.ndarray) -> np.ndarray:
    """Every singular value by numpy's SVD (one BLAS thread: tiny matrices on a busy machine)."""
    with blas_single_thread():
        return np.linalg.svd(matrix, compute_uv=False)


def _dense(function, shape: tuple[int, int, int]) -> np.ndarray:
    n = int(np.prod(shape))
    with torch.no_grad():
        columns = torch.eye(n, dtype=D).reshape(n, *shape)
        out = function(columns) - function(torch.zeros(1, *shape, dtype=D))
    return out.reshape(n, -1).T.numpy()


def _chain(modules: list[nn.Sequential], shape: tuple[int, int, int]) -> list[ConvOperator]:
    ops, x = [], torch.zeros(1, *shape, dtype=D)
    for module in modules:
        ops.append(_op(module, tuple(x.shape[1:])))
        x = module(x)
    return ops


@pytest.fixture(params=["torus", "nested-dissection"])
def route(request, monkeypatch) -> str:
    """The factorization of stride-1 operators on one grid: the torus capacitance solver (the default), or,
    with it turned off, the nested-dissection LU it falls back to."""
    if request.param == "nested-dissection":
        monkeypatch.setattr(zero_module, "torus_solver", lambda *args, **kwargs: None)
    return request.param


def _check(modules, shortcut_fn, shortcut_op, shape, *, force_sparse: bool = True, route: str | None = None,
           ) -> None:
    """Both operators (plain, residual) against the dense SVD, to 1e-6 relative; ``route``: the method that
    the residual of stride-1 convolutions on one grid must have taken."""
    ops = _chain(modules, shape)

    def plain(x):
        for module in modules:
            x = module(x)
        return x

    options = {"dense_max": 0} if force_sparse else {}
    found = zero_block_extremes(ops, shortcut_op, **options)
    for part, function in ((found.plain, plain), (found.residual, lambda x: plain(x) + shortcut_fn(x))):
        if part is None:
            continue
        values = _values(_dense(function, shape))
        assert part.sigma_max == pytest.approx(values[0], rel=1e-6)
        assert part.sigma_min is not None, part.reason
        assert part.sigma_min == pytest.approx(values[-1], rel=1e-6, abs=1e-9 * values[0])
    on_grid = all(op.stride == (1, 1) and op.input_shape[1:] == shape[1:] for op in ops)
    if route is not None and found.residual is not None and on_grid:
        taken = "torus-capacitance" if route == "torus" else "grid-lu"
        assert taken in found.residual.method and taken in found.plain.method + found.residual.method


def _pool_1x1(c_in: int, c_out: int, bn: bool) -> nn.Sequential:
    module = _conv(c_in, c_out, k=1, bn=bn, seed=3)
    return nn.Sequential(nn.AvgPool2d(2, 2), *module).to(D).eval()


SHAPE = (4, 8, 8)


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("kind", ["identity", "projection", "option_a", "pooled"])
def test_basic_blocks_equal_the_dense_operator(kind: str, bn: bool, route: str) -> None:
    c = SHAPE[0]
    if kind == "identity":
        modules = [_conv(c, c, bn=bn, seed=1), _conv(c, c, bn=bn, seed=2)]
        _check(modules, lambda x: x, IdentityShortcut(SHAPE), SHAPE, route=route)
        return
    modules = [_conv(c, 2 * c, stride=2, bn=bn, seed=1), _conv(2 * c, 2 * c, bn=bn, seed=2)]
    if kind == "option_a":
        shortcut = OptionAShortcut(SHAPE, 2 * c, 2, c // 2)
        _check(modules, lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, c // 2, c // 2)), shortcut, SHAPE)
    elif kind == "projection":
        projection = _conv(c, 2 * c, k=1, stride=2, bn=bn, seed=3)
        _check(modules, projection, _op(projection, SHAPE), SHAPE)
    else:
        pooled = _pool_1x1(c, 2 * c, bn)
        scale = None if not bn else pooled[2].weight.detach() / torch.sqrt(pooled[2].running_var + pooled[2].eps)
        _check(modules, pooled, pooled_projection(pooled[1].weight.detach(), 2, SHAPE, out_scale=scale), SHAPE)


def test_dense_path_and_sparse_matrix_agree_with_torch() -> None:
    modules = [_conv(4, 4, seed=5), _conv(4, 4, seed=6)]
    ops = _chain(modules, SHAPE)
    _check(modules, lambda x: x, IdentityShortcut(SHAPE), SHAPE, force_sparse=False)
    matrix = _dense(lambda x: modules[1](modules[0](x)) + x, SHAPE)
    assert np.abs(sparse_matrix(ops, IdentityShortcut(SHAPE)).toarray() - matrix).max() < 1e-12


def test_bottleneck_plain_branch_is_structurally_singular(route: str) -> None:
    shape = (8, 6, 6)
    modules = [_conv(8, 2, k=1, seed=1), _conv(2, 2, seed=2), _conv(2, 8, k=1, seed=3)]
    _check(modules, lambda x: x, IdentityShortcut(shape), shape, route=route)
    found = zero_block_extremes(_chain(modules, shape), None, dense_max=0)
    assert found.plain.sigma_min == 0.0 and "structural-zero" in found.plain.method


def test_inverted_residual_with_depthwise_conv(route: str) -> None:
    shape = (4, 6, 6)
    modules = [_conv(4, 8, k=1, seed=1), _conv(8, 8, groups=8, seed=2), _conv(8, 4, k=1, seed=3)]
    _check(modules, lambda x: x, IdentityShortcut(shape), shape, route=route)


def test_convnext_like_7x7_depthwise_block(route: str) -> None:
    shape = (4, 8, 8)
    modules = [_conv(4, 4, k=7, groups=4, seed=1), _conv(4, 16, k=1, bn=False, seed=2),
               _conv(16, 4, k=1, bn=False, seed=3)]
    _check(modules, lambda x: x, IdentityShortcut(shape), shape, route=route)


@pytest.mark.parametrize("large", [True, False])
def test_interval_contains_the_dense_value(large: bool, monkeypatch) -> None:
    modules = [_conv(4, 4, seed=7), _conv(4, 4, seed=8)]
    ops = _chain(modules, SHAPE)
    value = _values(_dense(lambda x: modules[1](modules[0](x)) + x, SHAPE))[-1]
    # large: beyond the sparse factorization and the torus solver's limits; else the inverse Lanczos stopped
    # after 2 steps
    limits = {"sparse_max_nnz": 0} if large else {"max_iterations": 2}
    if large:
        monkeypatch.setattr(zero_module, "torus_reachable", lambda *args, **kwargs: False)
    found = zero_operator_extremes(ops, IdentityShortcut(SHAPE), dense_max=0, **limits)
    assert found.sigma_min is None and "not certified" in (found.reason or "")
    low, high = found.sigma_min_interval
    assert low <= value * (1 + 1e-12) and value <= high * (1 + 1e-12)


@pytest.mark.parametrize("shortcut", [True, False])
def test_beyond_the_sparse_factorization_the_torus_certifies(shortcut: bool, monkeypatch) -> None:
    # an operator over the entry cap (a 64-channel block at 32 px, here forced by sparse_max_nnz=0) needs no
    # sparse matrix on the torus route: sigma_min certified, equal to the dense value; where that route's check
    # fails, an interval with the reason (no sparse matrix is built)
    modules = [_conv(4, 4, seed=9), _conv(4, 4, seed=10)]
    ops = _chain(modules, SHAPE)
    short = IdentityShortcut(SHAPE) if shortcut else None
    value = _values(_dense(lambda x: modules[1](modules[0](x)) + (x if shortcut else 0), SHAPE))[-1]
    found = zero_operator_extremes(ops, short, dense_max=0, sparse_max_nnz=0)
    assert "torus-capacitance" in found.method
    assert found.sigma_min == pytest.approx(value, rel=1e-6)
    monkeypatch.setattr(zero_module, "torus_solver", lambda *args, **kwargs: None)
    monkeypatch.setattr(zero_module, "sparse_matrix", lambda *args, **kwargs: pytest.fail("built"))
    monkeypatch.setattr(zero_module, "operator_blocks", lambda *args, **kwargs: pytest.fail("built"))
    found = zero_operator_extremes(ops, short, dense_max=0, sparse_max_nnz=0)
    assert found.sigma_min is None and "backward-error check" in found.reason
    low, high = found.sigma_min_interval
    assert low <= value * (1 + 1e-12) and value <= high * (1 + 1e-12)


def test_cli_json_says_zero_for_blocks(tiny_checkpoint, capsys) -> None:
    document = run_json(["condition", tiny_checkpoint, "--boundary", "zero", "--input-size", "4", "--no-progress"],
                        capsys)
    assert document["config"]["boundary"] == "zero"
    assert document["summary"]["boundary"] == "zero"
    assert document["blocks"] and all(block["boundary"] == "zero" for block in document["blocks"])
    assert all(layer["boundary"] == "zero" for layer in document["layers"])
    assert all(block["linear_method"]["plain"].startswith("zero: ") for block in document["blocks"])
    from rich.console import Console

    from auditor.report.condition_view import blocks_table

    console = Console(width=200, record=True)
    console.print(blocks_table(document))
    assert "Block conditioning (zero boundary" in console.export_text()


def test_plain_branch_of_square_factors_takes_each_factors_lu() -> None:
    # three square factors (1x1, 3x3, 1x1 at 4 channels): B^{-1} B^{-T} from the factors' own LUs
    shape = (4, 8, 8)
    modules = [_conv(4, 4, k=1, seed=11), _conv(4, 4, seed=12), _conv(4, 4, k=1, seed=13)]
    _check(modules, lambda x: x, IdentityShortcut(shape), shape)
    found = zero_operator_extremes(_chain(modules, shape), None, dense_max=0)
    assert "per-factor" in found.method


def test_plain_branch_with_a_singular_square_factor_is_zero() -> None:
    modules = [_conv(4, 4, seed=14, bn=False), _conv(4, 4, seed=15, bn=False)]
    modules[1][0].weight.data[:, :, 1, 1] = 0.0  # the centre tap's output channel 0 row ...
    modules[1][0].weight.data[0] = 0.0  # ... and output channel 0 entirely: W_2 has zero rows
    ops = _chain(modules, SHAPE)
    values = _values(_dense(lambda x: modules[1](modules[0](x)), SHAPE))
    assert values[-1] < 1e-12 * values[0]
    found = zero_operator_extremes(ops, None, dense_max=0)
    assert found.sigma_min == 0.0 and found.sigma_min_interval == (0.0, 0.0)
    assert found.sigma_max == pytest.approx(values[0], rel=1e-6)


def test_cli_max_iterations(tiny_checkpoint, capsys) -> None:
    from conftest import run_cli

    code, _, err = run_cli(["condition", tiny_checkpoint, "--boundary", "zero", "--max-iterations", "0"], capsys)
    assert code == 2 and "--max-iterations" in err and len(err.strip().splitlines()) == 1
    # 9 px: the first stage's operators (16 x 9 x 9) are beyond the dense SVD; one Lanczos step certifies nothing
    document = run_json(["condition", tiny_checkpoint, "--boundary", "zero", "--input-size", "9", "--no-progress",
                         "--max-iterations", "1"], capsys)
    first = [b for b in document["blocks"] if b["stage"] == document["blocks"][0]["stage"]]
    assert first and all("sigma_min_interval_residual" in b for b in first)
    low, high = first[0]["sigma_min_interval_residual"]
    assert 0 <= low <= high


@pytest.mark.parametrize("singular", [False, True])
def test_single_convolution_by_nested_dissection(singular: bool, monkeypatch) -> None:
    monkeypatch.setattr(zero_module, "torus_solver", lambda *args, **kwargs: None)
    # a layer of the zero-boundary table (one factor): 4 x 12 x 12 = 576 unknowns, cut once by the dissection
    shape = (4, 12, 12)
    module = _conv(4, 4, seed=21)
    if singular:
        module[0].weight.data[2] = 0.0  # output channel 2 is zero: sigma_min = 0
    found = zero_operator_extremes(_chain([module], shape), None, dense_max=0)
    values = _values(_dense(module, shape))
    assert found.sigma_max == pytest.approx(values[0], rel=1e-6)
    if singular:
        assert found.sigma_min == 0.0
    else:
        assert "grid-lu" in found.method
        assert found.sigma_min == pytest.approx(values[-1], rel=1e-6)


def test_strided_plain_branch_squares_only_its_first_factor() -> None:
    # B = W_2 W_1 with W_1 strided (wide): (B B^T)^{-1} from W_1 W_1^T and W_2's own LU; a zero output channel
    # of W_2 makes B exactly singular, which the squared route could not tell from 1e-9
    modules = [_conv(4, 8, stride=2, seed=31), _conv(8, 8, seed=32, bn=False)]
    ops = _chain(modules, SHAPE)
    values = _values(_dense(lambda x: modules[1](modules[0](x)), SHAPE))
    found = zero_operator_extremes(ops, None, dense_max=0)
    assert "per-factor" in found.method
    assert found.sigma_min == pytest.approx(values[-1], rel=1e-6)  # over min(rows, cols) = 128 values
    modules[1][0].weight.data[5] = 0.0
    found = zero_operator_extremes(_chain(modules, SHAPE), None, dense_max=0)
    assert found.sigma_min == 0.0


def test_gram_route_below_its_resolution_is_an_interval() -> None:
    # a wide plain branch whose last factor changes the channels (no per-factor route): G = B B^T is formed;
    # one output channel scaled by 1e-10 puts sigma_min below sqrt(n eps) sigma_max, where G cannot resolve it
    modules = [_conv(4, 8, stride=2, seed=33), _conv(8, 4, k=1, seed=34, bn=False)]
    shape_out = 4 * 4 * 4
    for scale, resolved in ((1.0, True), (1e-10, False)):
        modules[1][0].weight.data[2] *= scale
        ops = _chain(modules, SHAPE)
        values = _values(_dense(lambda x: modules[1](modules[0](x)), SHAPE))
        assert len(values) == shape_out
        found = zero_operator_extremes(ops, None, dense_max=0)
        assert found.sigma_max == pytest.approx(values[0], rel=1e-6)
        if resolved:
            assert found.sigma_min == pytest.approx(values[-1], rel=1e-6)
        else:
            low, high = found.sigma_min_interval
            assert found.sigma_min is None and "Gram matrix" in found.reason
            assert low <= values[-1] <= high


def test_cli_json_of_an_interval_without_upper_end(tiny_checkpoint, capsys, monkeypatch) -> None:
    # factors over the memory budget: sigma_min in [lower, inf); the JSON stays valid, the reason is there
    from auditor.analysis import zero_block_extremes as zbe

    monkeypatch.setattr(zbe, "GRID_LU_MAX_BYTES", 1000)
    document = run_json(["condition", tiny_checkpoint, "--boundary", "zero", "--input-size", "9", "--no-progress"],
                        capsys)
    first = [b for b in document["blocks"] if b["stage"] == document["blocks"][0]["stage"]]
    assert first and all(b["kappa_linear_residual"] is None for b in first)
    assert any("GiB" in str(b) for b in first)


@pytest.mark.parametrize("kernel, padding, groups, stride", [(3, 1, 2, 1), (5, 2, 4, 1), (3, 0, 1, 1), (3, 2, 1, 1),
                                                             (1, 0, 1, 1), (3, 1, 2, 2)])
def test_adjoint_is_the_transposed_matrix(kernel: int, padding: int, groups: int, stride: int) -> None:
    # stride 1 takes conv2d with the flipped kernel, strided convolutions conv_transpose2d: both the transpose
    from auditor.analysis.zero_block_extremes import block_map

    torch.manual_seed(kernel + padding + groups)
    op = ConvOperator(torch.randn(4, 4 // groups, kernel, kernel, dtype=D), (4, 7, 6), stride=stride,
                      padding=padding, groups=groups)
    mapping = block_map([op], None)
    matrix = sparse_matrix([op], None).toarray()
    rows = torch.eye(mapping.rows, dtype=D).reshape(mapping.rows, *mapping.output_shape)
    adjoint = mapping.adjoint(rows).reshape(mapping.rows, -1).numpy()  # row i: A^T e_i
    assert np.abs(adjoint - matrix).max() < 1e-13


def test_lanczos_cap_only_where_the_basis_is_large(monkeypatch) -> None:
    # beyond the sparse factorization, sigma_max's Lanczos runs max_iterations steps unless that basis would
    # exceed LANCZOS_BASIS_BYTES (224 px); then at most LARGE_MAX_STEPS, and ARPACK's restarted Lanczos (a
    # basis of 20) takes over where those did not converge
    modules = [_conv(4, 4, seed=11), _conv(4, 4, seed=12)]
    ops = _chain(modules, SHAPE)
    top = _values(_dense(lambda x: modules[1](modules[0](x)) + x, SHAPE))[0]
    full = zero_operator_extremes(ops, IdentityShortcut(SHAPE), dense_max=0, sparse_max_nnz=0)
    assert full.max_converged and full.sigma_max == pytest.approx(top, rel=1e-6)
    monkeypatch.setattr(zero_module, "LANCZOS_BASIS_BYTES", 0)
    monkeypatch.setattr(zero_module, "LARGE_MAX_STEPS", 3)
    capped = zero_operator_extremes(ops, IdentityShortcut(SHAPE), dense_max=0, sparse_max_nnz=0)
    assert capped.max_converged and capped.steps > 3 and capped.sigma_max == pytest.approx(top, rel=1e-6)
    # too few products for the restarts as well: a lower bound, said to be one
    short = zero_operator_extremes(ops, IdentityShortcut(SHAPE), dense_max=0, sparse_max_nnz=0, max_iterations=3)
    assert not short.max_converged and "restarted Lanczos" in short.reason
    assert short.sigma_max <= top * (1 + 1e-12)
