"""How an audit's cost grows with the number of images: ResNet-50 at 224 px, 60 -> 2,000 -> 5,000 images.

Run by hand on a quiet machine (not part of the tests)::

    python bench/bench_scaling.py                       # 60, 2000, 5000 images (hours on 2 cores)
    python bench/bench_scaling.py --sizes 60,600         # a quick look
    python bench/bench_scaling.py --sizes 2000 --skip-audit   # angles and baselines on a kept store

What it does, for each size N (10 classes x N/10 images):

1. Images: the 200 CIFAR-10 test images of ``../shared/data`` (10 classes), each
   used again mirrored and shifted by a pixel or more until every class holds
   N/10 distinct files (PNG, 32 px, resized to 224 by ``--preset imagenet``).
   A random-init torchvision ResNet-50 (seeded), saved as safetensors.
2. ``resdyn audit MODEL --data DIR --preset imagenet --cache CACHE`` in a
   child process: wall time, peak memory (``/usr/bin/time -v``'s maximum
   resident set size; NaN without ``/usr/bin/time``), the store's size on disk
   and the size estimated before the first image (``tasks/store_space.py``).
3. ``resdyn angles STORE`` on the kept store: wall time and peak memory.
4. Baselines, each in a child process of its own: a bare float32 forward
   pass over the same N images (decoded and preprocessed as the audit does,
   batches of 32, ``torch.inference_mode()``), and a bare read of every
   stage of the store (once, sample order, a reused buffer) plus the float64
   Gram floor (every pair's products, ``N (N - 1) / 2 * D`` multiply-adds per
   stage, at the rate of one large float64 ``torch.mm`` measured in the same
   child); the float32 Gram floor (the same at float32 ``torch.mm``'s rate) is
   printed beside it.
5. Prints one table: time and ratio to its baseline (bars of issue 27: the
   audit of 2,000 images <= 2.0x the bare forward; angles <= 1.3x the bare
   read + Gram), peak memory, disk (written and estimated).

Timings need a quiet machine: the script refuses to start when the load
average is above ``--max-load`` (default 1.2); ``--force`` runs anyway (memory
and disk stay valid, the times are marked as not comparable). Children use 2
threads (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CIFAR = SHARED / "images" / "cifar10-test-200"

_FORWARD = """
import sys, time, torch, torchvision
from safetensors.torch import load_file
from auditor.subject import open_subject
from auditor.tasks.images import open_images
torch.set_num_threads({threads})
model = torchvision.models.resnet50(weights=None)
model.load_state_dict(load_file({model!r}))
model.eval()
images = open_images({data!r}, open_subject({model!r}), preset="imagenet")
dataset = images.dataset
start = time.perf_counter()
with torch.inference_mode():
    for first in range(0, len(dataset), 32):
        batch = torch.stack([dataset[i][0] for i in range(first, min(first + 32, len(dataset)))])
        model(batch)
print("SECONDS", time.perf_counter() - start)
"""

_READ_GRAM = """
import time, h5py, numpy as np, torch
torch.set_num_threads({threads})
def rate_of(dtype):
    a = torch.randn(1024, 8192, dtype=dtype)
    b = torch.randn(512, 8192, dtype=dtype)
    torch.mm(a, b.T)
    start = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b.T)
    return 3 * 1024 * 512 * 8192 / (time.perf_counter() - start)  # multiply-adds per second
rate, rate32 = rate_of(torch.float64), rate_of(torch.float32)
start = time.perf_counter()
macs = 0
with h5py.File({store!r}, "r") as f:
    for name, ds in f["stages"].items():
        n, d = ds.shape[0], int(np.prod(ds.shape[1:]))
        rows = max(1, (64 << 20) // (d * ds.dtype.itemsize))
        buf = np.empty((rows, *ds.shape[1:]), ds.dtype)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            ds.read_direct(buf, np.s_[s:e], np.s_[0:e - s])
        macs += n * (n - 1) // 2 * d
read = time.perf_counter() - start
print("SECONDS", read + macs / rate, "READ", read, "GRAM", macs / rate, "GRAM32", macs / rate32)
"""


def _load() -> float:
    return os.getloadavg()[0]


def _images(folder: Path, per_class: int) -> Path:
    """``per_class`` distinct PNGs per CIFAR class: the originals, then mirrored and shifted copies."""
    import numpy as np
    from PIL import Image

    if folder.is_dir():
        return folder
    for cls in sorted(p for p in CIFAR.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        out = folder / cls.name
        out.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.asarray(Image.open(files[i % len(files)]).convert("RGB"))
            variant = i // len(files)
            if variant % 2:
                pixels = pixels[:, ::-1]
            if variant // 2:
                pixels = np.roll(pixels, variant // 2, axis=(0, 1))
            Image.fromarray(np.ascontiguousarray(pixels)).save(out / f"{i:05d}.png")
    return folder


def _model(folder: Path) -> Path:
    import torch
    import torchvision
    from safetensors.torch import save_file

    path = folder / "resnet50.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"arch": "resnet50"})
    return path


def _measure(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """Wall seconds, peak resident MiB and stdout of ``cmd`` in a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RESDYN_RANK_THREADS": str(threads)}
    full = ["/usr/bin/time", "-v", *cmd] if Path("/usr/bin/time").exists() else cmd
    start = time.perf_counter()
    done = subprocess.run(full, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}\n{done.stderr[-3000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    peak = int(found.group(1)) / 1024 if found else float("nan")
    return wall, peak, done.stdout


def _estimate(model: Path, data: Path) -> int:
    """The store size estimated before the first image, as the audit computes it."""
    from auditor.subject import open_subject
    from auditor.tasks.extract import resolve_stages
    from auditor.tasks.images import open_images
    from auditor.tasks.store_space import store_bytes
    from auditor.io.store import StoreHeader

    subject = open_subject(model)
    images = open_images(data, subject, preset="imagenet")
    selection = images.dataset.selection
    header = StoreHeader(checkpoint_sha256="", arch="", data_root="", preset="", preprocessing="", seed=0,
                         per_class=None, shard=(0, 1), classes=selection.classes, samples=selection.samples,
                         stages=resolve_stages(subject.anatomy), dtype="float32")
    return store_bytes(header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="60,2000,5000", help="image counts, multiples of 10")
    parser.add_argument("--work", type=Path, default=None, help="folder for images, model and stores (kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-load", type=float, default=1.2)
    parser.add_argument("--force", action="store_true", help="time even when the machine is busy")
    parser.add_argument("--skip-audit", action="store_true",
                        help="reuse the stores of an earlier run in --work (and skip the forward baseline)")
    args = parser.parse_args()
    if not CIFAR.is_dir():
        raise SystemExit(f"{CIFAR} is absent: the benchmark needs the shared CIFAR-10 images")
    load = _load()
    quiet = load < args.max_load
    if not (quiet or args.force):
        raise SystemExit(f"load average {load:.2f} is above {args.max_load}: times would not be comparable "
                         "(--force to measure anyway: memory and disk stay valid)")
    print(f"load average {load:.2f}" + ("" if quiet else f", above {args.max_load}: times are not comparable"))
    work = args.work or Path(tempfile.mkdtemp(prefix="resdyn-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    model = _model(work)
    python = sys.executable
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = _images(work / f"images-{n}", n // 10)
        cache = work / f"cache-{n}"
        cache.mkdir(exist_ok=True)
        audit_s = audit_mib = float("nan")
        if not args.skip_audit:
            audit_s, audit_mib, _ = _measure(
                [python, "-m", "auditor", "audit", model, "--data", data, "--preset", "imagenet", "--cache", cache,
                 "--format", "json", "-o", work / f"audit-{n}.json", "--no-progress"], args.threads)
        (store,) = sorted(cache.glob("*.h5"))
        angles_s, angles_mib, _ = _measure(
            [python, "-m", "auditor", "angles", store, "--format", "json", "-o", work / f"angles-{n}.json",
             "--no-progress"], args.threads)
        forward_s = float("nan")
        if not args.skip_audit:  # the forward pass is the audit's baseline only
            _, _, out = _measure(
                [python, "-c", _FORWARD.format(threads=args.threads, model=str(model), data=str(data))], args.threads)
            forward_s = float(out.split("SECONDS")[1].split()[0])
        _, _, out = _measure([python, "-c", _READ_GRAM.format(threads=args.threads, store=str(store))], args.threads)
        floor_s, read_s = float(out.split("SECONDS")[1].split()[0]), float(out.split("READ")[1].split()[0])
        gram32_s = float(out.split("GRAM32")[1].split()[0])
        rows.append(dict(images=n, audit_s=audit_s, forward_s=forward_s, audit_mib=audit_mib, angles_s=angles_s,
                         read_gram_s=floor_s, read_s=read_s, read_gram32_s=read_s + gram32_s, angles_mib=angles_mib, disk=store.stat().st_size,
                         estimate=_estimate(model, data)))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'images':>7} {'audit s':>9} {'x fwd':>6} {'peak MiB':>9} {'angles s':>9} {'x read+gram':>11} "
          f"{'x read+gram32':>13} {'peak MiB':>9} {'disk GB':>8} {'estimate':>9}")
    for r in rows:
        print(f"{r['images']:>7} {r['audit_s']:9.1f} {r['audit_s'] / r['forward_s']:6.2f} {r['audit_mib']:9.0f} "
              f"{r['angles_s']:9.1f} {r['angles_s'] / r['read_gram_s']:11.2f} "
              f"{r['angles_s'] / r['read_gram32_s']:13.2f} {r['angles_mib']:9.0f} "
              f"{r['disk'] / 1e9:8.2f} {r['estimate'] / r['disk']:8.3f}x")
    if not quiet:
        print(f"(times taken at a load average of {load:.2f} and more: not comparable)")
    print(f"kept in {work}")


if __name__ == "__main__":
    main()
