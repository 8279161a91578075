"""Benchmark: median angles from an HDF5 stage vs. reading it and one bare Gram.

Run by hand (not part of the tests)::

    python bench/bench_angles.py                      # 3000 x (64, 40, 40), 10 classes
    python bench/bench_angles.py --n 600 --repeat 1   # quick look

What it does, in one run:

1. Writes a store like the activation store's stage datasets (float32,
   ``(N, C, H, W)``, chunked one sample per chunk) in a temporary directory.
2. Times, each in a fresh subprocess (so peak RSS is its own), alternating:
   (a) ``median_angles_h5`` on the dataset (``products="auto"``: float32 Gram
   tiles with a proven bound and the ambiguous pairs recomputed in float64,
   exact medians over all N (N - 1) / 2 pairs), (b) the baseline: read the
   whole dataset into memory and one bare ``X @ X.T`` in torch float32, and
   (c) ``median_angles_h5`` with ``products="float64"`` (float64 Gram tiles).
   Prints the times, the ratios and the peak RSS of each.
3. Accuracy: on the first ``--accuracy-n`` samples, the medians from a bare
   float32 and float64 Gram (arccos, no atan2 refinement) and from
   ``products="float32"`` against ``median_angles`` with float64 products: a
   bare float32 Gram is off by up to 1e-5 degrees, hence the bound and the
   float64 repair.
4. Out of core: ``median_angles`` with a small ``--ooc-block-rows`` on the
   first N/2 and on all N samples, peak RSS above a bare import of each.

Both sides use ``torch.set_num_threads(--threads)`` (default 2). The store is
read from the page cache right after it is written (both sides alike).
Timings on a shared machine are noisy: the load average is printed; use
``--repeat`` and read the minimum.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _peak_rss_mib() -> float:
    """Peak resident memory of this process image, MiB.

    ``VmHWM`` of the current address space: unlike ``getrusage().ru_maxrss``
    it is not inherited from the parent across fork + exec (Linux keeps the
    parent's high-water mark in ru_maxrss of a freshly exec'd child).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# --------------------------------------------------------------------------- children


class _Head:
    """The first ``n`` rows of a dataset, read lazily (for the out-of-core demo)."""

    def __init__(self, dataset, n: int) -> None:
        self._ds = dataset
        self.shape = (n, *dataset.shape[1:])
        self.dtype = dataset.dtype
        self.chunks = dataset.chunks
        self.name = dataset.name

    def read_direct(self, dest, source_sel, dest_sel) -> None:
        self._ds.read_direct(dest, source_sel, dest_sel)

    def __getitem__(self, key):
        return self._ds[key]


def _child(args: argparse.Namespace) -> None:
    import h5py
    import torch

    torch.set_num_threads(args.threads)
    from auditor.analysis.angles import median_angles, median_angles_h5

    out: dict = {"rss_start_mib": _peak_rss_mib()}
    with h5py.File(args.path, "r") as f:
        ds = f["stages/layer1"]
        labels = f["samples/label"][()]
        names = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
        if args.child == "import":
            pass
        elif args.child == "baseline":
            t0 = time.perf_counter()
            x = np.empty(ds.shape, dtype=ds.dtype)
            ds.read_direct(x)
            t1 = time.perf_counter()
            xt = torch.from_numpy(x.reshape(x.shape[0], -1))
            g = xt @ xt.T
            t2 = time.perf_counter()
            out.update(read_s=t1 - t0, gemm_s=t2 - t1, seconds=t2 - t0, check=float(g[0, 0]))
        elif args.child in ("ours", "ours64"):
            t0 = time.perf_counter()
            r = median_angles_h5(ds, labels, names, block_rows=args.block_rows,
                                 products="float64" if args.child == "ours64" else "auto")
            out.update(seconds=time.perf_counter() - t0, separation=r.separation,
                       intra=r.intra, inter_first=next(iter(r.inter.items())))
        elif args.child == "ooc":
            n = args.rows
            t0 = time.perf_counter()
            r = median_angles(_Head(ds, n), labels[:n], names, block_rows=args.block_rows)
            out.update(seconds=time.perf_counter() - t0, rows=n, separation=r.separation)
    out["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(out))


def _run_child(kind: str, path: Path, args: argparse.Namespace, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path),
           "--threads", str(args.threads)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"child {kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- parent


def _write_store(path: Path, n: int, n_classes: int, shape: tuple[int, ...], seed: int) -> None:
    """Class-structured ReLU activations: relu(class mean + noise), float32."""
    import h5py

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    means = rng.standard_normal((n_classes, *shape), dtype=np.float32) * 0.7
    with h5py.File(path, "w") as f:
        names = np.array([f"class{c}" for c in range(n_classes)], dtype="S")
        f.create_dataset("classes", data=names)
        f.create_dataset("samples/label", data=labels.astype(np.int64))
        ds = f.create_dataset("stages/layer1", shape=(n, *shape), dtype=np.float32,
                              chunks=(1, *shape))
        step = 64
        for s in range(0, n, step):
            e = min(n, s + step)
            x = rng.standard_normal((e - s, *shape), dtype=np.float32)
            x += means[labels[s:e]]
            np.maximum(x, 0.0, out=x)
            ds[s:e] = x


def _accuracy(path: Path, m: int, threads: int) -> dict:
    """Max |median - median_angles| over classes and pairs for float32 / float64 Grams."""
    import h5py
    import torch

    from auditor.analysis.angles import median_angles

    torch.set_num_threads(threads)
    with h5py.File(path, "r") as f:
        x = f["stages/layer1"][:m]
        labels = f["samples/label"][:m]
        names = [c.decode() for c in f["classes"][()]]
    exact = median_angles(x, labels, names, products="float64")
    flat = x.reshape(m, -1)
    worst = {}
    ours = median_angles(x, labels, names, products="float32")
    worst["products='float32' (repaired)"] = max(
        [abs(ours.intra[k] - v) for k, v in exact.intra.items() if v is not None]
        + [abs(ours.inter[k] - v) for k, v in exact.inter.items() if v is not None])
    for dtype in (torch.float32, torch.float64):
        u = torch.from_numpy(flat).to(dtype)
        u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
        g = (u @ u.T).double().numpy()
        ang = np.degrees(np.arccos(np.clip(g, -1, 1)))
        err = 0.0
        for c, a in enumerate(names):
            ic = np.flatnonzero(labels == c)
            vals = ang[np.ix_(ic, ic)][np.triu_indices(ic.size, 1)]
            err = max(err, abs(np.median(vals) - exact.intra[a]))
            for d in range(c + 1, len(names)):
                idd = np.flatnonzero(labels == d)
                vals = ang[np.ix_(ic, idd)].ravel()
                err = max(err, abs(np.median(vals) - exact.inter[f"{a}|{names[d]}"]))
        worst[str(dtype).replace("torch.", "") + " Gram + arccos"] = err
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--shape", type=int, nargs="+", default=[64, 40, 40])
    p.add_argument("--block-rows", type=int, default=1024)
    p.add_argument("--ooc-block-rows", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="timing runs of each; 0 skips them")
    p.add_argument("--accuracy-n", type=int, default=600)
    p.add_argument("--skip-ooc", action="store_true")
    p.add_argument("--dir", type=Path, default=None, help="where to write the store (temp dir)")
    # internal: child processes
    p.add_argument("--child", choices=["import", "baseline", "ours", "ours64", "ooc"], help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return

    shape = tuple(args.shape)
    d = int(np.prod(shape))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "store.h5"
        t0 = time.perf_counter()
        _write_store(path, args.n, args.classes, shape, seed=0)
        gib = args.n * d * 4 / 2**30
        print(f"store: {args.n} samples x {shape} float32 (D = {d}), {args.classes} classes, "
              f"{gib:.2f} GiB, chunks (1, {', '.join(map(str, shape))}); "
              f"written in {time.perf_counter() - t0:.1f} s")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"torch threads {args.threads}")

        base = _run_child("import", path, args)
        print(f"bare import (torch, h5py, auditor): peak RSS {base['peak_rss_mib']:.0f} MiB")

        runs: dict[str, list[dict]] = {"baseline": [], "ours": [], "ours64": []}
        for i in range(args.repeat):
            for kind in ("baseline", "ours", "ours64"):
                r = _run_child(kind, path, args, block_rows=args.block_rows)
                runs[kind].append(r)
                extra = (f" (read {r['read_s']:.2f} s + float32 GEMM {r['gemm_s']:.2f} s)"
                         if kind == "baseline" else "")
                print(f"  run {i + 1} {kind:8s}: {r['seconds']:7.2f} s{extra}, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB  "
                      f"(load {os.getloadavg()[0]:.1f})")
        if args.repeat:
            tb = min(r["seconds"] for r in runs["baseline"])
            to = min(r["seconds"] for r in runs["ours"])
            print(f"(a) median_angles_h5, block_rows={args.block_rows}: {to:.2f} s "
                  f"(best of {args.repeat})")
            print(f"(b) baseline read + torch X @ X.T (float32): {tb:.2f} s "
                  f"(best of {args.repeat})")
            t64 = min(r["seconds"] for r in runs["ours64"])
            print(f"(c) median_angles_h5, products='float64': {t64:.2f} s (best of {args.repeat})")
            print(f"ratio (a)/(b) = {to / tb:.2f}  (goal <= 1.3); (c)/(a) = {t64 / to:.2f}")
            print(f"peak RSS: (a) {max(r['peak_rss_mib'] for r in runs['ours']):.0f} MiB, "
                  f"(b) {max(r['peak_rss_mib'] for r in runs['baseline']):.0f} MiB")

        if args.accuracy_n:
            m = min(args.accuracy_n, args.n)
            acc = _accuracy(path, m, args.threads)
            print(f"accuracy on {m} samples, max |median - median_angles| in degrees: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in acc.items()))

        if not args.skip_ooc:
            tiles = 8 * d * (args.ooc_block_rows + min(args.ooc_block_rows, 256)) / 2**20
            print(f"out of core, block_rows={args.ooc_block_rows} (tiles ~{tiles:.0f} MiB):")
            for n in (args.n // 2, args.n):
                r = _run_child("ooc", path, args, block_rows=args.ooc_block_rows, rows=n)
                print(f"  N = {n:5d}: {r['seconds']:7.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
                      f"(+{r['peak_rss_mib'] - base['peak_rss_mib']:.0f} over import; "
                      f"N*D*4 = {n * d * 4 / 2**20:.0f} MiB, "
                      f"pairs*8 = {n * (n - 1) / 2 * 8 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
