"""Rows of an HDF5 stage read again as raw chunks (auditor.analysis.angles.source) against the arrays written.

The first read of a row goes through HDF5 (its Fletcher-32 checksum verified); a row read
again comes straight from the file as its raw chunk. Every read is checked against the
numpy array written to the file, and the medians of a multi-panel float32 pass against
float64 numpy.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from auditor.analysis.angles import median_angles_h5
from auditor.analysis.angles import source as angles_source
from auditor.analysis.angles import tiling as angles_tiling
from auditor.analysis.angles.source import rows_of


def _store(path, x, **options):
    with h5py.File(path, "w") as f:
        f.create_dataset("stages/s", data=x, **options)


class _RawReads:
    """Counts the rows read raw."""

    def __init__(self, monkeypatch):
        self.rows = 0
        real = angles_source.RowSource._read_raw

        def counted(source, a, b, out):
            self.rows += b - a
            return real(source, a, b, out)

        monkeypatch.setattr(angles_source.RowSource, "_read_raw", counted)


@pytest.mark.parametrize(("dtype", "pread"), [(np.float32, True), (np.float16, True), (np.float32, False)])
def test_rows_read_again_are_raw_chunks_equal_to_the_rows_written(tmp_path, monkeypatch, dtype, pread):
    """Raw by ``os.preadv`` at the chunks' offsets (on two threads for 4 rows or more), or, without the
    offsets, chunk by chunk through HDF5 (``read_direct_chunk``)."""
    x = np.random.default_rng(1).standard_normal((23, 3, 5, 7)).astype(dtype)
    _store(tmp_path / "s.h5", x, chunks=(1, 3, 5, 7), fletcher32=True)
    raw = _RawReads(monkeypatch)
    flat = x.reshape(23, -1)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        src = rows_of(f["stages/s"])
        assert src._raw == 105 * np.dtype(dtype).itemsize + 4
        if not pread:
            src._offsets = np.empty(0, dtype=np.int64)
        for a, b in [(0, 5), (3, 9)]:  # new rows: through HDF5 (rows 5..8 new in the second read)
            out = np.full((b - a, 105), np.nan, dtype)
            src.read_into(a, b, out)
            np.testing.assert_array_equal(out, flat[a:b])
        assert (src.checked, raw.rows) == (9, 0)
        src.read_into(9, 23, np.empty((14, 105), dtype))
        for a, b in [(0, 23), (4, 5), (22, 23), (7, 16)]:  # every row seen: raw, the last through the spare
            out = np.full((b - a, 105), np.nan, dtype)
            src.read_into(a, b, out)
            np.testing.assert_array_equal(out, flat[a:b])
        big = np.full((30, 105), np.nan, dtype)  # a buffer with room after the rows: no spare needed
        src.read_into(2, 12, big[:10])
        np.testing.assert_array_equal(big[:10], flat[2:12])
        assert raw.rows == 23 + 1 + 1 + 9 + 10
        assert (src._offsets.size == 23) == pread


@pytest.mark.parametrize(
    "options",
    [{"chunks": (1, 3, 5, 7)}, {"chunks": (2, 3, 5, 7), "fletcher32": True},
     {"chunks": (1, 3, 5, 7), "fletcher32": True, "compression": "gzip"},
     {"chunks": (1, 3, 5, 7), "fletcher32": True, "shuffle": True}],
)
def test_other_layouts_are_always_read_through_hdf5(tmp_path, monkeypatch, options):
    """No filter (as fast through HDF5), chunks of two rows, or another filter: never raw."""
    x = np.random.default_rng(2).standard_normal((9, 3, 5, 7)).astype(np.float32)
    _store(tmp_path / "s.h5", x, **options)
    raw = _RawReads(monkeypatch)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        src = rows_of(f["stages/s"])
        assert src._raw == 0
        for a, b in [(0, 9), (2, 7)]:
            out = np.empty((b - a, 105), np.float32)
            src.read_into(a, b, out)
            np.testing.assert_array_equal(out, x.reshape(9, -1)[a:b])
    assert raw.rows == 0


def test_a_chunk_of_another_size_is_read_through_hdf5(tmp_path):
    """A raw chunk that is not the row and its checksum (here: a wrong expected size) is never used."""
    x = np.random.default_rng(3).standard_normal((8, 3, 5, 7)).astype(np.float32)
    _store(tmp_path / "s.h5", x, chunks=(1, 3, 5, 7), fletcher32=True)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        src = rows_of(f["stages/s"])
        src.read_into(0, 8, np.empty((8, 105), np.float32))
        src._raw += 4
        out = np.full((6, 105), np.nan, np.float32)
        src.read_into(1, 7, out)
        np.testing.assert_array_equal(out, x.reshape(8, -1)[1:7])
        assert src._raw == 0


def _reference(x, labels, n_classes):
    """Medians of the float64 angles of every class and class pair, pair by pair."""
    u = x.reshape(len(x), -1).astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    ang = np.degrees(np.arccos(np.clip(u @ u.T, -1, 1)))
    intra = {c: np.median([ang[i, j] for i in range(len(x)) for j in range(i + 1, len(x))
                           if labels[i] == labels[j] == c]) for c in range(n_classes)}
    inter = {(c, d): np.median(ang[np.ix_(labels == c, labels == d)])
             for c in range(n_classes) for d in range(c + 1, n_classes)}
    return intra, inter


@pytest.mark.parametrize("center", [False, True])
def test_many_panels_read_again_raw_give_the_float64_medians(tmp_path, monkeypatch, center):
    """Rows wider than the panel budget: read many times (raw after the first), float32 products, the
    exact medians of float64 numpy."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 60)
    x = np.maximum(rng.standard_normal((3, 1, 16, 16))[labels] + 1.5 * rng.standard_normal((60, 1, 16, 16)), 0)
    x = x.astype(np.float32)
    _store(tmp_path / "s.h5", x, chunks=(1, 1, 16, 16), fletcher32=True)
    monkeypatch.setattr(angles_tiling, "_ROW_BYTES", 256 * 4 * 18)  # 18 rows at once: 5 panels of 12
    raw = _RawReads(monkeypatch)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        got = median_angles_h5(f["stages/s"], labels, ["a", "b", "c"], products="float32", center=center)
    assert raw.rows >= 60  # every panel after the first, at least
    if center:
        x = x - x.astype(np.float64).mean(axis=0)
    intra, inter = _reference(x, labels, 3)
    for c, name in enumerate("abc"):
        assert got.intra[name] == pytest.approx(intra[c], abs=1e-9)
    for (c, d), v in inter.items():
        assert got.inter[f"{'abc'[c]}|{'abc'[d]}"] == pytest.approx(v, abs=1e-9)


@pytest.mark.parametrize("centred", [False, True])
def test_repair_dot_products_split_among_threads_are_the_same_bits(monkeypatch, centred):
    """The float64 dot products of the repaired pairs: the same bits on one thread or two, and the exact
    sums (math.fsum of the float64 products) to rounding."""
    import math

    import torch

    from auditor.analysis.angles import exact as angles_exact

    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 5000)).astype(np.float32)
    pa, pb = rng.integers(0, 30, 40), rng.integers(0, 30, 40)
    center = rng.standard_normal(5000) if centred else None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = angles_exact._pair_dots(x, pa, pb, center)
        torch.set_num_threads(2)
        two = angles_exact._pair_dots(x, pa, pb, center)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one, two)
    rows = x.astype(np.float64) - (0 if center is None else center)
    exact = np.array([math.fsum(rows[i] * rows[j]) for i, j in zip(pa, pb)])
    np.testing.assert_allclose(two, exact, rtol=1e-12, atol=1e-9)


# --------------------------------------------------------------------------- the audit's angles under torchrun


_AUDIT_ANGLES = """
import json, sys
from auditor import distributed
from auditor.analysis.angles import compute, products
from auditor.subject import open_subject
from auditor.tasks.geometry import stage_geometry
from auditor.tasks.images import open_images

compute._FLOAT32_WORK = 1  # every stage with float32 products: split among the ranks
pairs = []
real = products.float32_products
def counted(*args):
    out = real(*args)
    pairs.append(out.numel())
    return out
products.float32_products = counted

distributed.init()
subject = open_subject(sys.argv[1])
result = stage_geometry(subject, open_images(sys.argv[2], subject, per_class=6), center=True)
distributed.shutdown()
print(json.dumps({"stages": result.stages, "pairs": sum(pairs)}))
"""


@pytest.mark.slow
def test_the_audit_angles_under_torchrun_split_the_gram_tiles(tmp_path, monkeypatch):
    """The audit's extract + angles on two gloo ranks: rank 0 writes its scratch store, both ranks read it and
    each computes part of every stage's float32 products; both give the same stages, the float64 products'
    medians (one process, float64 products) to 1e-9 degrees."""
    import json

    from auditor.subject import open_subject
    from auditor.tasks.geometry import stage_geometry
    from auditor.tasks.images import open_images
    from conftest import FIXTURES
    from test_distributed import _two_ranks

    checkpoint, digits = FIXTURES / "resnet8-digits.safetensors", FIXTURES / "digits"
    ranks = _two_ranks([str(checkpoint), str(digits)], tmp_path, program=["-c", _AUDIT_ANGLES])
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    outs = [json.loads(r.stdout.strip().splitlines()[-1]) for r in ranks]
    assert outs[0]["stages"] == outs[1]["stages"]
    assert outs[0]["pairs"] > 0 and outs[1]["pairs"] > 0  # each rank a part of the products
    subject = open_subject(checkpoint)
    one = stage_geometry(subject, open_images(digits, subject, per_class=6), center=True).stages
    total = 60 * 59 // 2 * len(one)
    assert outs[0]["pairs"] < total and outs[1]["pairs"] < total
    assert [s["name"] for s in outs[0]["stages"]] == [s["name"] for s in one]
    for got, want in zip(outs[0]["stages"], json.loads(json.dumps(one))):
        for field in ("intra", "inter"):
            assert got[field].keys() == want[field].keys()
            for key, value in want[field].items():
                assert got[field][key] == pytest.approx(value, abs=1e-9), (got["name"], key)


def test_a_chunk_never_written_is_read_through_hdf5(tmp_path):
    """Rows whose chunks were never written read as HDF5's fill value (zeros), raw or not."""
    x = np.random.default_rng(6).standard_normal((8, 3, 5, 7)).astype(np.float32)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("stages/s", shape=x.shape, dtype=np.float32, chunks=(1, 3, 5, 7), fletcher32=True)
        f["stages/s"][:5] = x[:5]
    want = x.reshape(8, -1).copy()
    want[5:] = 0
    with h5py.File(tmp_path / "s.h5", "r") as f:
        src = rows_of(f["stages/s"])
        first = np.full((8, 105), np.nan, np.float32)
        src.read_into(0, 8, first)
        again = np.full((8, 105), np.nan, np.float32)
        src.read_into(0, 8, again)
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(again, want)
