"""Fault injection: kills, failed writes, damaged chunks, concurrent writers (issue 15).

Every scenario ends in one of two states, never a third: a store identical
(bit for bit, every dataset and attribute but ``created``) to the one an
uninterrupted run writes, or a one-line error (exit 2) naming the file and
the cause, with the ``.partial`` kept only where a resume can use it.
The kills use the test-only hook ``RESDYN_TEST_FAULT`` of auditor/io/store/faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from auditor.io.store import FAULT_PHASES, StoreHeader, StoreWriter, open_store
from auditor.io.verify import verify_store
from auditor.io.stage_spec import StageSpec
from conftest import FIXTURES, run_cli

REPO = Path(__file__).resolve().parents[1]
CKPT = FIXTURES / "resnet8-digits.safetensors"
DIGITS = FIXTURES / "digits"
PER_CLASS = 6  # 60 images: 15 batches of 4; chunks of 4 (stem, layer1), 8, 16 and 60 rows
EXTRACT = ["extract", CKPT, "--data", DIGITS, "--per-class", str(PER_CLASS), "--batch-size", "4", "--no-progress"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _extract_process(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RESDYN_TEST_FAULT", None)
    if fault:
        env["RESDYN_TEST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "auditor", *map(str, EXTRACT), "-o", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _datasets(path: Path) -> dict[str, object]:
    """Every dataset (dtype, shape, chunks, filters, values, attributes) and the root attributes."""
    found: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                found[name] = (obj.dtype, obj.shape, obj.chunks, obj.compression, obj.fletcher32,
                               {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}, obj[()])
        f.visititems(visit)
        found["/"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items() if k != "created"}
    return found


def _assert_identical(a: Path | dict, b: Path) -> None:
    """``a`` (a store, or its :func:`_datasets` read once) and the store ``b`` hold the same bits."""
    left, right = dict(a) if isinstance(a, dict) else _datasets(a), _datasets(b)
    assert left.keys() == right.keys()
    assert left.pop("/") == right.pop("/")
    for name in left:
        assert left[name][:6] == right[name][:6], name
        values_a, values_b = left[name][6], right[name][6]
        if values_a.dtype.kind == "O":
            assert values_a.tolist() == values_b.tolist(), name
        else:  # bit for bit, not just equal as numbers
            assert values_a.tobytes() == values_b.tobytes(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store an uninterrupted extraction writes."""
    out = tmp_path_factory.mktemp("reference") / "whole.h5"
    done = _extract_process(out)
    assert done.returncode == 0, done.stderr
    return out


def _damage(path: Path, key: str, chunk: int, *, zero: bool = False) -> tuple[int, int]:
    """Overwrite bytes inside chunk number ``chunk`` of ``key`` (all of it with zeros when ``zero``).

    Returns the chunk's rows.
    """
    with h5py.File(path, "r") as f:
        ds = f[key]
        info = ds.id.get_chunk_info(chunk)
        start = info.chunk_offset[0]
        rows = (start, min(ds.shape[0], start + ds.chunks[0]))
    with open(path, "r+b") as stream:
        if zero:
            stream.seek(info.byte_offset)
            stream.write(b"\0" * info.size)
        else:
            stream.seek(info.byte_offset + info.size // 2)
            stream.write(bytes(range(7, 23)))
    return rows


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- kills


def _kill_and_resume(tmp_path: Path, reference: Path, kills: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = 10 * PER_CLASS
    points = sorted(int(r) for r in rng.integers(1, total, size=kills))
    phases = [FAULT_PHASES[int(i)] for i in rng.integers(0, len(FAULT_PHASES), size=kills)]
    out = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    for rows, phase in zip(points, phases):
        done = _extract_process(out, f"kill:{rows}:{phase}")
        assert done.returncode == -9, (rows, phase, done.stderr)
        assert partial.exists() and not out.exists()
        with h5py.File(partial, "r") as f:  # the counter never runs ahead of the data
            assert int(f.attrs["written"]) <= min(f[k].shape[0] for k in ("samples/label", "stages/stem"))
    done = _extract_process(out)
    assert done.returncode == 0, done.stderr
    assert "resumed after" in " ".join(done.stderr.split()) and "warning" not in done.stderr  # nothing damaged
    assert not partial.exists() and not (tmp_path / "killed.h5.lock").exists()
    _assert_identical(reference, out)
    assert verify_store(out).ok


def test_killed_at_a_few_points_resumes_to_the_same_store(tmp_path: Path, reference: Path) -> None:
    _kill_and_resume(tmp_path, reference, kills=2, seed=1)


@pytest.mark.slow
def test_killed_at_5_random_points_resumes_to_the_same_store(tmp_path: Path, reference: Path) -> None:
    """Whole ``resdyn extract`` processes killed at the writer's phases; the writer alone is killed at
    200 random moments below (test_writer_killed_at_100_random_moments_...), far more densely."""
    _kill_and_resume(tmp_path, reference, kills=5, seed=15)


# --------------------------------------------------------------------------- damaged chunks


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .partial an extraction killed after storing 40 of its 60 rows leaves."""
    out = tmp_path_factory.mktemp("killed") / "d.h5"
    assert _extract_process(out, "kill:40:flushed").returncode == -9
    return out.with_name("d.h5.partial")


def _partial_after_kill(tmp_path: Path, killed: Path) -> tuple[Path, Path]:
    """A copy of ``killed`` in ``tmp_path``: (the store to write, its .partial)."""
    partial = tmp_path / "d.h5.partial"
    partial.write_bytes(killed.read_bytes())
    return tmp_path / "d.h5", partial


@pytest.mark.parametrize(("key", "chunk", "zero", "restart"), [
    ("stages/layer1", 4, False, 16),  # rows 16:20 fail their checksum
    ("stages/layer2", 1, False, 8),  # rows 8:16
    ("stages/stem", 2, True, 8),  # all zero, checksum included: cannot be trusted either
])
def test_damaged_partial_is_cut_back_to_the_last_verified_chunk(key, chunk, zero, restart, tmp_path: Path,
                                                                  reference: Path, killed: Path, capsys) -> None:
    out, partial = _partial_after_kill(tmp_path, killed)
    assert _damage(partial, key, chunk, zero=zero)[0] == restart
    code, _, err = run_cli([*EXTRACT, "-o", out], capsys)
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert f"{key} rows {restart}:" in warning and f"resuming from sample {restart}" in warning
    assert f"resumed after {restart}" in " ".join(err.split())
    _assert_identical(reference, out)


def test_partial_whose_sample_list_was_altered_is_cut_back(tmp_path: Path, reference: Path, killed: Path,
                                                           capsys) -> None:
    out, partial = _partial_after_kill(tmp_path, killed)
    with h5py.File(partial, "r+") as f:
        f["samples/path"][21] = "somewhere/else.png"  # not covered by a checksum: compared with the selection
    code, _, err = run_cli([*EXTRACT, "-o", out], capsys)
    assert code == 0 and "samples/path or samples/label row 21" in err
    _assert_identical(reference, out)


def test_partial_with_damaged_metadata_is_refused_in_one_line(tmp_path: Path, killed: Path, capsys) -> None:
    out, partial = _partial_after_kill(tmp_path, killed)
    with h5py.File(partial, "r+") as f:
        f.attrs["written"] = 10_000
    code, out_text, err = run_cli([*EXTRACT, "-o", out], capsys)
    assert code == 2 and out_text == ""
    line = _one_line(err)
    assert "d.h5.partial: cannot resume" in line and "--overwrite" in line
    assert partial.exists() and not out.exists()  # a refused resume never deletes the work


def test_verify_calls_a_partial_resumable_only_where_a_resume_goes_on(tmp_path: Path, killed: Path) -> None:
    out, partial = _partial_after_kill(tmp_path, killed)
    (problem,) = [p.message for p in verify_store(partial).problems]
    assert "(40 of 60 samples handled); rerun the same extract command to resume it" in problem
    with h5py.File(partial, "r+") as f:
        f.attrs["written"] = 10_000  # what the resume above refuses
    (problem, *_) = [p.message for p in verify_store(partial).problems]
    assert "cannot be resumed ('written' = 10000 does not match the data); delete it and extract again" in problem
    with h5py.File(partial, "r+") as f:
        del f["stages/stem"]
    assert "cannot be resumed (the unfinished file is damaged" in verify_store(partial).problems[0].message


def test_damaged_store_is_reported_by_verify_and_refused_by_readers(tmp_path: Path, reference: Path,
                                                                   capsys) -> None:
    store = tmp_path / "s.h5"
    store.write_bytes(reference.read_bytes())
    bad = [_damage(store, "stages/layer1", 2), _damage(store, "stages/penultimate", 0)]
    code, out, err = run_cli(["verify", store, "--format", "json"], capsys)
    assert code == 2
    doc = json.loads(out)
    assert doc["ok"] is False and doc["command"] == "verify"
    assert [(p["key"], tuple(p["rows"])) for p in doc["problems"]] == [
        ("stages/layer1", bad[0]), ("stages/penultimate", bad[1])]
    assert all("Fletcher-32" in p["problem"] for p in doc["problems"])
    assert "stages/layer1 rows 8:12" in _one_line(err) and "1 more problem" in err
    code, out, err = run_cli(["verify", store], capsys)
    assert code == 2 and out.splitlines()[1:] == [
        f"{store}: stages/layer1 rows 8:12: the chunk fails its Fletcher-32 checksum",
        f"{store}: stages/penultimate rows 0:60: the chunk fails its Fletcher-32 checksum"]
    code, out, err = run_cli(["angles", store, "--no-progress", "--format", "json"], capsys)
    assert code == 2 and out == ""
    line = _one_line(err)
    assert str(store) in line and "damaged" in line and "checksum" in line
    with open_store(store) as opened, pytest.raises(OSError):
        opened.stage("layer1")[8:12]  # h5py itself refuses the chunk: no wrong number comes out


def test_verify_accepts_intact_stores_and_refuses_what_is_not_one(tmp_path: Path, reference: Path,
                                                                 capsys) -> None:
    code, out, err = run_cli(["verify", reference], capsys)
    assert code == 0 and err == ""
    assert out.strip() == (f"{reference}: OK (resdyn-activations 1.1, 60 samples, 5 stages, 44 chunks read back, "
                           "checksums verified, values finite)")
    with h5py.File(reference, "r") as f:  # the chunk count, independently
        expected = sum(-(-f[k].shape[0] // f[k].chunks[0]) for k in ["samples/label", *(
            f"stages/{n}" for n in f["stages"])])
    assert expected == 44
    text = tmp_path / "notes.h5"
    text.write_text("not a store")
    code, out, err = run_cli(["verify", text], capsys)
    assert code == 2 and _one_line(err).endswith("notes.h5: not an HDF5 file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    code, out, err = run_cli(["verify", foreign, "-f", "json"], capsys)
    assert code == 2 and json.loads(out)["problems"][0]["key"] == "format"
    nan = tmp_path / "nan.h5"
    nan.write_bytes(reference.read_bytes())
    with h5py.File(nan, "r+") as f:  # written through HDF5: the checksum is right, the value is not
        f["stages/layer3"][17, 0, 0, 0] = np.nan
        f.attrs["num_selected"] = 61
    code, out, err = run_cli(["verify", nan], capsys)
    assert code == 2
    assert out.splitlines()[1:] == [f"{nan}: written: 60 rows stored + 0 skipped != 61 samples selected",
                                    f"{nan}: stages/layer3 rows 16:32: 1 values are NaN or inf"]


# --------------------------------------------------------------------------- stores without checksums


def _without_checksums(source: Path, target: Path) -> None:
    """A copy of ``source`` as resdyn wrote it before checksums (format 1.0, no rows_sha256)."""
    with h5py.File(source, "r") as src, h5py.File(target, "w", libver=("v108", "v110"), track_order=True) as dst:
        for key, value in src.attrs.items():
            if key != "rows_sha256":
                dst.attrs[key] = value
        dst.attrs["format_version"] = "1.0"

        def copy(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Group):
                dst.require_group(name)
                return
            chunks = obj.chunks
            data = obj[()]
            if chunks:
                made = dst.create_dataset(name, data=data, chunks=chunks, maxshape=(None, *obj.shape[1:]),
                                          dtype=obj.dtype)
            else:
                made = dst.create_dataset(name, data=data, dtype=obj.dtype)
            for key, value in obj.attrs.items():
                made.attrs[key] = value
        src.visititems(copy)


def test_stores_without_checksums_stay_readable_with_a_warning(tmp_path: Path, reference: Path, capsys) -> None:
    old = tmp_path / "old.h5"
    _without_checksums(reference, old)
    with pytest.warns(UserWarning, match="without checksums"):
        with open_store(old) as store:
            assert store.checksums is False
    with open_store(reference) as store:
        assert store.checksums is True
    code, out, err = run_cli(["angles", old, "--no-progress", "--format", "json"], capsys)
    assert code == 0
    assert [line for line in err.splitlines() if "checksums" in line] == [
        f"warning: {old}: written without checksums (store format 1.0), so damage in it cannot be detected; "
        "'resdyn extract --overwrite' rewrites it with checksums"]
    code, new_doc, _ = run_cli(["angles", reference, "--no-progress", "--format", "json"], capsys)
    assert json.loads(out)["stages"] == json.loads(new_doc)["stages"]  # same numbers
    code, out, err = run_cli(["verify", old], capsys)
    assert code == 0 and "no checksums to verify" in out and "damage inside a chunk cannot be detected" in err


# --------------------------------------------------------------------------- failed writes


def _raise_enospc_after(calls: int):
    """A replacement that fails with ENOSPC from call number ``calls`` on, like a disk that fills up."""
    count = {"n": 0}

    def wrap(real):
        def failing(*args, **kwargs):
            count["n"] += 1
            if count["n"] >= calls:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return failing
    return wrap


@pytest.mark.parametrize(("target", "calls", "kept"), [
    ("flush", 1, False),  # the very first flush: nothing to keep
    ("flush", 12, True),  # a few batches in: kept for a resume
    ("setitem", 40, True),
])
def test_full_disk_during_extract_is_one_line_and_resumable(target, calls, kept, tmp_path: Path,
                                                            reference: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "full.h5"
    partial = tmp_path / "full.h5.partial"
    wrap = _raise_enospc_after(calls)
    if target == "flush":
        monkeypatch.setattr(h5py.File, "flush", wrap(h5py.File.flush))
    else:
        monkeypatch.setattr(h5py.Dataset, "__setitem__", wrap(h5py.Dataset.__setitem__))
    code, stdout, err = run_cli([*EXTRACT, "-o", out], capsys)
    monkeypatch.undo()
    assert code == 2 and stdout == ""
    line = _one_line(err)
    assert line.startswith(f"resdyn: error: {partial}: cannot write (No space left on device)")
    assert partial.exists() is kept and not out.exists() and not (tmp_path / "full.h5.lock").exists()
    assert ("kept" in line and "resume" in line) if kept else "nothing was kept" in line
    code, _, err = run_cli([*EXTRACT, "-o", out], capsys)  # space again: the same command finishes the job
    assert code == 0, err
    assert ("resumed after" in " ".join(err.split())) is kept
    _assert_identical(reference, out)


def test_hdf5_runtime_error_with_errno_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    """h5py reports some failed writes as RuntimeError ("... errno = 28 ..."): the cause is still named."""
    def failing(self):
        raise RuntimeError("Unable to flush raw data (file write failed: time = now, filename = 'x', "
                           "file descriptor = 4, errno = 28, error message = 'No space left on device')")
    monkeypatch.setattr(h5py.File, "flush", failing)
    code, _, err = run_cli([*EXTRACT, "-o", tmp_path / "r.h5"], capsys)
    assert code == 2 and "r.h5.partial: cannot write (No space left on device)" in _one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_finishing_keeps_the_finished_partial(tmp_path: Path, reference: Path, capsys,
                                                           monkeypatch) -> None:
    import auditor.io.store.writer as writer_module

    out = tmp_path / "f.h5"
    monkeypatch.setattr(writer_module, "_fsync", lambda path: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    code, _, err = run_cli([*EXTRACT, "-o", out], capsys)
    assert code == 2 and "f.h5.partial: cannot write (Input/output error)" in _one_line(err)
    assert (tmp_path / "f.h5.partial").exists() and not out.exists()
    monkeypatch.undo()
    code, _, err = run_cli([*EXTRACT, "-o", out], capsys)
    assert code == 0 and "resumed after 60" in " ".join(err.split())
    _assert_identical(reference, out)


def test_read_only_folder_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import auditor.io.store.lock as lock_module

    class ReadOnly:
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def open(path, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(lock_module, "os", ReadOnly())
    code, _, err = run_cli([*EXTRACT, "-o", tmp_path / "ro.h5"], capsys)
    assert code == 2 and "ro.h5.lock: cannot write (Read-only file system)" in _one_line(err)


@pytest.mark.parametrize("where", ["write", "replace"])
def test_full_disk_under_the_json_output(where, tmp_path: Path, reference: Path, capsys, monkeypatch) -> None:
    target = tmp_path / "reports" / "verify.json"
    target.parent.mkdir()  # -o creates no folder (tests/test_errors.py)
    if where == "replace":
        monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
    else:  # the temporary file is created, then the disk fills while the report is written into it
        real_write_bytes = Path.write_bytes

        def full(self, data):
            real_write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(Path, "write_bytes", full)
    code, out, err = run_cli(["verify", reference, "--format", "json", "-o", target], capsys)
    monkeypatch.undo()
    assert code == 2 and out == ""
    line = _one_line(err)
    assert f"{target}: cannot write (No space left on device)" in line
    assert list(target.parent.iterdir()) == []  # no temporary file left behind


# --------------------------------------------------------------------------- two audits, one cache


@pytest.mark.slow
def test_two_audits_sharing_a_cache_both_succeed_with_one_store(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["audit", CKPT, "--data", DIGITS, "--per-class", "4", "--samples", "2", "--directions", "1",
            "--power-iterations", "1", "--batch-size", "4", "--cache", cache, "--format", "json", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO), RESDYN_TEST_FAULT="delay:0.3")  # a slow writer: they meet
    runs = [subprocess.Popen([sys.executable, "-m", "auditor", *map(str, args), "-o", str(tmp_path / f"{i}.json")],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    assert sorted(p.name for p in cache.iterdir()) == [next(cache.glob("*.h5")).name]  # one store, nothing else
    docs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    for doc in docs:
        doc.pop("created", None)
    assert docs[0] == docs[1]
    assert verify_store(next(cache.glob("*.h5"))).ok


def test_audit_cache_replaces_a_store_without_checksums(tmp_path: Path, reference: Path, capsys) -> None:
    """A cached store of format 1.0 is written again (with checksums), not reused unverified."""
    from auditor.tasks.images import open_images
    from auditor.tasks.geometry import cache_name, stage_geometry
    from auditor.subject import open_subject

    subject = open_subject(CKPT)
    images = open_images(DIGITS, subject, per_class=2)
    cache = tmp_path / "cache"
    first = stage_geometry(subject, images, cache=cache)
    assert first.store.name == cache_name(subject, images, None, "float32") and not first.reused
    assert stage_geometry(subject, images, cache=cache).reused
    _without_checksums(first.store, tmp_path / "old.h5")
    os.replace(tmp_path / "old.h5", first.store)
    again = stage_geometry(subject, images, cache=cache)
    assert not again.reused and again.stages == first.stages
    with open_store(first.store) as store:
        assert store.checksums


def test_spectra_files_carry_checksums_that_verify_checks(tmp_path: Path, capsys) -> None:
    spectra = tmp_path / "spectra.h5"
    code, _, err = run_cli(["condition", CKPT, "--save-spectra", spectra, "--no-progress", "-f", "json"], capsys)
    assert code == 0, err
    with h5py.File(spectra, "r") as f:
        keys = [f"layers/{name}" for name in f["layers"]]
        assert keys and all(f[k].fletcher32 for k in keys)
        biggest = max(keys, key=lambda k: f[k].shape[0])
    code, out, _ = run_cli(["verify", spectra, "-f", "json"], capsys)
    assert code == 0 and json.loads(out)["ok"] and json.loads(out)["checked"]["datasets"] == len(keys)
    _damage(spectra, biggest, 0)
    code, out, err = run_cli(["verify", spectra, "-f", "json"], capsys)
    assert code == 2 and [p["key"] for p in json.loads(out)["problems"]] == [biggest]


# --------------------------------------------------------------------------- 200 kills of the writer itself


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_writer_killed_at_100_random_moments_resumes_each_to_the_same_store(compression, tmp_path: Path) -> None:
    """100 SIGKILLs of the store writer at random moments (inside flushes, copies and renames as much as
    between them), each resumed to the end and compared bit for bit with an uninterrupted store; kills often
    hit a run that was itself resuming an earlier kill's file (two runs: 200 kills). tests/_store_kills.py
    runs them in a small process (numpy and h5py, no torch, no pytest) that forks the writers cheaply."""
    done = subprocess.run([sys.executable, str(REPO / "tests" / "_store_kills.py"), str(tmp_path), compression,
                           "100", "26" if compression == "none" else "27"],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kills"] == 100 and result["identical"] == 100, result
    assert result["leftovers"] == []  # no lock and no .partial.new left behind


# --------------------------------------------------------------------------- #26: the cache keys on the images


def test_audit_cache_is_not_reused_after_images_are_replaced_in_place(tmp_path: Path) -> None:
    from auditor.subject import open_subject
    from auditor.tasks.geometry import stage_geometry
    from auditor.tasks.images import open_images

    data = tmp_path / "digits"
    shutil.copytree(DIGITS, data)
    subject = open_subject(CKPT)
    cache = tmp_path / "cache"
    images = open_images(data, subject, per_class=2)
    first = stage_geometry(subject, images, cache=cache)
    assert stage_geometry(subject, open_images(data, subject, per_class=2), cache=cache).reused
    victim, other = (data / rel for rel, _ in images.dataset.samples[:2])
    shutil.copyfile(other, victim)  # same name, other pixels
    again = stage_geometry(subject, open_images(data, subject, per_class=2), cache=cache)
    assert not again.reused and again.store != first.store
    assert again.stages != first.stages  # the angles of the new pixels


def test_verify_reports_damaged_counters_instead_of_raising(tmp_path: Path, killed: Path) -> None:
    _, partial = _partial_after_kill(tmp_path, killed)
    with h5py.File(partial, "r+") as f:
        f.attrs["written"] = "many"
    check = verify_store(partial)
    assert not check.ok and "'written' or 'num_selected' attribute cannot be read" in check.problems[0].message
