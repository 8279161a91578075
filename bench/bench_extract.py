"""Benchmark: resdyn's activation extraction against a bare forward loop.

For each case, on the same images with the same DataLoader and batch size:

* baseline: ``for batch in loader: model(batch.images)`` under ``torch.inference_mode()``;
* resdyn: :func:`auditor.tasks.extract.extract_activations` (hooks, copies, checks, HDF5 writes).

Cases:

(a) torchvision ResNet-50 (random weights) at 224 px on random-noise PNGs
    (5 classes, resized to 256 and center-cropped, ImageNet normalization);
(b) CIFAR ResNet-56 at 32 px (the akamaster checkpoint when ../shared/data has it)
    on the 200 CIFAR-10 test images replicated into a temporary folder.

Runs alternate (baseline, resdyn, baseline, resdyn, ...); the best of each is
the headline (on a shared machine, noise only ever adds time); the ratio of
the medians, the median of the paired ratios (each resdyn run against the
baseline run just before it, which shares its phase of a machine whose speed
drifts by up to 2x over minutes) and every run are printed too. CPU time, and the CPU time of the two places
where resdyn does extra work (the hooks' copies, the writer thread), are
reported beside wall time because they are far less sensitive to other load. Then peak RSS of one extraction
of N and of 10 N images, each in its own subprocess, shows that memory does not
grow with the number of images.

Both sides run with the process-wide malloc setting the ``resdyn`` command
applies at start (:func:`auditor.runtime.keep_freed_memory`); ``--glibc-defaults``
leaves glibc's defaults, under which both sides page-fault on every batch's
activations and the same loop runs 1x or 2x slower depending on the heap's history.

Usage::

    python bench/bench_extract.py            # full: 200 x 224 px, 3000 x 32 px, RSS 500 / 5000
    python bench/bench_extract.py --quick    # smaller: 48 x 224 px, 1000 x 32 px, RSS 100 / 1000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from auditor.tasks.extract import extract_activations  # noqa: E402
from auditor.io.images import (  # noqa: E402
    ImageDataset,
    make_loader,
    resolve_preprocessing,
    scan_image_folder,
    select_samples,
)
from auditor.models.anatomy import analyze_anatomy  # noqa: E402
from auditor.runtime import keep_freed_memory  # noqa: E402

SHARED = REPO / ".." / "shared" / "data"
CIFAR_200 = SHARED / "images" / "cifar10-test-200"
RESNET56 = SHARED / "checkpoints" / "cifar10-resnet56-akamaster.th"


# --------------------------------------------------------------------------- data


def _noise_folder(root: Path, n: int, side: int, classes: int = 5) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


def _cifar_folder(root: Path, n: int) -> Path:
    """``n`` images: the CIFAR-200 set replicated (hard links), or noise when it is absent."""
    if not CIFAR_200.is_dir():
        return _noise_folder(root, n, 32, classes=10)
    sources = sorted(p for p in CIFAR_200.rglob("*.png"))
    for i in range(n):
        src = sources[i % len(sources)]
        folder = root / src.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{i // len(sources):03d}_{src.name}"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return root


def _case(name: str, folder: Path) -> tuple:
    if name == "resnet50":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).eval()
        pre = resolve_preprocessing("imagenet")
        arch = "resnet50"
    else:
        from auditor.models.registry import build_model

        arch = "resnet56"
        if RESNET56.is_file():
            from auditor.io.checkpoint import load_checkpoint
            from auditor.models.load import load_model

            model = load_model(load_checkpoint(RESNET56)).model
        else:
            torch.manual_seed(0)
            model, _ = build_model("resnet56")
        pre = resolve_preprocessing("cifar10", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    dataset = ImageDataset(select_samples(scan_image_folder(folder)), pre)
    anatomy = analyze_anatomy(model, dataset.input_shape)
    return model, anatomy, dataset, arch


# --------------------------------------------------------------------------- timing


def _cpu() -> float:
    """CPU seconds (user + system) of this process, all threads, and its waited children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _baseline(model: torch.nn.Module, dataset: ImageDataset, batch_size: int, workers: int) -> tuple:
    loader = make_loader(dataset, batch_size=batch_size, workers=workers)
    start, cpu = time.perf_counter(), _cpu()
    with torch.inference_mode():
        for batch in loader:
            model(batch.images)
    return time.perf_counter() - start, _cpu() - cpu


class _Meter:
    """Thread CPU time spent in a wrapped function (the overhead's parts, measured
    where they happen, so that a busy machine's noise does not hide them)."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name, self.seconds = owner, name, 0.0
        self.original = getattr(owner, name)

    def __enter__(self) -> "_Meter":
        original = self.original

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start

        setattr(self.owner, self.name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.name, self.original)


def _resdyn(model, anatomy, dataset, arch, out: Path, args: argparse.Namespace) -> tuple:
    import auditor.tasks.extract
    from auditor.io.store import StoreWriter

    with _Meter(StoreWriter, "append") as writer, _Meter(auditor.tasks.extract, "_copy_into") as hooks:
        start, cpu = time.perf_counter(), _cpu()
        extract_activations(
            model, anatomy, dataset, out, checkpoint_sha256="0" * 64, arch=arch,
            dtype=args.dtype, compression=args.compression, batch_size=args.batch_size,
            workers=args.workers, overwrite=True,
        )
        seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    size = out.stat().st_size
    out.unlink()
    return seconds, cpu, size, writer.seconds, hooks.seconds


def _compare(name: str, n: int, args: argparse.Namespace, work: Path) -> dict:
    folder = work / f"{name}-images"
    if name == "resnet50":
        _noise_folder(folder, n, 240)
    else:
        _cifar_folder(folder, n)
    model, anatomy, dataset, arch = _case(name, folder)
    # warm-up (allocator, oneDNN primitive cache) on one batch, not timed
    with torch.inference_mode():
        model(torch.stack([dataset[i][0] for i in range(min(args.batch_size, len(dataset)))]))
    base, ours, base_cpu, ours_cpu, writer, hooks, size = [], [], [], [], [], [], 0
    for _ in range(args.repeat):
        seconds, cpu = _baseline(model, dataset, args.batch_size, args.workers)
        base.append(seconds)
        base_cpu.append(cpu)
        seconds, cpu, size, write_s, hook_s = _resdyn(model, anatomy, dataset, arch, work / f"{name}.h5", args)
        ours.append(seconds)
        ours_cpu.append(cpu)
        writer.append(write_s)
        hooks.append(hook_s)
    shutil.rmtree(folder)
    b, o = min(base), min(ours)
    bc, oc = min(base_cpu), min(ours_cpu)
    return {
        "case": name, "images": len(dataset), "input": list(dataset.input_shape),
        "baseline_s": [round(x, 2) for x in base], "resdyn_s": [round(x, 2) for x in ours],
        "baseline_best_s": round(b, 2), "resdyn_best_s": round(o, 2), "ratio": round(o / b, 3),
        "median_ratio": round(statistics.median(ours) / statistics.median(base), 3),
        # each resdyn run against the baseline run just before it (same machine phase)
        "paired_ratio": round(statistics.median(o_ / b_ for o_, b_ in zip(ours, base)), 3),
        "baseline_cpu_s": round(bc, 2), "resdyn_cpu_s": round(oc, 2), "cpu_ratio": round(oc / bc, 3),
        "store_mb": round(size / 2**20, 1),
        "writer_thread_cpu_s": round(statistics.median(writer), 2),
        "hook_copy_cpu_s": round(statistics.median(hooks), 2),
    }


# --------------------------------------------------------------------------- memory


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux), else the ru_maxrss peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0); no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _child_rss(n: int, args: argparse.Namespace, work: Path) -> None:
    """(In a subprocess.) One extraction of ``n`` CIFAR images; prints peak RSS in MiB."""
    torch.set_num_threads(args.threads)
    folder = _cifar_folder(work / f"rss-{n}", n)
    model, anatomy, dataset, arch = _case("resnet56", folder)
    before = _status_mb("VmRSS")
    _reset_peak()  # so that the peak below is the extraction's, not the imports'
    out = work / f"rss-{n}.h5"
    extract_activations(
        model, anatomy, dataset, out, checkpoint_sha256="0" * 64, arch=arch, dtype=args.dtype,
        batch_size=args.batch_size, workers=args.workers, overwrite=True,
    )
    peak = _status_mb("VmHWM")
    print(json.dumps({"images": n, "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
                      "store_mb": round(out.stat().st_size / 2**20, 1)}))


def _rss(n: int, args: argparse.Namespace, work: Path) -> dict:
    command = [
        sys.executable, __file__, "--child-rss", str(n), "--work", str(work),
        "--batch-size", str(args.batch_size), "--workers", str(args.workers),
        "--dtype", args.dtype, "--threads", str(args.threads),
        *(["--glibc-defaults"] if args.glibc_defaults else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"RSS child for {n} images failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller image counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compression", default=None, choices=[None, "lzf", "gzip"])
    parser.add_argument("--repeat", type=int, default=5, help="alternating runs per side (best is reported)")
    parser.add_argument("--cases", default="resnet50,resnet56")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-rss", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's malloc thresholds as they are (both sides)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the process-wide setting the resdyn command applies at start; on both
    # sides, so that the comparison is of the work, not of the allocator
    allocator = "glibc defaults" if args.glibc_defaults else (
        "resdyn's glibc malloc setting (auditor.runtime.keep_freed_memory)" if keep_freed_memory() else "default")
    if args.child_rss:
        _child_rss(args.child_rss, args, args.work)
        return
    sizes = {"resnet50": 48 if args.quick else 200, "resnet56": 1000 if args.quick else 3000}
    rss_n = 100 if args.quick else 500
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, workers "
          f"{args.workers}, dtype {args.dtype}, compression {args.compression}, allocator {allocator}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="resdyn-bench-") as tmp:
        work = Path(tmp)
        for name in [c for c in args.cases.split(",") if c]:
            row = _compare(name, sizes[name], args, work)
            print(f"{name:9s} {row['images']:5d} x {row['input'][1]:3d} px: bare loop "
                  f"{row['baseline_best_s']:7.2f} s  resdyn {row['resdyn_best_s']:7.2f} s  "
                  f"ratio {row['ratio']:.3f} (best of {args.repeat}; median ratio "
                  f"{row['median_ratio']:.3f}; median of paired ratios {row['paired_ratio']:.3f}; runs {row['baseline_s']} / {row['resdyn_s']}; "
                  f"best CPU time {row['baseline_cpu_s']:.1f} / {row['resdyn_cpu_s']:.1f} s, ratio "
                  f"{row['cpu_ratio']:.3f}; store {row['store_mb']} MiB)", flush=True)
            print(f"{'':9s} overhead where it happens: writer thread {row['writer_thread_cpu_s']:.2f} s "
                  f"CPU (checks, casts, HDF5 writes), hook copies {row['hook_copy_cpu_s']:.2f} s CPU "
                  f"= {(row['writer_thread_cpu_s'] + row['hook_copy_cpu_s']) / row['baseline_cpu_s']:.1%} "
                  "of the bare loop's CPU time", flush=True)
        if not args.no_rss:
            for n in (rss_n, 10 * rss_n):
                row = _rss(n, args, work)
                print(f"peak RSS during a resnet56 extraction of {row['images']:5d} images: "
                      f"{row['peak_rss_mb']:.0f} MiB (RSS before it {row['rss_before_mb']:.0f} MiB; "
                      f"store {row['store_mb']} MiB)", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
