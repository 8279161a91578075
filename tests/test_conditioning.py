"""Block conditioning: exact spectra of whole blocks, the paper's formulas, Lemma 1.

References are dense matrices of the linearized block built from an
independent circular convolution (``torch.roll`` per tap, stride by slicing).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from auditor.analysis.conditioning import LEMMA_RTOL, block_singular_values, condition_block
from auditor.analysis.spectra import ConvOperator, IdentityShortcut, OptionAShortcut, conv_singular_values
from auditor.errors import InputError, UsageError
from _reference import block_matrix as _block_matrix
from _reference import singular_values as _svd

D = torch.float64


def _op(c_out, c_in, k, hw, *, stride=1, padding=None, groups=1, scale=False, seed=0) -> ConvOperator:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=D) / math.sqrt(k * k * c_in)
    out_scale = (torch.rand(c_out, generator=g, dtype=D) + 0.3) if scale else None
    padding = (k - 1) // 2 if padding is None else padding
    return ConvOperator(weight, (c_in, hw, hw), stride, padding, groups, out_scale, f"conv{seed}")


def _bottleneck_identity(bn: bool, seed: int = 0):
    # 1x1 8 -> 3, 3x3 3 -> 3, 1x1 3 -> 8: A = I + W3 M W1 reduces to 6 of 8 dimensions
    return [_op(3, 8, 1, 6, scale=bn, seed=seed), _op(3, 3, 3, 6, scale=bn, seed=seed + 1),
            _op(8, 3, 1, 6, scale=bn, seed=seed + 2)]


def _assert_equal(values: np.ndarray, reference: np.ndarray) -> None:
    assert values.shape == reference.shape
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- exact spectra of blocks


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("with_shortcut", [True, False])
def test_bottleneck_identity_block_equals_dense(bn: bool, with_shortcut: bool) -> None:
    convs = _bottleneck_identity(bn)
    shortcut = IdentityShortcut((8, 6, 6)) if with_shortcut else None
    _assert_equal(block_singular_values(convs, shortcut), _svd(_block_matrix(convs, shortcut)))


def test_bottleneck_v1_stride_in_first_conv_with_projection() -> None:
    # torchvision v1 / Caffe style: the 1x1 carries the stride
    convs = [_op(3, 4, 1, 8, stride=2, padding=0, scale=True, seed=3), _op(3, 3, 3, 4, scale=True, seed=4),
             _op(6, 3, 1, 4, padding=0, scale=True, seed=5)]
    projection = _op(6, 4, 1, 8, stride=2, padding=0, scale=True, seed=6)
    _assert_equal(block_singular_values(convs, projection), _svd(_block_matrix(convs, projection)))


def test_rank_deficient_projection_block_like_resnet50_layer2_0() -> None:
    # 3x8x8 -> 8x4x4; W3 (8x2) and the projection (rank 3) reach only 5 of 8 output channels
    convs = [_op(2, 3, 1, 8, padding=0, scale=True, seed=15), _op(2, 2, 3, 8, stride=2, seed=16),
             _op(8, 2, 1, 4, padding=0, scale=True, seed=17)]
    projection = _op(8, 3, 1, 8, stride=2, padding=0, scale=True, seed=18)
    values = block_singular_values(convs, projection)
    _assert_equal(values, _svd(_block_matrix(convs, projection)))
    assert np.sum(values < 1e-12) == 3 * 16  # 3 structural zeros at each of the 16 frequencies
    result = condition_block(convs, projection)
    assert result.kappa_linear_residual is None and "singular" in result.kappa_linear_residual_reason


def test_two_strided_layers_compose_on_the_coarsest_grid() -> None:
    convs = [_op(3, 2, 3, 8, stride=2, seed=7), _op(4, 3, 3, 4, stride=2, seed=8)]
    projection = _op(4, 2, 1, 8, stride=4, padding=0, seed=9)
    _assert_equal(block_singular_values(convs, projection), _svd(_block_matrix(convs, projection)))


def test_wide_block_lists_min_rows_cols_values() -> None:
    # 3x8x8 (192) -> 6x4x4 (96): a wide operator, 96 values
    convs = [_op(6, 3, 3, 8, stride=2, seed=10), _op(6, 6, 3, 4, seed=11)]
    shortcut = OptionAShortcut((3, 8, 8), 6, 2, 1)
    values = block_singular_values(convs, shortcut)
    assert values.shape == (96,)
    _assert_equal(values, _svd(_block_matrix(convs, shortcut)))


def test_block_shapes_must_chain() -> None:
    convs = [_op(3, 3, 3, 6, padding=0, seed=12), _op(3, 3, 3, 4, seed=13)]  # 'valid' padding shrinks
    with pytest.raises(InputError, match="circular model") as info:
        block_singular_values(convs, None)
    assert "'same' padding" in info.value.one_line()
    with pytest.raises(InputError, match="shortcut"):
        block_singular_values([_op(4, 3, 3, 6, seed=14)], IdentityShortcut((3, 6, 6)))
    with pytest.raises(UsageError):
        block_singular_values([], None)


# ---------------------------------------------------------------- the paper's quantities


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["identity", "option_a", "projection"])
def test_condition_block_matches_dense_and_definitions(kind: str) -> None:
    if kind == "identity":
        convs, shortcut = _bottleneck_identity(True, seed=20), IdentityShortcut((8, 6, 6))
    elif kind == "option_a":
        convs = [_op(6, 3, 3, 8, stride=2, scale=True, seed=23), _op(6, 6, 3, 4, scale=True, seed=24)]
        shortcut = OptionAShortcut((3, 8, 8), 6, 2, 2)
    else:
        convs = [_op(4, 3, 3, 8, stride=2, seed=25), _op(4, 4, 3, 4, seed=26)]
        shortcut = _op(4, 3, 1, 8, stride=2, padding=0, scale=True, seed=27)
    result = condition_block(convs, shortcut, name="b", stage="s")
    dense_residual, dense_plain = _svd(_block_matrix(convs, shortcut)), _svd(_block_matrix(convs, None))
    # per-layer extremes and their products
    for entry, op in zip(result.sigma, convs):
        values = _svd(_block_matrix([op], None))
        assert (entry.max, entry.min) == pytest.approx((values[0], values[-1]), rel=1e-8)
    big_m, small_m = math.prod(s.max for s in result.sigma), math.prod(s.min for s in result.sigma)
    s_max, s_min = (1.0, 1.0)
    if kind == "projection":
        spectrum = conv_singular_values(shortcut)
        s_max, s_min = spectrum[0], spectrum[-1]
    assert result.shortcut == kind and result.shortcut_norms == pytest.approx((s_max, s_min))
    assert result.kappa_paper_residual == pytest.approx((big_m + s_max) / (small_m + s_min), rel=1e-12)
    assert result.kappa_paper_plain == pytest.approx(big_m / small_m, rel=1e-12)
    assert result.sigma_linear_residual == pytest.approx((dense_residual[0], dense_residual[-1]), rel=1e-7)
    assert result.kappa_linear_residual == pytest.approx(dense_residual[0] / dense_residual[-1], rel=1e-6)
    if dense_plain[-1] > 1e-10 * dense_plain[0]:
        assert result.kappa_linear_plain == pytest.approx(dense_plain[0] / dense_plain[-1], rel=1e-6)
    else:
        assert result.kappa_linear_plain is None and "singular" in result.kappa_linear_plain_reason
    lower, upper = result.lemma1_bounds
    assert (lower, upper) == pytest.approx((small_m + s_min, big_m + s_max))
    assert result.lemma1_upper_holds is bool(dense_residual[0] <= upper * (1 + LEMMA_RTOL))
    assert result.lemma1_lower_holds is bool(dense_residual[-1] >= lower * (1 - LEMMA_RTOL))
    assert result.lemma1_upper_holds  # the triangle inequality: always


@pytest.mark.parametrize("spatial", [False, True])
def test_lemma1_counterexample(spatial: bool) -> None:
    """W2 W1 = -I/2 on 4 channels: A = I/2, sigma_min 1/2 < prod m_i + 1 = 3/2."""
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(0)))
    w1, w2 = q / math.sqrt(2), -q.T / math.sqrt(2)
    hw = 6 if spatial else 3
    if spatial:  # the same products as 3x3 kernels with only the centre tap, on a bigger map
        k1, k2 = torch.zeros(4, 4, 3, 3, dtype=D), torch.zeros(4, 4, 3, 3, dtype=D)
        k1[:, :, 1, 1], k2[:, :, 1, 1] = w1, w2
        convs = [ConvOperator(k1, (4, hw, hw), padding=1), ConvOperator(k2, (4, hw, hw), padding=1)]
    else:
        convs = [ConvOperator(w1.reshape(4, 4, 1, 1), (4, hw, hw)), ConvOperator(w2.reshape(4, 4, 1, 1), (4, hw, hw))]
    result = condition_block(convs, IdentityShortcut((4, hw, hw)))
    assert [s.min for s in result.sigma] == pytest.approx([1 / math.sqrt(2)] * 2)
    assert result.sigma_linear_residual == pytest.approx((0.5, 0.5))
    assert result.lemma1_bounds == pytest.approx((1.5, 1.5))
    assert result.lemma1_upper_holds is True
    assert result.lemma1_lower_holds is False
    assert result.kappa_paper_residual == pytest.approx(1.0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_lemma1_lower_bound_is_sharp(sign: float) -> None:
    """W2 W1 = sign * eps * I: A = (1 + sign eps) I against the bound 1 + eps.

    sign +1 meets the bound with equality (holds within LEMMA_RTOL); sign -1
    misses it by 2 eps only.
    """
    eps = 0.1
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=D, generator=torch.Generator().manual_seed(1)))
    convs = [ConvOperator((math.sqrt(eps) * q).reshape(5, 5, 1, 1), (5, 4, 4)),
             ConvOperator((sign * math.sqrt(eps) * q.T).reshape(5, 5, 1, 1), (5, 4, 4))]
    result = condition_block(convs, IdentityShortcut((5, 4, 4)))
    assert result.sigma_linear_residual == pytest.approx((1 + sign * eps,) * 2)
    assert result.lemma1_bounds == pytest.approx((1 + eps, 1 + eps))
    assert result.lemma1_lower_holds is (sign > 0)
    assert result.lemma1_upper_holds is True


def test_singular_and_inexpressible_blocks_give_null_with_reasons() -> None:
    convs = _bottleneck_identity(False, seed=30)  # W3 W2 W1: 8 -> 3 -> 8, rank 3 of 8
    result = condition_block(convs, IdentityShortcut((8, 6, 6)), name="b")
    assert result.kappa_linear_plain is None and "singular" in result.kappa_linear_plain_reason
    assert result.kappa_linear_residual is not None
    other = condition_block(convs, None, shortcut_kind="other")
    assert other.shortcut == "other" and other.kappa_linear_residual is None
    assert "not a linear operator" in other.kappa_linear_residual_reason
    assert other.lemma1_upper_holds is None and other.lemma1_lower_holds is None
    # a projection that discards input is singular; with a singular layer the paper's ratio is undefined
    zero = ConvOperator(torch.zeros(3, 3, 3, 3, dtype=D), (3, 4, 4), padding=1, name="dead")
    projection = _op(3, 3, 1, 4, padding=0, seed=31)
    dead = condition_block([zero], ConvOperator(torch.zeros(3, 3, 1, 1, dtype=D), (3, 4, 4)))
    assert dead.kappa_paper_residual is None and dead.kappa_paper_residual_reason
    assert condition_block([zero], projection).kappa_paper_plain is None
    for entry in (result, other, dead):
        json.dumps(entry.to_dict(), allow_nan=False)  # JSON-safe: no NaN, no inf


def test_layer_extremes_are_used_as_given() -> None:
    convs = [_op(3, 3, 3, 4, seed=32), _op(3, 3, 3, 4, seed=33)]
    result = condition_block(convs, IdentityShortcut((3, 4, 4)), layer_extremes=[(2.0, 0.5), (3.0, 0.25)])
    assert result.kappa_paper_residual == pytest.approx((6 + 1) / (0.125 + 1))
    with pytest.raises(UsageError):
        condition_block(convs, None, layer_extremes=[(1.0, 1.0)])


def test_to_dict_carries_the_contract_names() -> None:
    convs = [_op(3, 3, 3, 4, seed=34), _op(3, 3, 3, 4, seed=35)]
    entry = condition_block(convs, IdentityShortcut((3, 4, 4)), name="layer1.0", stage="layer1").to_dict()
    for key in ("name", "stage", "shortcut", "sigma", "kappa_paper_residual", "kappa_paper_plain",
                "kappa_linear_residual", "kappa_linear_plain", "lemma1_upper_holds", "lemma1_lower_holds"):
        assert key in entry
    assert set(entry["sigma"][0]) == {"layer", "max", "min"}


# ---------------------------------------------------------------- properties


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), channels=st.integers(1, 3), scale=st.floats(0.1, 10.0), bn=st.booleans())
def test_properties(seed: int, channels: int, scale: float, bn: bool) -> None:
    convs = [_op(channels, channels, 3, 4, scale=bn, seed=seed), _op(channels, channels, 3, 4, scale=bn, seed=seed + 1)]
    shortcut = IdentityShortcut((channels, 4, 4))
    result = condition_block(convs, shortcut)
    for key in ("kappa_paper_residual", "kappa_paper_plain", "kappa_linear_residual", "kappa_linear_plain"):
        value = getattr(result, key)
        assert value is None or value >= 1 - 1e-12, key
    big_m, small_m = math.prod(s.max for s in result.sigma), math.prod(s.min for s in result.sigma)
    if result.kappa_paper_plain is not None and big_m > small_m * (1 + 1e-9):
        assert result.kappa_paper_residual < result.kappa_paper_plain
    assert result.lemma1_upper_holds
    # scale the first weight: the plain kappas do not move, the residual ones may
    scaled = [ConvOperator(scale * convs[0].weight, convs[0].input_shape, padding=1, out_scale=convs[0].out_scale),
              convs[1]]
    again = condition_block(scaled, shortcut)
    assert again.kappa_paper_plain == pytest.approx(result.kappa_paper_plain, rel=1e-9)
    if result.kappa_linear_plain is not None and again.kappa_linear_plain is not None:
        assert again.kappa_linear_plain == pytest.approx(result.kappa_linear_plain, rel=1e-6)


def test_residual_kappas_are_not_scale_invariant() -> None:
    convs = [_op(3, 3, 3, 4, seed=40), _op(3, 3, 3, 4, seed=41)]
    base = condition_block(convs, IdentityShortcut((3, 4, 4)))
    scaled = condition_block([ConvOperator(5 * convs[0].weight, (3, 4, 4), padding=1), convs[1]],
                             IdentityShortcut((3, 4, 4)))
    assert scaled.kappa_linear_residual != pytest.approx(base.kappa_linear_residual, rel=1e-3)
    assert scaled.kappa_paper_residual != pytest.approx(base.kappa_paper_residual, rel=1e-3)
