"""Benchmark: the cost of the stores' Fletcher-32 checksums (issue 15).

Extracts the same activations with checksums on and off (``auditor.io.store.layout._CHECKSUMS``),
in alternating runs in one process, and reads every stage back from each store
(HDF5 checks each chunk's checksum on read). Both sides use the same writer
otherwise (rows flushed before their counter, the row digest at the end).

Cases: the bundled example (``fixtures/resnet8-digits.safetensors`` on the 300
``fixtures/digits``, 0.3 MB per batch) and, with ``--cifar``, the CIFAR
ResNet-56 of ../shared/data on its 200 CIFAR-10 test images replicated to 3000.

Usage::

    python bench/bench_checksums.py              # bundled example, 7 alternations
    python bench/bench_checksums.py --cifar      # and the ResNet-56 case
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import auditor.io.store.layout as store_layout  # noqa: E402
from auditor.tasks.images import open_images  # noqa: E402
from auditor.tasks.extract import extract_activations  # noqa: E402
from auditor.subject import open_subject  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def _read_back(path: Path) -> float:
    """Seconds to read every stage of a store, chunk-aligned blocks into one buffer."""
    started = time.perf_counter()
    with h5py.File(path, "r") as f:
        for name in f["stages"]:
            ds = f["stages"][name]
            rows = max(ds.chunks[0], (8 << 20) // max(1, ds[0:1].nbytes) // ds.chunks[0] * ds.chunks[0])
            buffer = np.empty((rows, *ds.shape[1:]), ds.dtype)
            for start in range(0, ds.shape[0], rows):
                stop = min(ds.shape[0], start + rows)
                ds.read_direct(buffer, np.s_[start:stop], np.s_[0:stop - start])
    return time.perf_counter() - started


def _raw(work: Path, repeat: int) -> None:
    """The filter alone: 64 MiB of float32 in 256 KiB chunks, written and read with and without it."""
    data = np.random.default_rng(0).standard_normal((1024, 16, 32, 32), dtype=np.float32)
    best: dict[bool, list[float]] = {True: [np.inf, np.inf], False: [np.inf, np.inf]}
    for _ in range(repeat):
        for checksums in (False, True):
            path = work / f"raw-{checksums}.h5"
            started = time.perf_counter()
            with h5py.File(path, "w") as f:
                f.create_dataset("x", data=data, chunks=(4, 16, 32, 32), fletcher32=checksums)
            best[checksums][0] = min(best[checksums][0], time.perf_counter() - started)
            started = time.perf_counter()
            with h5py.File(path, "r") as f:
                f["x"].read_direct(np.empty_like(data))
            best[checksums][1] = min(best[checksums][1], time.perf_counter() - started)
    mib = data.nbytes / 2**20
    for checksums in (False, True):
        write, read = best[checksums]
        print(f"raw {'with' if checksums else 'without'} checksums: write {write:.3f} s ({mib / write:.0f} MiB/s), "
              f"read {read:.3f} s ({mib / read:.0f} MiB/s)")
    cost = (best[True][0] - best[False][0]) / mib * 1e3
    print(f"Fletcher-32 adds {cost:.2f} ms per MiB written, "
          f"{(best[True][1] - best[False][1]) / mib * 1e3:.2f} ms per MiB read (best of {repeat})")


def _case(label: str, checkpoint: Path, data: Path, work: Path, repeat: int, **image_options) -> None:
    subject = open_subject(checkpoint)
    images = open_images(data, subject, **image_options)
    runs: dict[bool, list[tuple[float, float, float, int]]] = {True: [], False: []}
    for _ in range(repeat):
        for checksums in (False, True):
            store_layout._CHECKSUMS = checksums
            out = work / f"{label}-{checksums}.h5"
            out.unlink(missing_ok=True)
            cpu = time.process_time()
            wall = time.perf_counter()
            extract_activations(subject.loaded.model, subject.anatomy, images.dataset, out,
                                checkpoint_sha256=subject.checkpoint.sha256, arch=subject.loaded.arch)
            runs[checksums].append((time.perf_counter() - wall, time.process_time() - cpu, _read_back(out),
                                    out.stat().st_size))
    store_layout._CHECKSUMS = True
    print(f"\n{label}: {len(images.dataset)} images, store {runs[True][0][3] / 2**20:.1f} MiB "
          f"(without checksums {runs[False][0][3] / 2**20:.1f} MiB), {repeat} alternating runs")
    print(f"{'':22s} {'extract best':>12s} {'median':>8s} {'CPU best':>9s} {'read best':>10s}")
    for checksums in (False, True):
        wall, cpu, read, _ = zip(*runs[checksums])
        print(f"{'with checksums' if checksums else 'without checksums':22s} {min(wall):11.3f}s "
              f"{statistics.median(wall):7.3f}s {min(cpu):8.3f}s {min(read):9.4f}s")
    paired = [a[0] / b[0] for a, b in zip(runs[True], runs[False])]
    print(f"ratio with/without: extract best {min(r[0] for r in runs[True]) / min(r[0] for r in runs[False]):.3f}, "
          f"median of paired {statistics.median(paired):.3f}; read best "
          f"{min(r[2] for r in runs[True]) / min(r[2] for r in runs[False]):.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cifar", action="store_true", help="also the CIFAR ResNet-56 on 3000 images")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="resdyn-bench-checksums-"))
    try:
        _raw(work, args.repeat)
        _case("bundled resnet8-digits", REPO / "fixtures" / "resnet8-digits.safetensors",
              REPO / "fixtures" / "digits", work, args.repeat)
        if args.cifar:
            folder = work / "cifar3000"
            source = SHARED / "images" / "cifar10-test-200"
            for i, image in enumerate(sorted(source.rglob("*.png")) * 15):
                target = folder / image.parent.name / f"{i:05d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, target)
            _case("CIFAR ResNet-56", SHARED / "checkpoints" / "cifar10-resnet56-akamaster.th", folder, work,
                  max(3, args.repeat // 2), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
