"""The same commands under torchrun (issue 14): two gloo ranks on CPU give the single process's result.

Each multi-process case launches real processes (``torch.distributed.run``, or two
ranks started by hand with the variables torchrun sets, to see each rank's own
exit code and output) and compares with a single-process run of the same
command: reports equal as parsed JSON (no timestamps in them), stores equal
dataset by dataset, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from auditor import distributed
from auditor.cli import run
from conftest import FIXTURES, ROOT

CHECKPOINT = FIXTURES / "resnet8-digits.safetensors"
DIGITS = FIXTURES / "digits"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(ROOT), CI="1", **extra)
    return env


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "auditor", *args]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _two_ranks(args: list[str], cwd: Path, program: tuple[str, ...] | list[str] = ("-m", "auditor"),
               ) -> list[subprocess.CompletedProcess]:
    """Two ranks started as torchrun starts them, each with its own exit code and output."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [
        subprocess.Popen(
            [sys.executable, *program, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RESDYN_DIST_TIMEOUT="60"),
        )
        for rank in (0, 1)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def _single(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = run(args)
    return code, capsys.readouterr().out


def _small_digits(root: Path, *, broken: str | None = None) -> Path:
    """Classes 0 and 1 of the digits, four images each (sorted: class 1 is positions 4..7)."""
    for name in ("0", "1"):
        (root / name).mkdir(parents=True)
        for image in sorted((DIGITS / name).iterdir())[:4]:
            shutil.copy(image, root / name / image.name)
    if broken is not None:
        target = sorted((root / broken).iterdir())[1]
        target.write_bytes(b"\x89PNG not an image")
    return root


def _datasets(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, item: found.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
        found["attrs"] = {k: v for k, v in h5.attrs.items() if k != "created"}
    return found


# --------------------------------------------------------------------------- one process


def test_split_is_deterministic_balanced_and_complete() -> None:
    costs = [5.0, 1.0, 1.0, 3.0, 2.0, 2.0, 1.0]
    shares = distributed.split(costs, 3)
    assert shares == distributed.split(costs, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    assert all(share == sorted(share) for share in shares)
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)  # greedy LPT: within one unit of each other
    assert distributed.split([1.0] * 4, 2) == [[0, 2], [1, 3]]
    assert distributed.split([1.0], 3) == [[0], [], []]
    with pytest.raises(ValueError):
        distributed.split([1.0], 0)


def test_single_process_is_a_plain_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched()
    assert distributed.init() == distributed.World() == distributed.world()
    calls: list[tuple[int, int]] = []
    assert distributed.compute(3, lambda i: i * i, progress=lambda d, t: calls.append((d, t))) == [0, 1, 4]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert distributed.compute_shares(3, lambda units: [u + 1 for u in units]) == [1, 2, 3]
    assert distributed.on_main(lambda: "x") == "x"
    assert distributed.agree(1, None) == (1, None)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to split
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "localhost")):
        monkeypatch.setenv(name, value)
    assert not distributed.launched()


def test_timeout_and_threads_variables_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.errors import UsageError

    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match="RESDYN_DIST_TIMEOUT"):
        distributed._timeout_seconds()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "30")
    assert distributed._timeout_seconds() == 30.0
    monkeypatch.setenv(distributed.THREADS_ENV, "0")
    with pytest.raises(UsageError, match="RESDYN_RANK_THREADS"):
        distributed._rank_threads(2)
    monkeypatch.setenv(distributed.THREADS_ENV, "3")
    assert distributed._rank_threads(2) == 3
    monkeypatch.delenv(distributed.THREADS_ENV)
    assert distributed._rank_threads(2) == max(1, distributed._cores() // 2)


# --------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_audit_under_torchrun_equals_one_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """condition (layers, blocks), extract + angles, stability (blocks, trajectory): one report, the same."""
    args = ["audit", str(CHECKPOINT), "--data", str(DIGITS), "--per-class", "6", "--samples", "6",
            "--directions", "2", "--power-iterations", "3", "--format", "json"]
    code, out = _single(args, capsys)
    assert code == 0
    two = _torchrun(args, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout) == json.loads(out)  # one document on stdout: rank 1 printed nothing


@pytest.mark.slow
def test_extract_under_torchrun_writes_the_same_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _small_digits(tmp_path / "data", broken="1")  # a skipped image in rank 1's batch
    common = ["extract", str(CHECKPOINT), "--data", str(data), "--batch-size", "2"]
    assert _single([*common, "-o", str(tmp_path / "one.h5")], capsys)[0] == 0
    two = _torchrun([*common, "-o", str(tmp_path / "two.h5")], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    one, other = _datasets(tmp_path / "one.h5"), _datasets(tmp_path / "two.h5")
    assert one.keys() == other.keys() and "stages/layer3" in one
    for key in one:
        if key == "attrs":
            assert one[key].keys() == other[key].keys()
            assert all(np.array_equal(one[key][k], other[key][k]) for k in one[key])
        else:
            assert np.array_equal(one[key], other[key]), key
    assert json.loads(one["attrs"]["skipped"])[0]["path"].startswith("1/")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one.h5", "two.h5"]  # no lock, no partial
    # angles of a store: rank 0 reads it with every core, as one process does
    code, single = _single(["angles", str(tmp_path / "two.h5"), "--format", "json"], capsys)
    assert code == 0
    angles = _torchrun(["angles", str(tmp_path / "two.h5"), "--format", "json"], tmp_path)
    assert angles.returncode == 0, angles.stderr[-2000:]
    assert json.loads(angles.stdout) == json.loads(single)


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_with_one_line(tmp_path: Path) -> None:
    data = _small_digits(tmp_path / "data", broken="1")  # batch 4..7 is rank 1's
    out = tmp_path / "acts.h5"
    ranks = _two_ranks(["extract", str(CHECKPOINT), "--data", str(data), "--batch-size", "4", "--strict",
                        "-o", str(out)], tmp_path)
    assert [r.returncode for r in ranks] == [2, 2]
    lines = ranks[0].stderr.strip().splitlines()
    assert len(lines) == 1, ranks[0].stderr
    assert lines[0].startswith("resdyn: error: rank 1: ") and "cannot read the image" in lines[0]
    assert ranks[0].stdout == "" and ranks[1].stdout == "" and ranks[1].stderr == ""
    assert not out.exists()


@pytest.mark.slow
def test_trajectory_under_torchrun_splits_the_checkpoints(tmp_path: Path) -> None:
    """Checkpoints split across ranks; each rank computes with one thread, so the
    single-process run it equals is the one with one thread (float64 GEMMs in the
    angles round by thread count, in one process too)."""
    folder = tmp_path / "run"
    folder.mkdir()
    for epoch in ("epoch-00", "epoch-03", "epoch-06"):
        shutil.copy(FIXTURES / "checkpoints" / "resnet8" / f"{epoch}.safetensors", folder)
    args = ["trajectory", str(folder), "--data", str(DIGITS), "--per-class", "3", "--format", "json"]
    one = subprocess.run([sys.executable, "-m", "auditor", *args], cwd=tmp_path, capture_output=True, text=True,
                         env=_env(OMP_NUM_THREADS="1"), timeout=300)
    assert one.returncode == 0, one.stderr
    two = _torchrun(args, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    document = json.loads(two.stdout)
    assert document == json.loads(one.stdout)
    assert [point["epoch"] for point in document["series"][0]["checkpoints"]] == [0, 3, 6]


_KILL_RANK_1 = """
import os, signal, sys
from auditor.tasks import extract
if os.environ["RANK"] == "1":  # SIGKILL rank 1 at its second batch, as the OOM killer would
    take, calls = extract._Capture.take, []
    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return take(self, *args, **kwargs)
    extract._Capture.take = dying
from auditor.cli import run
sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.slow
def test_extract_resumes_after_a_rank_was_killed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _small_digits(tmp_path / "data")
    common = ["extract", str(CHECKPOINT), "--data", str(data), "--batch-size", "1"]
    out = tmp_path / "two.h5"
    ranks = _two_ranks([*common, "-o", str(out)], tmp_path, program=["-c", _KILL_RANK_1])
    assert ranks[1].returncode == -9 and ranks[0].returncode == 2
    assert "resdyn: error: rank " in ranks[0].stderr and len(ranks[0].stderr.strip().splitlines()) == 1
    partial = tmp_path / "two.h5.partial"
    assert not out.exists() and partial.exists()
    with h5py.File(partial, "r") as h5:
        assert 0 < int(h5.attrs["written"]) < 8  # rounds before the kill are kept
    again = _torchrun([*common, "-o", str(out)], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _single([*common, "-o", str(tmp_path / "one.h5")], capsys)[0] == 0
    one, other = _datasets(tmp_path / "one.h5"), _datasets(out)
    assert one.keys() == other.keys()
    for key in one:
        if key != "attrs":
            assert np.array_equal(one[key], other[key]), key
    assert not partial.exists()


@pytest.mark.slow
def test_rank_0_refusing_the_output_ends_every_rank(tmp_path: Path) -> None:
    """An error in rank 0's own part (the store exists) reaches every rank; the hint keeps its flag."""
    data = _small_digits(tmp_path / "data")
    out = tmp_path / "acts.h5"
    out.write_bytes(b"an earlier result")
    ranks = _two_ranks(["extract", str(CHECKPOINT), "--data", str(data), "-o", str(out)], tmp_path)
    assert [r.returncode for r in ranks] == [2, 2]
    assert ranks[0].stderr.strip().splitlines() == [
        f"resdyn: error: rank 0: {out} already exists Hint: pass --overwrite to replace it, or choose another "
        "output path"
    ]
    assert ranks[1].stderr == "" and out.read_bytes() == b"an earlier result"


def test_stability_of_some_blocks_equals_those_of_the_full_run() -> None:
    """``only_blocks`` / ``with_trajectory`` (the units ranks share): the same numbers as a full run."""
    import torch

    from auditor.analysis.stability import measure_stability
    from auditor.subject import open_subject

    subject = open_subject(CHECKPOINT)
    images = torch.randn((3, *subject.anatomy.input_shape), generator=torch.Generator().manual_seed(5))
    options = dict(directions=2, power_iterations=2, seed=7)
    full = measure_stability(subject.loaded.model, subject.anatomy, images, **options)
    part = measure_stability(subject.loaded.model, subject.anatomy, images, **options, only_blocks=[1],
                             with_trajectory=False)
    rest = measure_stability(subject.loaded.model, subject.anatomy, images, **options, only_blocks=[])
    assert [b.name for b in part.blocks] == [full.blocks[1].name]
    assert part.blocks[0].to_dict(include_ratios=True) == full.blocks[1].to_dict(include_ratios=True)
    assert [b.to_dict() for b in part.batchnorm] == [b.to_dict() for b in full.batchnorm
                                                     if b.block == full.blocks[1].name]
    assert part.trajectory.runs == 0 and part.trajectory.points == ()
    assert rest.blocks == () and rest.trajectory.to_dict() == full.trajectory.to_dict()
    assert [b.to_dict() for b in rest.batchnorm] == [b.to_dict() for b in full.batchnorm if b.block is None]


_HANG_RANK_1 = """
import os, sys, time
from auditor.tasks import extract
if os.environ["RANK"] == "1":  # rank 1 hangs in its first batch
    extract._Capture.take = lambda *args, **kwargs: time.sleep(3600)
from auditor.cli import run
sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.slow
def test_no_rank_waits_forever_for_a_hung_one(tmp_path: Path) -> None:
    data = _small_digits(tmp_path / "data")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _HANG_RANK_1, "extract", str(CHECKPOINT), "--data", str(data), "--batch-size",
             "2", "-o", str(tmp_path / "acts.h5")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RESDYN_DIST_TIMEOUT="2"),
        )
        for rank in (0, 1)
    ]
    try:
        _, err = ranks[0].communicate(timeout=120)  # the collective timeout ends rank 0
    finally:
        ranks[1].kill()  # torchrun would end the hung one
        ranks[1].communicate()
    assert ranks[0].returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resdyn: error: rank 0: lost contact with the other ranks")
    assert "RESDYN_DIST_TIMEOUT" in lines[0]
    assert not (tmp_path / "acts.h5").exists()
