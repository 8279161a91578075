"""Operator spectra against dense matrices built independently, in float64.

The reference circular convolution below shares no code with the library: it
sums rolled copies of the input (``torch.roll``), one per kernel tap, and
subsamples by slicing. The zero-padded reference is ``F.conv2d`` itself.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from auditor.analysis import spectra
from auditor.analysis.frequencies import half_plane
from auditor.analysis.spectra import (
    ConvOperator,
    conv_extreme_singular_values,
    conv_singular_values,
    extremes,
    linear_operator,
    to_polyphase,
)
from auditor.errors import InputError, UsageError
from _reference import circular_conv as _circular
from _reference import dense
from _reference import singular_values as _reference

D = torch.float64


# ---------------------------------------------------------------- references


def _zero_padded(x: torch.Tensor, op: ConvOperator) -> torch.Tensor:
    y = F.conv2d(x, op.weight.to(D), stride=op.stride, padding=op.padding, groups=op.groups)
    return y if op.out_scale is None else y * op.out_scale.to(D)[None, :, None, None]


def _dense(function, op: ConvOperator) -> np.ndarray:
    return dense(lambda x: function(x, op), op.input_shape)


def _assert_spectrum(values: np.ndarray, reference: np.ndarray) -> None:
    assert values.shape == reference.shape
    assert np.all(np.diff(values) <= 0), "not descending"
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-9)


def _op(c_out, c_in, k, hw, *, stride=1, padding=None, groups=1, scale=False, seed=0, width=None) -> ConvOperator:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=D)
    out_scale = (torch.rand(c_out, generator=g, dtype=D) + 0.3) if scale else None
    padding = (k - 1) // 2 if padding is None else padding
    return ConvOperator(weight, (c_in, hw, width or hw), stride, padding, groups, out_scale, f"conv{seed}")


# ---------------------------------------------------------------- circular, all values

CASES = {
    "3x3 s1 p1": dict(c_out=4, c_in=3, k=3, hw=6),
    "3x3 s1 p0": dict(c_out=4, c_in=4, k=3, hw=6, padding=0),
    "3x3 s2 p1": dict(c_out=5, c_in=3, k=3, hw=8, stride=2),
    "3x3 s2 p0": dict(c_out=3, c_in=4, k=3, hw=8, stride=2, padding=0),
    "1x1 s1": dict(c_out=6, c_in=4, k=1, hw=6),
    "1x1 s2 projection widening": dict(c_out=6, c_in=3, k=1, hw=8, stride=2, scale=True),
    "1x1 s2 projection narrowing": dict(c_out=3, c_in=5, k=1, hw=8, stride=2),
    "2x2 s2 p0 single tap after polyphase": dict(c_out=5, c_in=3, k=2, hw=6, stride=2, padding=0),
    "5x5 p2": dict(c_out=3, c_in=4, k=5, hw=6, padding=2),
    "7x7 s2 p3 stem": dict(c_out=5, c_in=3, k=7, hw=8, stride=2, padding=3, scale=True),
    "7x7 p3 kernel wraps": dict(c_out=3, c_in=3, k=7, hw=4, padding=3),
    "bn folded": dict(c_out=4, c_in=4, k=3, hw=8, scale=True),
    "groups 2": dict(c_out=6, c_in=4, k=3, hw=6, groups=2, scale=True),
    "groups 4 strided": dict(c_out=8, c_in=8, k=3, hw=8, stride=2, groups=4),
    "non-square map": dict(c_out=4, c_in=3, k=3, hw=6, width=10),
    "1x1 map": dict(c_out=5, c_in=3, k=3, hw=1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_circular_spectrum_equals_dense_svd(case: str) -> None:
    op = _op(**CASES[case], seed=len(case))
    _assert_spectrum(conv_singular_values(op), _reference(_dense(_circular, op)))


def test_both_gram_routes_are_exercised_and_exact() -> None:
    # 3x3 on 8x8: autocorrelation route; 5x5 on 6x6: frequency matrices P P^H
    auto, direct = _op(4, 4, 3, 8, seed=1), _op(4, 4, 5, 6, seed=2)
    assert spectra._autocorrelation_pairs(3, 3) < 4 * len(half_plane(8, 8)[0])
    assert spectra._autocorrelation_pairs(5, 5) >= 4 * len(half_plane(6, 6)[0])
    for op in (auto, direct):
        _assert_spectrum(conv_singular_values(op), _reference(_dense(_circular, op)))


def test_ill_conditioned_frequency_keeps_its_smallest_value() -> None:
    """sigma_min(P(0, 0)) = 1e-8 with sigma_max ~ 1e2: squaring (Gram) alone gives ~1e-6."""
    weight = 3 * torch.randn(4, 4, 3, 3, dtype=D, generator=torch.Generator().manual_seed(3))
    weight[:, :, 0, 0] *= 10
    u, s, vh = torch.linalg.svd(weight.sum(dim=(2, 3)))  # P(0, 0)
    weight[:, :, 1, 1] -= (s[-1] - 1e-8) * torch.outer(u[:, -1], vh[-1])
    op = ConvOperator(weight, (4, 6, 6), padding=1)
    values, reference = conv_singular_values(op), _reference(_dense(_circular, op))
    assert reference[-1] == pytest.approx(1e-8, rel=1e-3) and reference[0] > 50
    assert values[-1] == pytest.approx(reference[-1], rel=1e-5)
    _assert_spectrum(values, reference)


def test_linear_layer_is_its_matrix() -> None:
    weight = torch.randn(7, 5, dtype=D, generator=torch.Generator().manual_seed(4))
    values = conv_singular_values(linear_operator(weight, "fc"))
    np.testing.assert_allclose(values, np.linalg.svd(weight.numpy(), compute_uv=False), rtol=1e-12)


def test_kernel_slice_svd_is_not_the_operator_norm() -> None:
    """WeightWatcher-style per-slice SVDs miss the operator: its norm is larger."""
    op = _op(8, 6, 3, 8, seed=5)
    reference = _reference(_dense(_circular, op))
    values = conv_singular_values(op)
    assert values[0] == pytest.approx(reference[0], rel=1e-10)
    slices = op.weight.permute(2, 3, 0, 1).reshape(9, 8, 6)
    assert torch.linalg.svdvals(slices).max().item() < values[0]


def test_scaling_the_weight_scales_every_singular_value() -> None:
    op = _op(4, 3, 3, 6, seed=6)
    scaled = ConvOperator(-2.5 * op.weight, op.input_shape, padding=1)
    np.testing.assert_allclose(conv_singular_values(scaled), 2.5 * conv_singular_values(op), rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(
    c_out=st.integers(1, 4), c_in=st.integers(1, 4), k=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]), hw=st.sampled_from([2, 4, 6]), seed=st.integers(0, 10_000),
)
def test_property_circular_spectrum_equals_dense_svd(c_out, c_in, k, stride, hw, seed) -> None:
    op = _op(c_out, c_in, k, hw, stride=stride, padding=k // 2, seed=seed)
    _assert_spectrum(conv_singular_values(op), _reference(_dense(_circular, op)))


# ---------------------------------------------------------------- polyphase convention


@pytest.mark.parametrize(("stride", "factor"), [(1, 2), (2, 2), (2, 4), (1, 3)])
def test_polyphase_follows_pixel_unshuffle(stride: int, factor: int) -> None:
    op = _op(3, 4, 3, 12, stride=stride, groups=1, scale=True, seed=7)
    coarse = to_polyphase(op, factor)
    assert coarse.stride == (1, 1) and coarse.input_shape == (4 * factor**2, 12 // factor, 12 // factor)
    x = torch.randn(2, 4, 12, 12, dtype=D, generator=torch.Generator().manual_seed(8))
    expected = _circular(x, op)
    if factor // stride > 1:
        expected = F.pixel_unshuffle(expected, factor // stride)
    torch.testing.assert_close(_circular(F.pixel_unshuffle(x, factor), coarse), expected)


def test_polyphase_keeps_groups() -> None:
    op = _op(4, 4, 3, 8, stride=2, groups=2, seed=9)
    coarse = to_polyphase(op, 2)
    assert coarse.groups == 2 and coarse.weight.shape[1] == 2 * 4
    x = torch.randn(1, 4, 8, 8, dtype=D, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(_circular(F.pixel_unshuffle(x, 2), coarse), _circular(x, op))


def test_half_plane_multiplicities_cover_the_grid() -> None:
    for h, w in [(1, 1), (2, 2), (3, 4), (7, 7), (8, 6)]:
        u, v, mult = half_plane(h, w)
        assert mult.sum() == h * w
        full = set(zip(u.tolist(), v.tolist())) | {((-a) % h, (-b) % w) for a, b in zip(u.tolist(), v.tolist())}
        assert len(full) == h * w


# ---------------------------------------------------------------- errors


def test_circular_needs_divisible_sizes() -> None:
    op = _op(3, 3, 3, 7, stride=2)
    with pytest.raises(InputError, match="circular model does not apply") as info:
        conv_singular_values(op)
    assert "boundary='zero'" in info.value.one_line()


def test_invalid_operators_are_refused() -> None:
    weight = torch.randn(4, 3, 3, 3, dtype=D)
    with pytest.raises(InputError, match="dilation"):
        ConvOperator(weight, (3, 8, 8), dilation=(2, 2))
    with pytest.raises(InputError, match="channels"):
        ConvOperator(weight, (5, 8, 8))
    with pytest.raises(InputError, match="does not fit"):
        ConvOperator(weight, (3, 1, 1))
    with pytest.raises(InputError, match="out_scale"):
        ConvOperator(weight, (3, 8, 8), out_scale=torch.ones(3))
    with pytest.raises(UsageError):
        conv_singular_values(ConvOperator(weight, (3, 8, 8)), boundary="zero")
    with pytest.raises(UsageError):
        conv_extreme_singular_values(ConvOperator(weight, (3, 8, 8)), boundary="reflect")


# ---------------------------------------------------------------- zero boundary, extremes

ZERO_CASES = {
    "3x3 s1 p1": dict(c_out=4, c_in=3, k=3, hw=6),
    "3x3 s2 p1 odd size": dict(c_out=4, c_in=3, k=3, hw=7, stride=2, scale=True),
    "3x3 s1 p0 shrinking": dict(c_out=5, c_in=5, k=3, hw=6, padding=0),
    "1x1 s2 singular": dict(c_out=6, c_in=4, k=1, hw=8, stride=2),
    "groups": dict(c_out=8, c_in=4, k=3, hw=8, stride=2, groups=2),
    "5x5 p2 non-square": dict(c_out=3, c_in=6, k=5, hw=7, padding=2, width=9),
}


@pytest.mark.parametrize("route", ["dense", "banded", "lanczos"])
@pytest.mark.parametrize("case", list(ZERO_CASES), ids=list(ZERO_CASES))
def test_zero_boundary_extremes_equal_dense_svd(case: str, route: str, monkeypatch) -> None:
    op = _op(**ZERO_CASES[case], seed=len(case))
    reference = _reference(_dense(_zero_padded, op))
    if route != "dense":
        monkeypatch.setattr(spectra, "_DENSE_LIMIT", 0)
    if route == "lanczos":
        monkeypatch.setattr(spectra, "_BANDED_FLOPS", 0)
    result = conv_extreme_singular_values(op, boundary="zero", tol=1e-12)
    assert result.converged
    assert result.method == {"dense": "dense-zero", "banded": "banded-shift-invert-zero", "lanczos": "lanczos-zero"}[route]
    assert result.sigma_max == pytest.approx(reference[0], rel=1e-8)
    assert result.sigma_min == pytest.approx(reference[-1], rel=1e-6, abs=1e-7 * reference[0])


def test_extremes_circular_is_the_spectrum_ends() -> None:
    op = _op(4, 4, 3, 8, stride=2, seed=11)
    values = conv_singular_values(op)
    result = extremes(op)
    assert (result.sigma_max, result.sigma_min, result.converged, result.method) == (
        values[0], values[-1], True, "fft-circular")
    assert conv_extreme_singular_values(op, boundary="circular") == result
