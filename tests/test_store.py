"""The HDF5 activation store (auditor/io/store/): writer, resume, lock, reader."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from auditor.cli import flag_for
from auditor.errors import Remedy, StoreError
from auditor.io.store import FORMAT, FORMAT_VERSION, StoreHeader, StoreWriter, open_store
from auditor.models.anatomy import StageSpec


def _cli_hint(error: StoreError) -> str:
    """The hint as the command line prints it; a Python caller reads the keyword instead."""
    assert error.remedy == Remedy("overwrite")
    assert "overwrite=True" in error.one_line() and "--overwrite" not in error.one_line()
    return error.one_line(flag_for)


STAGES = (
    StageSpec("stem", "layer1.0", "input", (2, 3, 3)),
    StageSpec("penultimate", "fc", "input", (4,)),
)


def _header(n: int = 7, **changes) -> StoreHeader:
    fields = dict(
        checkpoint_sha256="ab" * 32, arch="resnet8", data_root="/data", preset="cifar10",
        preprocessing=json.dumps({"size": 3}), seed=0, per_class=None, shard=(0, 1),
        classes=("a", "b"), samples=tuple((f"{'ab'[i % 2]}/{i:03d}.png", i % 2) for i in range(n)),
        stages=STAGES,
    )
    fields.update(changes)
    return StoreHeader(**fields)


def _rows(positions: list[int], scale: float = 1.0) -> dict[str, np.ndarray]:
    rows = {}
    for spec in STAGES:
        data = np.stack([
            np.random.default_rng(p).standard_normal(spec.shape).astype(np.float32) for p in positions
        ]) if positions else np.empty((0, *spec.shape), np.float32)
        rows[spec.name] = data * np.float32(scale)
    return rows


def _write(path: Path, header: StoreHeader, batches: list[tuple[list[int], list]], **kw) -> StoreWriter:
    writer = StoreWriter(path, header, **kw)
    for positions, failures in batches:
        writer.append(_rows(positions), positions, failures)
    return writer


BATCHES = [([0, 1], []), ([2], [(3, "broken")]), ([4, 5], []), ([6], [])]


def _datasets(path: Path) -> dict[str, tuple]:
    found = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                found[name] = (obj.dtype, obj.shape, obj.chunks, obj.compression, obj[()],
                               {k: np.asarray(v).tolist() for k, v in obj.attrs.items()})
        f.visititems(visit)
        found["/"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items() if k != "created"}
    return found


def _assert_same_store(a: Path, b: Path) -> None:
    left, right = _datasets(a), _datasets(b)
    assert left.keys() == right.keys()
    assert left.pop("/") == right.pop("/")
    for name in left:
        ld, rd = left[name], right[name]
        assert ld[:4] == rd[:4], name
        assert ld[5] == rd[5], name
        np.testing.assert_array_equal(ld[4], rd[4], err_msg=name)


def test_write_and_read(tmp_path: Path) -> None:
    out = tmp_path / "acts.h5"
    with _write(out, _header(), BATCHES) as writer:
        assert not out.exists() and writer.partial_path.exists()
        assert writer.written == 6 and writer.consumed == 7
        assert writer.finish() == out
    assert out.exists() and not writer.partial_path.exists()
    assert not (tmp_path / "acts.h5.lock").exists()
    with open_store(out) as store:
        assert store.attrs["format"] == FORMAT and store.attrs["format_version"] == FORMAT_VERSION
        assert store.attrs["complete"] is True and store.attrs["written"] == 6
        assert store.attrs["per_class"] == -1 and store.attrs["checkpoint_sha256"] == "ab" * 32
        assert store.attrs["samples_sha256"] == _header().samples_sha256()
        assert store.classes == ["a", "b"]
        assert store.paths == ["a/000.png", "b/001.png", "a/002.png", "a/004.png", "b/005.png", "a/006.png"]
        assert store.labels.tolist() == [0, 1, 0, 0, 1, 0] and store.labels.dtype == np.int64
        assert store.skipped == [{"path": "b/003.png", "reason": "broken"}]
        assert store.stage_names == ["stem", "penultimate"] and len(store) == 6
        stem = store.stage("stem")
        assert stem.shape == (6, 2, 3, 3) and stem.chunks == (64, 2, 3, 3) and stem.dtype == np.float32
        assert stem.attrs["module_path"] == "layer1.0:input"
        assert stem.attrs["shape"].tolist() == [2, 3, 3]
        np.testing.assert_array_equal(stem[()], _rows([0, 1, 2, 4, 5, 6])["stem"])
        with pytest.raises(StoreError, match="no stage 'layer9'"):
            store.stage("layer9")


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression(tmp_path: Path, compression: str) -> None:
    out = tmp_path / "c.h5"
    _write(out, _header(compression=compression), BATCHES).finish()
    with open_store(out) as store:
        assert store.stage("stem").compression == compression
        np.testing.assert_array_equal(store.stage("penultimate")[()], _rows([0, 1, 2, 4, 5, 6])["penultimate"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "h.h5"
    _write(out, _header(dtype=dtype), BATCHES).finish()
    exact = _rows([0, 1, 2, 4, 5, 6])["stem"]
    expected = torch.from_numpy(exact).to(getattr(torch, dtype)).float().numpy()
    with open_store(out) as store:
        stem = store.stage("stem")
        assert stem.attrs["encoding"] == dtype
        assert stem.shape == (6, 2, 3, 3)
        values = stem[()]
        assert values.dtype in (np.float16, np.float32)
        np.testing.assert_array_equal(values.astype(np.float32), expected)
        np.testing.assert_array_equal(np.asarray(stem)[2:4].astype(np.float32), expected[2:4])
        np.testing.assert_allclose(values.astype(np.float32), exact, rtol=1e-2 if dtype == "bfloat16" else 1e-3)


def test_nonfinite_and_overflow_refused(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "o.h5", _header(dtype="float16"))
    with writer:
        with pytest.raises(StoreError, match="'stem'.*reach .x. = [0-9.]+e\\+06") as info:
            writer.append(_rows([0, 1], scale=1e6), [0, 1])
        assert info.value.remedy == Remedy("dtype", "float32") and "bfloat16" in info.value.hint
        assert writer.written == 0
        writer.append(_rows([0, 1], scale=1e4), [0, 1])  # 1e4 * N(0,1) < 65504
        bad = _rows([2])
        bad["penultimate"][0, 1] = np.nan
        with pytest.raises(StoreError, match="'penultimate'.*NaN or inf"):
            writer.append(bad, [2])
        assert writer.written == 2
    assert not writer.partial_path.exists()  # cannot be resumed: removed, not left in the way
    with StoreWriter(tmp_path / "f.h5", _header()) as writer:
        bad = _rows([0])
        bad["stem"][0, 0, 0, 0] = np.inf
        with pytest.raises(StoreError, match="NaN or inf"):
            writer.append(bad, [0])


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    whole = tmp_path / "whole.h5"
    _write(whole, _header(), BATCHES).finish()
    out = tmp_path / "resumed.h5"
    first = _write(out, _header(), BATCHES[:2])
    created = h5py.File(first.partial_path, "r").attrs["created"]
    first.close()
    # a batch written past the counter (killed before the flush finished) is dropped
    with h5py.File(out.with_name("resumed.h5.partial"), "r+") as f:
        for name in ("samples/path", "samples/label", "stages/stem", "stages/penultimate"):
            f[name].resize(f[name].shape[0] + 1, axis=0)
    with StoreWriter(out, _header()) as second:
        assert second.resumed_from == 4 and second.written == 3 and second.consumed == 4
        for positions, failures in BATCHES[2:]:
            second.append(_rows(positions), positions, failures)
        second.finish()
    _assert_same_store(whole, out)
    with h5py.File(out, "r") as f:
        assert f.attrs["created"] == created  # resumed, not restarted


def test_resume_refuses_other_provenance(tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    _write(out, _header(), BATCHES[:1]).close()
    for change in [
        {"checkpoint_sha256": "cd" * 32},
        {"data_root": "/other"},
        {"dtype": "float16"},
        {"samples": _header(8).samples},
        {"preprocessing": json.dumps({"size": 4})},
        {"stages": STAGES[:1]},
    ]:
        with pytest.raises(StoreError, match="other settings") as info:
            StoreWriter(out, _header(**change))
        assert _cli_hint(info.value).count("--overwrite") == 1 and "p.h5.partial" in info.value.hint
        assert (tmp_path / "p.h5.partial").exists()  # a refused resume never deletes the work
    with StoreWriter(out, _header(dtype="float16"), overwrite=True) as fresh:
        assert fresh.resumed_from == 0 and fresh.written == 0


def test_damaged_partial(tmp_path: Path) -> None:
    out = tmp_path / "d.h5"
    (tmp_path / "d.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(StoreError, match="unreadable") as info:
        StoreWriter(out, _header())
    assert "--overwrite" in _cli_hint(info.value)
    assert not (tmp_path / "d.h5.lock").exists()
    with StoreWriter(out, _header(), overwrite=True) as writer:
        assert writer.written == 0


def test_existing_output_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "e.h5"
    _write(out, _header(), BATCHES).finish()
    with pytest.raises(StoreError, match="already exists") as info:
        StoreWriter(out, _header())
    assert "--overwrite" in _cli_hint(info.value)
    writer = _write(out, _header(dtype="float16"), BATCHES, overwrite=True)
    with open_store(out) as store:  # the old file stays until the new one is complete
        assert store.attrs["dtype"] == "float32"
    writer.finish()
    with open_store(out) as store:
        assert store.attrs["dtype"] == "float16"
    with pytest.raises(StoreError, match="does not exist"):
        StoreWriter(tmp_path / "nowhere" / "x.h5", _header())


def test_lock_refuses_second_writer(tmp_path: Path) -> None:
    out = tmp_path / "l.h5"
    with StoreWriter(out, _header()):
        with pytest.raises(StoreError, match="another resdyn process is writing"):
            StoreWriter(out, _header())
    # a lock held by someone else (another process: another open file description)
    fd = os.open(tmp_path / "l.h5.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(StoreError, match="another resdyn process") as info:
            StoreWriter(out, _header())
        # flock dies with its holder: deleting the lock file is never needed, and while the
        # other writer runs it would let a third one in
        assert "delete" not in info.value.one_line() and "released" in info.value.hint
    finally:
        os.close(fd)
    with StoreWriter(out, _header()) as writer:  # the stale lock file does not block
        assert writer.resumed_from == 0


def test_empty_fresh_partial_removed_on_close(tmp_path: Path) -> None:
    StoreWriter(tmp_path / "z.h5", _header()).close()
    assert list(tmp_path.iterdir()) == []


def test_finish_requires_everything(tmp_path: Path) -> None:
    with _write(tmp_path / "f.h5", _header(), BATCHES[:2]) as writer:
        with pytest.raises(StoreError, match="only 4 of 7"):
            writer.finish()
        with pytest.raises(ValueError):
            writer.append(_rows([5]), [5])  # not the next position
    with StoreWriter(tmp_path / "g.h5", _header(2)) as writer:
        writer.append(_rows([]), [], [(0, "bad"), (1, "bad")])
        with pytest.raises(StoreError, match="none of the 2 images"):
            writer.finish()


# --------------------------------------------------------------------------- reader refusals


def _finished(tmp_path: Path) -> Path:
    out = tmp_path / "r.h5"
    _write(out, _header(), BATCHES).finish()
    return out


def test_reader_refusals(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such file"):
        open_store(tmp_path / "missing.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="text.h5: not an HDF5 file"):
        open_store(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="foreign.h5: not a resdyn.*'format'"):
        open_store(foreign)
    out = _finished(tmp_path)
    for key, value, pattern in [
        ("format_version", "2.0", "unsupported store version '2.0'.*'format_version'"),
        ("complete", False, "incomplete.*'complete'"),
        ("format", "something-else", "not a resdyn.*'format'"),
    ]:
        with h5py.File(out, "r+") as f:
            old = f.attrs[key]
            f.attrs[key] = value
        with pytest.raises(StoreError, match=pattern) as info:
            open_store(out)
        assert "r.h5" in info.value.message
        with h5py.File(out, "r+") as f:
            f.attrs[key] = old
    with h5py.File(out, "r+") as f:
        f.attrs["format_version"] = "1.7"  # a newer minor version is readable
        del f["samples/label"]
    with pytest.raises(StoreError, match="'samples/label'"):
        open_store(out)


def test_reader_points_to_partial(tmp_path: Path) -> None:
    out = tmp_path / "u.h5"
    _write(out, _header(), BATCHES[:1]).close()
    with pytest.raises(StoreError, match="no such file") as info:
        open_store(out)
    assert "resume" in info.value.hint
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "u.h5.partial")


@pytest.mark.parametrize(
    ("shape", "dtype", "expected"),
    [
        ((16, 32, 32), np.float32, 4),  # 64 KiB a sample: four to a 256 KiB chunk
        ((16, 32, 32), np.float16, 8),
        ((64,), np.float32, 64),  # tiny rows: capped at 64
        ((64, 56, 56), np.float32, 1),  # 784 KiB: one sample, never split
        ((2048, 7, 7), np.uint16, 1),
    ],
)
def test_chunks_hold_whole_samples(shape, dtype, expected) -> None:
    from auditor.io.store.layout import samples_per_chunk

    assert samples_per_chunk(shape, dtype) == expected


def test_writer_syncs_to_disk_while_writing(tmp_path: Path, monkeypatch) -> None:
    import os

    import auditor.io.store.writer as writer_module

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(writer_module, "_SYNC_BYTES", 1)  # every batch
    monkeypatch.setattr(writer_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    whole = tmp_path / "whole.h5"
    writer = StoreWriter(whole, _header())
    for positions, failures in BATCHES:
        before = len(synced)
        writer.append(_rows(positions), positions, failures)
        assert len(synced) == before + (1 if positions else 0)  # a batch with rows is synced
    writer.finish()
    monkeypatch.setattr(writer_module, "_SYNC_BYTES", 1 << 40)  # never: the same store
    _write(tmp_path / "again.h5", _header(), BATCHES).finish()
    _assert_same_store(whole, tmp_path / "again.h5")


# --------------------------------------------------------------------------- integrity


def test_new_stores_carry_checksums_and_a_digest_of_their_rows(tmp_path: Path) -> None:
    import hashlib

    out = _finished(tmp_path)
    with h5py.File(out, "r") as f:
        assert f.attrs["format_version"] == "1.1"
        assert f["samples/label"].fletcher32 and all(f["stages"][n].fletcher32 for n in f["stages"])
        expected = hashlib.sha256("".join(
            f"{label}\t{path}\n" for path, label in [("a/000.png", 0), ("b/001.png", 1), ("a/002.png", 0),
                                                     ("a/004.png", 0), ("b/005.png", 1), ("a/006.png", 0)]
        ).encode()).hexdigest()
        assert f.attrs["rows_sha256"] == expected
    with h5py.File(out, "r+") as f:
        f["samples/path"][3] = "a/009.png"  # strings carry no checksum; the digest catches them
    with pytest.raises(StoreError, match="r.h5: the store is damaged, the sample list does not match rows_sha256"):
        open_store(out)


def _damage_chunk(path: Path, key: str, index: int) -> None:
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(index)
    with open(path, "r+b") as stream:
        stream.seek(info.byte_offset + 1)
        stream.write(b"\xde\xad\xbe\xef")


@pytest.mark.parametrize(("chunk", "restart", "kept_skipped"), [
    (1, 2, []),  # rows 2:4 damaged: sample 2 is computed again, so is the skipped sample 3 after it
    (2, 5, ["b/003.png"]),  # rows 4:6 (samples 5, 6): the skip of sample 3 stays
])
def test_resume_cuts_back_to_the_last_verified_chunk(chunk, restart, kept_skipped, tmp_path: Path,
                                                     monkeypatch) -> None:
    import auditor.io.store.layout as layout

    monkeypatch.setattr(layout, "_CHUNK_BYTES", 2 * 2 * 3 * 3 * 4)  # two stem samples per chunk
    whole = tmp_path / "whole.h5"
    _write(whole, _header(), BATCHES).finish()
    out = tmp_path / "cut.h5"
    _write(out, _header(), BATCHES).close()  # every batch written, not finished
    _damage_chunk(out.with_name("cut.h5.partial"), "stages/stem", chunk)
    with pytest.warns(UserWarning, match=f"stages/stem rows {2 * chunk}:{2 * chunk + 2}: the chunk fails its "
                      f"Fletcher-32 checksum; resuming from sample {restart}") as caught:
        writer = StoreWriter(out, _header())
    assert caught[0].filename.endswith("writer.py")  # resdyn's own warning: the CLI shows it
    with writer:
        assert writer.consumed == restart and writer.resumed_from == restart
        assert [s["path"] for s in writer.skipped] == kept_skipped and writer.repaired
        for positions, failures in BATCHES:
            if min(positions + [p for p, _ in failures]) >= restart:
                writer.append(_rows(positions), positions, failures)
            elif max(positions + [p for p, _ in failures]) >= restart:  # the part of a batch after the cut
                keep = [p for p in positions if p >= restart]
                writer.append(_rows(keep), keep, [(p, r) for p, r in failures if p >= restart])
        writer.finish()
    _assert_same_store(whole, out)


def test_integrity_helpers(tmp_path: Path) -> None:
    import errno

    from auditor.io.integrity import chunk_problems, io_cause

    cause = io_cause(RuntimeError("Unable to flush (file write failed: errno = 28, error message = 'x')"))
    assert cause.errno == errno.ENOSPC and cause.strerror == os.strerror(errno.ENOSPC)
    assert io_cause(OSError(errno.EROFS, "Read-only file system")).errno == errno.EROFS
    assert io_cause(RuntimeError("no errno here")).errno == errno.EIO
    path = tmp_path / "h.h5"
    with h5py.File(path, "w") as f:
        data = np.arange(40, dtype=np.float32).reshape(10, 4)
        data[7, 1] = np.inf
        f.create_dataset("x", data=data, chunks=(3, 4), fletcher32=True)
        raw = np.zeros((10, 4), np.uint16)
        raw[4, 0] = 0x7FC0  # a bfloat16 NaN
        f.create_dataset("b", data=raw, chunks=(5, 4), fletcher32=True).attrs["encoding"] = "bfloat16"
        f.create_dataset("z", data=np.zeros((4, 2), np.float32), chunks=(2, 2), fletcher32=True)
    with h5py.File(path, "r") as f:
        assert [(p.start, p.stop, p.kind) for p in chunk_problems(f["x"])] == [(6, 9, "nonfinite")]
        assert [(p.start, p.kind) for p in chunk_problems(f["b"])] == [(0, "nonfinite"), (5, "unverified")]
        # all-zero chunks: the checksum of zeros is zero, so they cannot be told from chunks never written
        assert [(p.start, p.kind) for p in chunk_problems(f["z"])] == [(0, "unverified"), (2, "unverified")]
        assert list(chunk_problems(f["x"], 6)) == []


def test_a_chunk_of_label_zero_is_not_suspect(tmp_path: Path) -> None:
    from auditor.io.integrity import chunk_problems

    path = tmp_path / "l.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("label", data=np.zeros(8, np.int64), chunks=(4,), fletcher32=True)
    with h5py.File(path, "r") as f:
        assert list(chunk_problems(f["label"])) == []


def test_a_failed_write_while_resuming_keeps_the_partial(tmp_path: Path, monkeypatch) -> None:
    import errno

    from auditor.errors import OutputError

    out = tmp_path / "k.h5"
    _write(out, _header(), BATCHES[:2]).close()

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(h5py.File, "flush", full)
    with pytest.raises(OutputError, match="k.h5.partial: cannot write .No space left on device.") as info:
        StoreWriter(out, _header())
    assert "kept (4 samples)" in info.value.hint
    monkeypatch.undo()
    assert (tmp_path / "k.h5.partial").exists() and not (tmp_path / "k.h5.lock").exists()
    with StoreWriter(out, _header()) as writer:
        assert writer.resumed_from == 4
