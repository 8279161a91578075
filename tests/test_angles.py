"""Median principal angles (auditor.analysis.angles) against independent references.

References used here never share code with the implementation: a Python loop
over pairs with float64 ``arccos`` of normalised dot products, a ``decimal``
computation at 50 digits for nearly parallel vectors, and numpy's SVD with
``scipy.linalg.subspace_angles`` for class subspaces.
"""

from __future__ import annotations

import itertools
import math
from decimal import Decimal, getcontext

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.linalg import subspace_angles

from auditor.analysis.angles import StageAngles, median_angles, median_angles_h5
from auditor.analysis.angles import source as angles_source
from auditor.analysis.angles import tiling as angles_tiling
from auditor.errors import DataError, InputError, StoreError, UsageError

TOL = 1e-6  # degrees


# --------------------------------------------------------------------------- references


def _loop_reference(x, labels, n_classes, *, center=False):
    """Medians by a Python loop over pairs: float64 arccos of normalised dots.

    Within 0.81 degrees of 0 or 180, where arccos loses up to half the digits
    (identical rows give 1.2e-6 degrees, not 0), the angle is taken from the
    50-digit ``_decimal_angle`` instead.
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    labels = np.asarray(labels)
    norms = np.linalg.norm(x, axis=1)
    ok = norms > 0
    if center:
        x = x - x[ok].mean(axis=0)
        norms = np.linalg.norm(x, axis=1)
        ok &= norms > 0
    members = [np.flatnonzero(ok & (labels == c)) for c in range(n_classes)]

    def angle(i, j):
        cos = float(np.dot(x[i], x[j]) / (norms[i] * norms[j]))
        if abs(cos) > 0.9999:
            return _decimal_angle(x[i], x[j])
        return math.degrees(math.acos(min(1.0, max(-1.0, cos))))

    intra = {}
    for c in range(n_classes):
        vals = [angle(i, j) for i, j in itertools.combinations(members[c], 2)]
        intra[c] = float(np.median(vals)) if vals else None
    inter = {}
    for c, d in itertools.combinations(range(n_classes), 2):
        vals = [angle(i, j) for i in members[c] for j in members[d]]
        inter[(c, d)] = float(np.median(vals)) if vals else None
    return intra, inter, [m.size for m in members]


def _all_angles(x, idx_a, idx_b=None):
    """Every angle (degrees) within idx_a (i < j) or between idx_a and idx_b."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    if idx_b is None:
        g = u[idx_a] @ u[idx_a].T
        g = g[np.triu_indices(idx_a.size, 1)]
    else:
        g = (u[idx_a] @ u[idx_b].T).ravel()
    return np.degrees(np.arccos(np.clip(g, -1, 1)))


def _decimal_angle(a, b):
    """Angle in degrees between a and b, norms of the unit-vector sum/difference in 50 digits."""
    getcontext().prec = 50
    da = [Decimal(float(v)) for v in a]
    db = [Decimal(float(v)) for v in b]
    na = sum(v * v for v in da).sqrt()
    nb = sum(v * v for v in db).sqrt()
    ua = [v / na for v in da]
    ub = [v / nb for v in db]
    diff = sum((p - q) ** 2 for p, q in zip(ua, ub)).sqrt()
    summ = sum((p + q) ** 2 for p, q in zip(ua, ub)).sqrt()
    return math.degrees(2.0 * math.atan2(float(diff), float(summ)))


def _assert_matches(result, intra, inter, counts, names):
    for c, name in enumerate(names):
        assert result.counts[name] == counts[c]
        if intra[c] is None:
            assert result.intra[name] is None
            assert result.intra_reason[name]
        else:
            assert result.intra[name] == pytest.approx(intra[c], abs=TOL)
    for (c, d), value in inter.items():
        key = f"{names[c]}|{names[d]}"
        if value is None:
            assert result.inter[key] is None
            assert result.inter_reason[key]
        else:
            assert result.inter[key] == pytest.approx(value, abs=TOL)


def _mixed_set(seed=0, n=70, shape=(3, 2, 2)):
    """Classes: 'big', 'single' (1 sample), 'zeros' (some zero vectors), 'mid', 'empty'."""
    rng = np.random.default_rng(seed)
    names = ["big", "single", "zeros", "mid", "empty"]
    labels = np.r_[np.zeros(30), [1], np.full(15, 2), np.full(n - 46, 3)].astype(int)
    labels = rng.permutation(labels)
    x = rng.standard_normal((n, *shape)) + 0.5 * labels.reshape(-1, *[1] * len(shape))
    zero_rows = np.flatnonzero(labels == 2)[:4]
    x[zero_rows] = 0.0
    return x, labels, names


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("block_rows", "tile_rows"),
    [(1024, 256), (7, 3), (16, 5), (1, 1), (70, 256), (69, 4)],
)
def test_matches_pairwise_loop(monkeypatch, block_rows, tile_rows):
    monkeypatch.setattr(angles_tiling, "_TILE_ROWS", tile_rows)
    x, labels, names = _mixed_set()
    intra, inter, counts = _loop_reference(x, labels, len(names))
    result = median_angles(x, labels, names, block_rows=block_rows)
    _assert_matches(result, intra, inter, counts, names)
    assert result.excluded_zero == {"big": 0, "single": 0, "zeros": 4, "mid": 0, "empty": 0}
    assert "1 valid sample" in result.intra_reason["single"]
    assert result.intra_reason["empty"] == "no samples"
    assert "empty" in result.inter_reason["big|empty"]
    assert result.inter["big|single"] is not None
    assert not result.pairs_sampled
    finite_inter = [v for v in result.inter.values() if v is not None]
    finite_intra = [v for v in result.intra.values() if v is not None]
    assert result.separation == pytest.approx(min(finite_inter) - max(finite_intra))


def test_matches_pairwise_loop_float32_and_centered():
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((50, 40)), 0).astype(np.float32)  # ReLU-like
    labels = rng.integers(0, 3, 50)
    x[3] = 0
    names = ["a", "b", "c"]
    for center in (False, True):
        intra, inter, counts = _loop_reference(x, labels, 3, center=center)
        result = median_angles(x, labels, names, center=center, block_rows=9)
        _assert_matches(result, intra, inter, counts, names)


def test_many_classes_match_pairwise_loop(monkeypatch):
    monkeypatch.setattr(angles_tiling, "_TILE_ROWS", 8)
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 40, 120)
    x = rng.standard_normal((120, 6)) + labels[:, None] % 3
    names = [f"k{i}" for i in range(40)]
    intra, inter, counts = _loop_reference(x, labels, 40)
    _assert_matches(median_angles(x, labels, names, block_rows=32), intra, inter, counts, names)


def test_even_count_median_is_mean_of_middle_values():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    r = median_angles(x, [0, 0, 1, 1], ["a", "b"])
    # inter pairs: 180, 90, 90, 180 -> mean of the middle two, 135
    assert r.inter["a|b"] == pytest.approx(135.0)
    assert r.intra["a"] == pytest.approx(90.0)


def test_three_angle_median():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    r = median_angles(x, [0, 0, 0], ["a"])
    assert r.intra["a"] == pytest.approx(45.0)  # sorted 45, 45, 90


def test_extreme_float64_scales_are_rescaled():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 6))
    labels = np.arange(12) % 2
    scale = np.array([1e-200, 1e200, 1.0] * 4)
    scaled = x * scale[:, None]
    a = median_angles(x, labels, ["p", "q"])
    b = median_angles(scaled, labels, ["p", "q"])
    assert b.counts == a.counts
    for key in a.inter:
        assert b.inter[key] == pytest.approx(a.inter[key], abs=1e-9)
    for key in a.intra:
        assert b.intra[key] == pytest.approx(a.intra[key], abs=1e-9)


# --------------------------------------------------------------------------- properties

_value = st.one_of(
    st.just(0.0),
    st.floats(1e-3, 100.0),
    st.floats(-100.0, -1e-3),
)


@st.composite
def _labelled(draw, max_n=10, max_d=5, n_classes=3):
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(1, max_d))
    x = draw(arrays(np.float64, (n, d), elements=_value))
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, n_classes - 1)))
    return x, labels


_NAMES = ["a", "b", "c"]
_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _values(r: StageAngles):
    return [v for v in [*r.intra.values(), *r.inter.values()] if v is not None]


@_settings
@given(_labelled())
def test_property_range_and_loop(data):
    x, labels = data
    r = median_angles(x, labels, _NAMES, block_rows=3)
    assert all(0.0 <= v <= 180.0 for v in _values(r))
    intra, inter, counts = _loop_reference(x, labels, 3)
    _assert_matches(r, intra, inter, counts, _NAMES)


@_settings
@given(_labelled(), st.data())
def test_property_positive_scaling(data, draw):
    x, labels = data
    scale = draw.draw(arrays(np.float64, (x.shape[0],), elements=st.floats(1e-3, 1e3)))
    a = median_angles(x, labels, _NAMES)
    b = median_angles(x * scale[:, None], labels, _NAMES)
    assert a.counts == b.counts and a.excluded_zero == b.excluded_zero
    for k in a.intra:
        assert (a.intra[k] is None) == (b.intra[k] is None)
        if a.intra[k] is not None:
            assert b.intra[k] == pytest.approx(a.intra[k], abs=1e-7)
    for k in a.inter:
        if a.inter[k] is not None:
            assert b.inter[k] == pytest.approx(a.inter[k], abs=1e-7)


@_settings
@given(
    arrays(np.float64, st.integers(1, 6), elements=st.floats(0.1, 10.0)),
    st.integers(2, 6),
    st.lists(st.floats(0.01, 100.0), min_size=6, max_size=6),
)
def test_property_identical_directions_give_zero_intra(v, copies, scales):
    x = np.array([v * s for s in scales[:copies]])
    r = median_angles(x, np.zeros(copies, dtype=int), ["only"])
    assert r.intra["only"] == pytest.approx(0.0, abs=1e-9)
    assert median_angles(np.array([v] * copies), [0] * copies, ["only"]).intra["only"] == 0.0


@_settings
@given(_labelled(), st.randoms(use_true_random=False))
def test_property_permutation_invariance(data, random):
    x, labels = data
    order = list(range(x.shape[0]))
    random.shuffle(order)
    a = median_angles(x, labels, _NAMES, block_rows=2)
    b = median_angles(x[order], labels[order], _NAMES, block_rows=3)
    assert a.counts == b.counts
    for mine, theirs in ((a.intra, b.intra), (a.inter, b.inter)):
        for k, v in mine.items():
            if v is None:
                assert theirs[k] is None
            else:
                assert theirs[k] == pytest.approx(v, abs=1e-9)


@_settings
@given(_labelled(n_classes=2))
def test_property_inter_symmetric_under_class_swap(data):
    x, labels = data
    a = median_angles(x, labels, ["a", "b"])
    b = median_angles(x, 1 - labels, ["b", "a"])
    assert b.inter["b|a"] == a.inter["a|b"]
    assert b.intra == a.intra
    assert b.counts == a.counts


@_settings
@given(
    arrays(np.float64, st.integers(2, 24), elements=st.floats(0.1, 10.0) | st.floats(-10.0, -0.1)),
    st.integers(0, 2**32 - 1),
    st.floats(1e-9, 1e-4),
    st.booleans(),
)
def test_property_nearly_parallel_is_accurate(u, seed, delta, antipodal):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(u.size)
    v = u + delta * np.linalg.norm(u) * w / np.linalg.norm(w)
    if antipodal:
        v = -v
    ref = _decimal_angle(u, v)
    # cos ~ 1 - 1e-12 .. 1 - 1e-20: arccos alone is off by up to 1e-4 relative here.
    x = np.array([u, v])
    r = median_angles(x, [0, 1], ["u", "v"])
    assert r.inter["u|v"] == pytest.approx(ref, rel=1e-8, abs=1e-12)
    r = median_angles(x, [0, 0], ["uv"])
    assert r.intra["uv"] == pytest.approx(ref, rel=1e-8, abs=1e-12)


def test_nearly_parallel_in_a_larger_tile():
    # Many nearly parallel pairs mixed with ordinary ones, across tiles.
    rng = np.random.default_rng(9)
    base = rng.standard_normal((8, 30))
    x = np.repeat(base, 5, axis=0) + 1e-7 * rng.standard_normal((40, 30))
    labels = np.repeat(np.arange(8), 5) % 2
    r = median_angles(x, labels, ["a", "b"], block_rows=6)
    for c, name in enumerate(["a", "b"]):
        idx = np.flatnonzero(labels == c)
        ref = np.median([_decimal_angle(x[i], x[j]) for i, j in itertools.combinations(idx, 2)])
        assert r.intra[name] == pytest.approx(ref, rel=1e-8, abs=1e-12)


# --------------------------------------------------------------------------- HDF5


def _write_store(path, x):
    with h5py.File(path, "w") as f:
        f.create_dataset("stages/layer1", data=x, chunks=(1, *x.shape[1:]))


@pytest.mark.parametrize(
    "options",
    [{}, {"block_rows": 5}, {"center": True, "block_rows": 8}, {"max_pairs": 40, "seed": 3},
     {"subspace_k": 3, "block_rows": 6}],
)
def test_hdf5_equals_in_memory(tmp_path, monkeypatch, options):
    monkeypatch.setattr(angles_source, "_READ_BYTES", 2 * 3 * 4 * 4 * 4)  # 2 rows per read
    x, labels, names = _mixed_set(n=50, shape=(3, 4, 4))
    x = x.astype(np.float32)
    _write_store(tmp_path / "s.h5", x)
    expected = median_angles(x, labels, names, **options)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        got = median_angles_h5(f["stages/layer1"], labels, names, **options)
        again = median_angles(f["stages/layer1"], labels, names, **options)
    assert got == expected
    assert again == expected


def test_hdf5_float16_equals_in_memory(tmp_path):
    x, labels, names = _mixed_set(n=50, shape=(2, 3, 3))
    x = x.astype(np.float16)
    _write_store(tmp_path / "s.h5", x)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        got = median_angles_h5(f["stages/layer1"], labels, names, block_rows=7)
    assert got == median_angles(x, labels, names, block_rows=7)
    intra, inter, counts = _loop_reference(x, labels, len(names))
    _assert_matches(got, intra, inter, counts, names)


class _Recorder:
    """A lazy array-like that records the row ranges read."""

    def __init__(self, x):
        self._x = x
        self.shape = x.shape
        self.dtype = x.dtype
        self.chunks = (1, *x.shape[1:])
        self.name = "/stages/wrapped"
        self.reads = []

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self._x[key]


def test_lazy_source_is_read_in_bounded_sample_order_slices(monkeypatch):
    monkeypatch.setattr(angles_source, "_READ_BYTES", 3 * 48 * 8)
    x, labels, names = _mixed_set(n=60, shape=(3, 4, 4))
    src = _Recorder(x)
    assert median_angles(src, labels, names, block_rows=10) == median_angles(
        x, labels, names, block_rows=10
    )
    assert max(b - a for a, b in src.reads) <= 3
    # Within each pass rows are read in increasing order; never the whole set at once.
    assert len(src.reads) > 60 // 3
    # A lazy wrapper of a dataset (like the store's bfloat16 stages) is a valid store input.
    assert median_angles_h5(src, labels, names) == median_angles(x, labels, names)


def test_hdf5_errors_name_the_dataset(tmp_path):
    x = np.ones((4, 2, 2, 2), dtype=np.float32)
    _write_store(tmp_path / "s.h5", x)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        ds = f["stages/layer1"]
    with pytest.raises(StoreError, match="closed"):
        median_angles_h5(ds, [0, 0, 1, 1], ["a", "b"])
    with pytest.raises(StoreError, match="h5py.Dataset"):
        median_angles_h5(x, [0, 0, 1, 1], ["a", "b"])


# --------------------------------------------------------------------------- sampling


def _sampling_set():
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(3), 300)
    x = rng.standard_normal((900, 20)) + 0.8 * np.eye(3, 20)[labels] * 3
    return x, labels, ["a", "b", "c"]


def test_max_pairs_is_seeded_and_reproducible():
    x, labels, names = _sampling_set()
    a = median_angles(x, labels, names, max_pairs=500, seed=1, block_rows=128)
    b = median_angles(x, labels, names, max_pairs=500, seed=1, block_rows=300)
    c = median_angles(x, labels, names, max_pairs=500, seed=2, block_rows=128)
    assert a.pairs_sampled
    assert a.intra == b.intra and a.inter == b.inter
    assert a.intra != c.intra


def test_max_pairs_above_population_is_exact():
    x, labels, names = _mixed_set()
    exact = median_angles(x, labels, names)
    big = median_angles(x, labels, names, max_pairs=10**6)
    assert not big.pairs_sampled
    assert big == exact


def test_max_pairs_is_close_to_exact():
    x, labels, names = _sampling_set()
    k = 4000
    r = median_angles(x, labels, names, max_pairs=k, seed=0, block_rows=256)
    exact = median_angles(x, labels, names)
    # The sampled median's rank in the full distribution is ~ N(1/2, 1/(4k)).
    band = 5 * 0.5 / math.sqrt(k)
    for c, name in enumerate(names):
        full = _all_angles(x, np.flatnonzero(labels == c))
        assert abs(np.mean(full < r.intra[name]) - 0.5) < band
        assert exact.intra[name] == pytest.approx(np.median(full), abs=TOL)
    for c, d in itertools.combinations(range(3), 2):
        key = f"{names[c]}|{names[d]}"
        full = _all_angles(x, np.flatnonzero(labels == c), np.flatnonzero(labels == d))
        assert abs(np.mean(full < r.inter[key]) - 0.5) < band


# --------------------------------------------------------------------------- subspaces


def test_subspace_angles_match_direct_svd():
    x, labels, names = _mixed_set(seed=3, n=70, shape=(24,))
    k = 3
    r = median_angles(x, labels, names, subspace_k=k, block_rows=11)
    norms = np.linalg.norm(x, axis=1)
    bases = {}
    for c, name in enumerate(names):
        rows = x[(labels == c) & (norms > 0)]
        if rows.shape[0] == 0:
            continue
        u = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        _, s, vt = np.linalg.svd(u, full_matrices=False)
        rank = int(np.sum(s**2 > 1e-12 * s[0] ** 2))
        bases[name] = vt[: min(k, rank)].T
        assert r.subspace_dims[name] == min(k, rank)
    assert r.subspace_dims["empty"] == 0
    for a, b in itertools.combinations(names, 2):
        key = f"{a}|{b}"
        if a not in bases or b not in bases:
            assert r.subspace[key] is None
            continue
        ref = math.degrees(float(np.median(subspace_angles(bases[a], bases[b]))))
        assert r.subspace[key] == pytest.approx(ref, abs=TOL)


# --------------------------------------------------------------------------- validation


def test_non_finite_rows_are_counted():
    x, labels, names = _mixed_set()
    x[[5, 60]] = np.nan
    x[61, 0, 0, 0] = np.inf
    for options in ({}, {"block_rows": 4}, {"center": True}, {"max_pairs": 3}):
        with pytest.raises(DataError, match=r"3 of 70 rows .*\(70, 3, 2, 2\).*first: row 5"):
            median_angles(x, labels, names, **options)


@pytest.mark.parametrize(
    ("features", "labels", "names", "error", "match"),
    [
        (np.ones((4, 3)), [0, 1, 0], ["a", "b"], InputError, r"\(3,\).*\(4, 3\)"),
        (np.ones((4, 3)), [0, 1, 2, 0], ["a", "b"], InputError, r"1 of 4 labels.*\[0, 2\)"),
        (np.ones((4, 3)), [0, 1, -1, 0], ["a", "b"], InputError, "outside"),
        (np.ones((4, 3)), [0.5, 1, 0, 0], ["a", "b"], InputError, "dtype float64"),
        (np.ones(4), [0, 1, 0, 1], ["a", "b"], InputError, r"shape \(4,\)"),
        (np.ones((4, 3), dtype=complex), [0, 1, 0, 1], ["a", "b"], InputError, "real"),
        (np.ones((0, 3)), [], ["a"], DataError, "no values"),
        (np.ones((4, 3)), [0, 1, 0, 1], ["a", "a"], InputError, "repeat"),
        (np.ones((4, 3)), [0, 1, 0, 1], ["a", "b|c"], InputError, r"'\|'"),
    ],
)
def test_invalid_input(features, labels, names, error, match):
    with pytest.raises(error, match=match):
        median_angles(features, labels, names)


@pytest.mark.parametrize(
    "options",
    [{"max_pairs": 0}, {"block_rows": 0}, {"subspace_k": -1}, {"block_rows": 2.5}, {"seed": -1}],
)
def test_invalid_options(options):
    with pytest.raises(UsageError):
        median_angles(np.ones((4, 3)), [0, 1, 0, 1], ["a", "b"], **options)


def test_progress_reaches_total():
    x, labels, names = _mixed_set()
    calls = []
    median_angles(x, labels, names, block_rows=9, center=True, subspace_k=2,
                  progress=lambda done, total: calls.append((done, total)))
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1))
    assert len({t for _, t in calls}) == 1 and calls[-1][0] == calls[-1][1]


def test_all_zero_class_and_separation_none():
    x = np.zeros((3, 4))
    r = median_angles(x, [0, 0, 0], ["dead"])
    assert r.intra == {"dead": None}
    assert r.intra_reason == {"dead": "all 3 samples are zero vectors"}
    assert r.excluded_zero == {"dead": 3} and r.counts == {"dead": 0}
    assert r.separation is None


# --------------------------------------------------------------------------- wide rows (blocked)


def _blocked(monkeypatch, row_bytes, block_bytes):
    """Rows held as read, ``row_bytes`` of them at once, float64 blocks of ``block_bytes`` per side."""
    monkeypatch.setattr(angles_tiling, "_ROW_BYTES", row_bytes)
    monkeypatch.setattr(angles_tiling, "_BLOCK_BYTES", block_bytes)


def _close(a, b, tol):
    for field in ("intra", "inter", "subspace"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None)
        for key in x or {}:
            assert (x[key] is None) == (y[key] is None), (field, key)
            if x[key] is not None:
                assert x[key] == pytest.approx(y[key], abs=tol), (field, key)
    assert (a.counts, a.excluded_zero, a.pairs_sampled, a.subspace_dims) == (
        b.counts, b.excluded_zero, b.pairs_sampled, b.subspace_dims)


@pytest.mark.parametrize(
    ("dtype", "n", "options"),
    [(np.float32, 50, {}), (np.float16, 60, {}), (np.float32, 50, {"center": True}),
     (np.float32, 50, {"max_pairs": 40, "seed": 3}), (np.float16, 47, {"subspace_k": 3}),
     (np.float32, 50, {"center": True, "max_pairs": 25, "subspace_k": 2})],
)
def test_blocked_rows_equal_whole_rows_from_a_store(tmp_path, monkeypatch, dtype, n, options):
    """Stores of several sizes: rows held as read (a few at once, a few columns in float64 at once) give
    today's medians (whole float64 rows) to rounding, and the loop's to 1e-6 degrees."""
    x, labels, names = _mixed_set(n=n, shape=(3, 4, 4))
    x = x.astype(dtype)
    _write_store(tmp_path / "s.h5", x)
    whole = median_angles(x, labels, names, **options)
    _blocked(monkeypatch, 48 * np.dtype(dtype).itemsize * 9, 8 * 5 * 7)  # 9 rows; 7-column blocks
    tiling = angles_tiling.Tiling.of(n, 1024, 48, np.dtype(dtype).itemsize)
    assert tiling.blocked and (tiling.panel_rows, tiling.tile_rows, tiling.width) == (6, 3, 5 * 7 // 6)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        blocked = median_angles_h5(f["stages/layer1"], labels, names, **options)
    _close(blocked, whole, 1e-11)
    if not options:
        intra, inter, counts = _loop_reference(x, labels, len(names))
        _assert_matches(blocked, intra, inter, counts, names)


def test_blocked_rows_keep_extreme_float64_scales_and_refuse_non_finite(monkeypatch):
    x, labels, names = _mixed_set(n=50, shape=(12,))
    x[0] *= 1e200  # squares overflow float64
    x[1] *= 1e-200  # squares underflow
    whole = median_angles(x, labels, names, center=False)
    _blocked(monkeypatch, 12 * 8 * 6, 8 * 4 * 5)
    _close(median_angles(x, labels, names), whole, 1e-11)
    x[[5, 30]] = np.nan
    with pytest.raises(DataError, match=r"2 of 50 rows .*first: row 5"):
        median_angles(x, labels, names)


def test_wide_rows_are_held_within_the_budget():
    """ResNet-50's widest stage at 224 px (256 x 56 x 56 float32): rows held <= 1 GiB for any count."""
    d = 256 * 56 * 56
    for n in (60, 2000, 5000):
        t = angles_tiling.Tiling.of(n, 1024, d, 4)
        assert t.blocked == (n > 60)  # 60 rows: a panel and a tile of float64 rows fit, as before
        held = (t.panel_rows + t.tile_rows) * d * (4 if t.blocked else 8)
        assert held <= angles_tiling._ROW_BYTES
        assert not t.blocked or t.width * 8 * t.panel_rows <= angles_tiling._BLOCK_BYTES
        assert t.panel_rows >= 60
    small = angles_tiling.Tiling.of(3000, 1024, 16 * 32 * 32, 4)  # CIFAR stages: whole float64 rows, as ever
    assert not small.blocked and (small.panel_rows, small.tile_rows) == (1024, 256)


def test_a_damaged_chunk_is_named_by_its_rows_as_verify_names_it(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 2, 2, 2)).astype(np.float32)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("stages/layer1", data=x, chunks=(8, 2, 2, 2), fletcher32=True)
        info = f["stages/layer1"].id.get_chunk_info(3)  # rows 24:32
    with open(path, "r+b") as stream:
        stream.seek(info.byte_offset + info.size // 2)
        stream.write(bytes(range(7, 23)))
    with h5py.File(path, "r") as f, pytest.raises(StoreError) as caught:
        median_angles_h5(f["stages/layer1"], np.arange(40) % 2, ["a", "b"])
    assert "stages/layer1 rows 24:32: the store is damaged, the chunk fails its Fletcher-32 checksum" in str(
        caught.value)
    assert "rows 0:" not in str(caught.value)
