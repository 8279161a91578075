"""The store writer SIGKILLed at random moments, each kill resumed and compared (tests/test_faults.py runs it).

``python tests/_store_kills.py FOLDER COMPRESSION KILLS SEED`` prints one JSON line:
``{"kills", "identical", "repaired", "leftovers", "mismatches"}``. It runs in a process of its own that
imports numpy, h5py and auditor.io.store only (no torch, whose OpenMP pool cannot survive a fork, and no
pytest): each writer is an ``os.fork()`` of it, cheap, with no HDF5 file open in the parent at the fork.
The writer is driven as extract drives it, with synthetic float32 rows; fsync is a no-op (a kill loses
nothing the kernel holds: only a power loss would need it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np

from auditor.io.stage_spec import StageSpec
from auditor.io.store import StoreHeader, StoreWriter

STAGES = (  # chunks of 4 and 64 rows
    StageSpec("wide", "layer1", "input", (64, 16, 16)),
    StageSpec("mid", "layer2", "input", (4, 8, 8)),
    StageSpec("penultimate", "fc", "input", (16,)),
)
SAMPLES = 14
BROKEN = {5: "broken", 9: "truncated", 10: "truncated"}  # skipped images, in the skipped list
ROWS = {s.name: np.random.default_rng(k).standard_normal((SAMPLES, *s.shape), dtype=np.float32)
        for k, s in enumerate(STAGES)}


def header(compression: str) -> StoreHeader:
    return StoreHeader(
        checkpoint_sha256="ab" * 32, arch="synthetic", data_root="/data", preset="none", preprocessing="{}",
        seed=0, per_class=None, shard=(0, 1), classes=("a", "b", "c"),
        samples=tuple((f"{'abc'[i % 3]}/{i:03d}.png", i % 3) for i in range(SAMPLES)),
        stages=STAGES, compression=compression)


def write(out: Path, head: StoreHeader, batch: int = 3) -> None:
    """What extract does with the store: open (or resume), append the remaining batches, finish."""
    with StoreWriter(out, head) as writer:
        for start in range(writer.consumed, SAMPLES, batch):
            handled = range(start, min(SAMPLES, start + batch))
            positions = [p for p in handled if p not in BROKEN]
            writer.append({name: rows[positions] for name, rows in ROWS.items()}, positions,
                          [(p, BROKEN[p]) for p in handled if p in BROKEN])
        writer.finish()


def forked_write(out: Path, head: StoreHeader, kill_after: float | None) -> bool:
    """:func:`write` in a forked child, SIGKILLed after ``kill_after`` seconds; whether it was killed."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            write(out, head)
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return True
    if os.WEXITSTATUS(status) != 0:
        raise RuntimeError("a writer failed without being killed")
    return False


def contents(path: Path) -> dict[str, object]:
    """Every dataset (dtype, shape, chunks, filters, attributes, raw bytes) and the root attributes."""
    found: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                values = obj[()]
                found[name] = (str(obj.dtype), obj.shape, obj.chunks, obj.compression, obj.fletcher32,
                               {k: np.asarray(v).tolist() for k, v in obj.attrs.items()},
                               values.tolist() if values.dtype.kind == "O" else values.tobytes())
        f.visititems(visit)
        found["/"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items() if k != "created"}
    return found


def main(folder: Path, compression: str, kills_wanted: int, seed: int) -> dict[str, object]:
    os.fsync = lambda fd: None
    warnings.simplefilter("ignore")  # the children's: a resume's repair is counted below
    head = header(compression)
    whole = folder / "whole.h5"
    started = time.perf_counter()
    forked_write(whole, head, None)
    span = time.perf_counter() - started  # an uninterrupted run
    expected = contents(whole)
    rng = np.random.default_rng(seed)
    out, partial, snapshot = folder / "k.h5", folder / "k.h5.partial", folder / "snapshot"
    kills = identical = repaired = 0
    mismatches: list[str] = []
    while kills < kills_wanted:
        partial.unlink(missing_ok=True)
        for _ in range(int(rng.integers(1, 4))):  # 1 to 3 kills in a row, each run resuming the last one's file
            if kills == kills_wanted or not forked_write(out, head, float(rng.uniform(0, span))):
                break  # it finished first: nothing to resume
            kills += 1
            if out.exists():  # killed after its rename: finished, nothing to resume
                identical += contents(out) == expected
                break
            if partial.exists():
                shutil.copyfile(partial, snapshot)  # the next kill's starting point
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                write(out, head)  # resume this kill to the end
            repaired += bool(caught)
            if contents(out) == expected:
                identical += 1
            else:
                mismatches.append(f"kill {kills}: {caught[0].message if caught else 'no repair'}")
            out.unlink()
            if not snapshot.exists():
                break
            os.replace(snapshot, partial)
        out.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    leftovers = sorted(p.name for p in folder.glob("k.h5*"))
    return {"kills": kills, "identical": identical, "repaired": repaired, "leftovers": leftovers,
            "mismatches": mismatches[:10]}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
