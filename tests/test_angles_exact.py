"""Float32 Gram products with exact medians (auditor.analysis.angles.exact) against independent float64 references.

The reference is numpy in float64, written here: unit rows, every pair's ``arccos`` of
their dot product (``2 atan2(|a - b|, |a + b|)`` within 0.81 degrees of 0 or 180), and
``np.median`` per class and class pair. The float32 products alone are off by up to
about 1e-3 degrees, so agreement to 1e-9 degrees checks the repair of the ambiguous pairs.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from auditor.analysis.angles import exact as angles_exact
from auditor.analysis.angles import median_angles, median_angles_h5
from auditor.analysis.angles import tiling as angles_tiling
from auditor.errors import UsageError

TIGHT = 1e-9  # degrees


def _reference(x, labels, n_classes, *, center=False):
    """Medians of every class and class pair in float64 numpy, all pairs."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    ok = np.linalg.norm(x, axis=1) > 0
    if center:
        x = x - x[ok].mean(axis=0)
        ok &= np.linalg.norm(x, axis=1) > 0
    u = np.zeros_like(x)
    u[ok] = x[ok] / np.linalg.norm(x[ok], axis=1, keepdims=True)

    def angles(a, b):
        cos = u[a] @ u[b].T
        ang = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        near = np.abs(cos) > 0.9999
        for i, j in zip(*np.nonzero(near)):
            ua, ub = u[a[i]], u[b[j]]
            ang[i, j] = np.degrees(2 * np.arctan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))
        return ang

    members = [np.flatnonzero(ok & (labels == c)) for c in range(n_classes)]
    intra = {}
    for c, m in enumerate(members):
        a = angles(m, m)[np.triu_indices(m.size, 1)]
        intra[c] = float(np.median(a)) if a.size else None
    inter = {}
    for c in range(n_classes):
        for d in range(c + 1, n_classes):
            a = angles(members[c], members[d]).ravel()
            inter[(c, d)] = float(np.median(a)) if a.size else None
    return intra, inter


def _check(result, ref, names, tol=TIGHT):
    intra, inter = ref
    for c, name in enumerate(names):
        if intra[c] is None:
            assert result.intra[name] is None
        else:
            assert result.intra[name] == pytest.approx(intra[c], abs=tol), name
    for (c, d), v in inter.items():
        key = f"{names[c]}|{names[d]}"
        if v is None:
            assert result.inter[key] is None
        else:
            assert result.inter[key] == pytest.approx(v, abs=tol), key


def _relu_set(n, d, seed, n_classes=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    base = rng.standard_normal((n_classes, d))
    x = np.maximum(base[labels] + 1.5 * rng.standard_normal((n, d)), 0)
    return x.astype(dtype), labels, [f"c{i}" for i in range(n_classes)]


class _Repairs:
    """Counts the pairs recomputed in float64."""

    def __init__(self, monkeypatch):
        self.pairs = 0
        real = angles_exact.exact_angles

        def counted(ids, loader):
            self.pairs += ids.size
            return real(ids, loader)

        monkeypatch.setattr(angles_exact, "exact_angles", counted)
        from auditor.analysis.angles import gram
        monkeypatch.setattr(gram, "exact_angles", counted)


@pytest.mark.parametrize(
    ("n", "d", "options", "block_rows"),
    [(80, 700, {}, 1024), (97, 2500, {}, 23), (90, 1500, {"center": True}, 1024),
     (90, 1500, {"center": True}, 17), (120, 900, {"max_pairs": 300, "seed": 2}, 1024),
     (61, 1200, {"max_pairs": 40, "center": True}, 13)],
)
def test_float32_products_give_the_float64_medians(monkeypatch, n, d, options, block_rows):
    """Stores of several sizes, one panel or many (rows read again for the repair), centred or not,
    sampled or not: the medians equal float64 numpy's to 1e-9 degrees, and some pairs were repaired."""
    x, labels, names = _relu_set(n, d, seed=n + d)
    x[5] = 0  # a zero row: no direction
    repairs = _Repairs(monkeypatch)
    got = median_angles(x, labels, names, products="float32", block_rows=block_rows, **options)
    assert repairs.pairs > 0
    if "max_pairs" in options:  # sampled: the same pairs as float64 products draw
        want = median_angles(x, labels, names, products="float64", block_rows=block_rows, **options)
        assert want.pairs_sampled and got.pairs_sampled
        for field in ("intra", "inter"):
            for key, v in getattr(want, field).items():
                assert getattr(got, field)[key] == pytest.approx(v, abs=TIGHT), key
    else:
        _check(got, _reference(x, labels, len(names), center=options.get("center", False)), names)
    assert got.excluded_zero[names[labels[5]]] >= 1


def test_ties_and_near_ties_at_the_median():
    """Many pairs at the same angle and at angles 1e-7 degrees apart, inside the float32 error."""
    rng = np.random.default_rng(3)
    d = 400
    core = np.abs(rng.standard_normal((6, d)))
    rows = []
    for k in range(60):  # copies of a few rows, each nudged by a tiny amount or not at all
        r = core[k % 6].copy()
        if k % 3:
            r[k % d] += 1e-6 * (k % 7)
        rows.append(r)
    x = np.array(rows, dtype=np.float32)
    labels = np.arange(60) % 2
    names = ["a", "b"]
    got = median_angles(x, labels, names, products="float32")
    _check(got, _reference(x, labels, 2), names)


def test_nearly_parallel_and_antiparallel_rows_after_centring():
    """Angles of 1e-4 degrees (acos ill-conditioned) and signed rows after centring."""
    rng = np.random.default_rng(8)
    d = 1200
    v = rng.standard_normal(d)
    x = np.array([v * (1 + 0.1 * k) + 1e-6 * rng.standard_normal(d) for k in range(40)]
                 + [-v + 1e-6 * rng.standard_normal(d) for _ in range(30)], dtype=np.float32)
    labels = np.r_[np.zeros(40, int), np.ones(30, int)]
    for center in (False, True):
        got = median_angles(x, labels, ["p", "q"], products="float32", center=center)
        _check(got, _reference(x, labels, 2, center=center), ["p", "q"])


def test_hdf5_float16_store_and_auto(tmp_path, monkeypatch):
    """A float16 store (exact in float32) with ``auto`` taking float32 products above the threshold."""
    x, labels, names = _relu_set(70, 1800, seed=11, dtype=np.float16)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("stages/layer1", data=x.reshape(70, 2, 30, 30), chunks=(4, 2, 30, 30))
    from auditor.analysis.angles import compute
    monkeypatch.setattr(compute, "_FLOAT32_WORK", 1000)
    repairs = _Repairs(monkeypatch)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        got = median_angles_h5(f["stages/layer1"], labels, names, block_rows=20)
    assert repairs.pairs > 0
    _check(got, _reference(x, labels, len(names)), names)


def test_too_many_ambiguous_pairs_fall_back_to_float64(monkeypatch):
    x, labels, names = _relu_set(60, 500, seed=4)
    monkeypatch.setattr(angles_exact, "_REPAIR_MIN", 0)
    monkeypatch.setattr(angles_exact, "_REPAIR_FRACTION", 10 ** 9)  # any ambiguous pair is too many
    repairs = _Repairs(monkeypatch)
    got = median_angles(x, labels, names, products="float32")
    assert repairs.pairs == 0  # gave up before repairing: float64 products
    _check(got, _reference(x, labels, len(names)), names, tol=1e-11)


class _Stop(Exception):
    """A simulated process waits for its peer's part."""


class _TwoProcesses:
    """Two processes' ``everyone`` collectives simulated in one: rank ``r``'s ``k``-th call returns both ranks'
    ``k``-th results once both are known; else it keeps its own and stops that run (run the ranks in turn)."""

    def __init__(self):
        self.results = {0: [], 1: []}

    def everyone(self, rank):
        calls = iter(range(1 << 30))

        def call(work):
            k = next(calls)
            mine = work()
            if len(self.results[rank]) <= k:
                self.results[rank].append(mine)
            other = self.results[1 - rank]
            if len(other) <= k:
                raise _Stop
            return [mine, other[k]] if rank == 0 else [other[k], mine]

        return call


@pytest.mark.parametrize("options", [{"block_rows": 23}, {"block_rows": 17, "center": True, "max_pairs": 200}])
def test_two_shares_in_one_process_combine_to_the_single_process_medians(options):
    """Each share computes only its tiles (panels and streamed tiles) and its part of the repairs; the two
    parts together give the single process's medians bit for bit (in one process: the ranks in turn, each run
    until it needs a part the other has not computed yet)."""
    from auditor import distributed
    from auditor.analysis.angles import Share

    x, labels, names = _relu_set(80, 600, seed=12)
    one = median_angles(x, labels, names, products="float32", **options)
    both = _TwoProcesses()
    got = {}
    for rank in (1, 0, 1, 0):
        share = Share(rank, 2, distributed.split, both.everyone(rank), lambda work: work())
        try:
            got[rank] = median_angles(x, labels, names, products="float32", **options, share=share)
        except _Stop:
            pass
    parts = {rank: both.results[rank][0] for rank in (0, 1)}  # the first exchange: each share's pairs
    assert parts[0][0].size > 0 and parts[1][0].size > 0  # each share computed some pairs, no pair twice
    assert np.intersect1d(parts[0][2], parts[1][2]).size == 0
    repaired = [both.results[rank][1].size for rank in (0, 1)]  # the second: each share's part of the repairs
    assert min(repaired) > 0 and len(both.results[0]) == len(both.results[1]) == 2
    for rank in (0, 1):
        assert (got[rank].intra, got[rank].inter, got[rank].counts) == (one.intra, one.inter, one.counts)


def test_crowded_medians_give_up_early(monkeypatch):
    """When an eighth of the pairs already predict too many repairs, the float32 pass stops there."""
    from auditor.analysis.angles import products

    x, labels, names = _relu_set(150, 300, seed=9)
    monkeypatch.setattr(angles_exact, "_REPAIR_MIN", 0)
    monkeypatch.setattr(angles_exact, "_REPAIR_FRACTION", 10 ** 9)
    monkeypatch.setattr(angles_exact, "_PROBE_PAIRS", 50)
    calls = []
    real = products.float32_products
    monkeypatch.setattr(products, "float32_products", lambda *a: calls.append(1) or real(*a))
    got = median_angles(x, labels, names, products="float32")
    assert len(calls) == 1  # the first 64-row strip (about 7,500 of 11,175 pairs), then float64
    _check(got, _reference(x, labels, len(names)), names, tol=1e-11)


def test_cos_bound_holds_on_signed_rows_with_cancellation():
    """The bound covers the float32 products' error even where the dot product cancels (signed rows)."""
    rng = np.random.default_rng(6)
    d = 5000
    a = rng.standard_normal((20, d)).astype(np.float32) * np.float32(1e3)
    b = (a[::-1] + rng.standard_normal((20, d)).astype(np.float32)).astype(np.float32)
    got = angles_exact.float32_products(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    exact = a.astype(np.float64) @ b.astype(np.float64).T  # float32 products are exact in float64
    na, nb = np.linalg.norm(a.astype(np.float64), axis=1), np.linalg.norm(b.astype(np.float64), axis=1)
    err = np.abs(got - exact) / np.outer(na, nb)
    e = angles_exact.cos_bound(d, rounded=False, min_norm=float(min(na.min(), nb.min())))
    assert err.max() <= e
    assert err.max() > 0  # the float32 products do round


def test_float32_rows_are_held_within_the_budget():
    d = 256 * 56 * 56
    one = angles_tiling.Tiling.of_float32(300, 1024, d)
    assert one.panels == ((0, 300),) and one.float32  # 300 rows of float32: one panel, read once
    for n in (400, 2000):
        t = angles_tiling.Tiling.of_float32(n, 1024, d)
        assert (t.panel_rows + t.tile_rows) * d * 4 <= angles_tiling._ROW_BYTES
        assert t.panel_rows >= 200


def test_products_option_is_checked():
    with pytest.raises(UsageError, match="products"):
        median_angles(np.ones((3, 2), np.float32), [0, 0, 1], ["a", "b"], products="float16")


# --------------------------------------------------------------------------- torchrun: the Gram tiles split


_SPLIT_ANGLES = """
import json, sys
import numpy as np
from auditor import distributed
from auditor.analysis.angles import products
from auditor.tasks.geometry import store_angles

pairs = []
real = products.float32_products
def counted(a, b, ia=None, ib=None):
    out = real(a, b, ia, ib)
    pairs.append(out.numel())
    return out
products.float32_products = counted
repaired = []
from auditor.analysis.angles import gram
real_exact = gram.exact_angles
gram.exact_angles = lambda ids, loader: repaired.append(ids.size) or real_exact(ids, loader)

sys.path.insert(0, sys.argv[2])
from test_angles_exact import _Store as Store  # noqa: E402

distributed.init()
options = json.loads(sys.argv[1])
entries = store_angles(Store(), **options)
distributed.shutdown()
print(json.dumps({"entries": entries, "pairs": sum(pairs), "repaired": sum(repaired)}))
"""


class _Store:
    """What store_angles reads of an activation store (here and in the _SPLIT_ANGLES ranks)."""

    path = "memory"

    def __init__(self):
        rng = np.random.default_rng(7)
        self.labels = rng.integers(0, 3, 90)
        self.classes = ["a", "b", "c"]
        self.stage_names = ["s1", "s2"]
        self.data = {"s1": np.maximum(rng.standard_normal((90, 4, 10, 10)) + 0.3, 0).astype(np.float32),
                     "s2": rng.standard_normal((90, 700)).astype(np.float32)}

    def stage(self, name):
        return self.data[name]


@pytest.mark.slow
def test_torchrun_splits_the_gram_tiles_and_gives_one_process_medians(tmp_path, monkeypatch):
    """Two gloo ranks each compute part of every stage's float32 products and of its repairs (rows centred, so
    read again for the repair); both give the single process's medians, bit for bit, equal to float64 numpy's to 1e-9 degrees."""
    import json

    from auditor.analysis.angles import products
    from auditor.tasks.geometry import store_angles
    from test_distributed import _two_ranks

    options = {"products": "float32", "center": True}
    ranks = _two_ranks([json.dumps(options), str(Path(__file__).parent)], tmp_path, program=["-c", _SPLIT_ANGLES])
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    outs = [json.loads(r.stdout.strip().splitlines()[-1]) for r in ranks]
    pairs = []
    real = products.float32_products
    monkeypatch.setattr(products, "float32_products", lambda *a: pairs.append(real(*a).numel()) or real(*a))
    repairs = _Repairs(monkeypatch)
    store = _Store()
    one = json.loads(json.dumps(store_angles(store, **options)))
    assert outs[0]["entries"] == outs[1]["entries"] == one
    assert 0 < outs[0]["pairs"] < sum(pairs) and 0 < outs[1]["pairs"] < sum(pairs)  # each rank a part
    assert outs[0]["repaired"] > 0 and outs[1]["repaired"] > 0  # of the repairs too
    assert outs[0]["repaired"] + outs[1]["repaired"] == repairs.pairs
    for entry, name in zip(one, store.stage_names):
        ref = _reference(store.data[name], store.labels, 3, center=True)
        _check(type("R", (), {"intra": entry["intra"], "inter": entry["inter"]}), ref, store.classes)
