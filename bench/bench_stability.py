"""Benchmark: the stability phase (``measure_stability``) against a bare forward pass.

Same images on both sides, in the same process:

* baseline: ``model(x)`` over the images in batches of 32 under ``torch.inference_mode()``
  (float32), i.e. what the network itself costs;
* resdyn: :func:`auditor.analysis.stability.measure_stability` with the audit's defaults
  (eps 1e-3, 4 directions, power iterations, seed 0), without kappa bounds (the shares
  are then null; they are a pure function of ``r`` and kappa, and kappa comes from
  the conditioning phase, timed elsewhere).

The images are picked as ``resdyn audit`` picks them: ``open_images`` with the given
classes / per-class / preset, then ``sample_images(images, samples, seed)``.

``--save FILE`` writes the report (with the per-run ratios) as JSON; ``--reference FILE``
compares this run with a saved one: per block the relative difference of r min / median /
max and of the worst gain, against the issue's tolerances (5 % and 15 %).

Usage::

    # today's float64 path as the reference, then the default, compared
    python bench/bench_stability.py --dtype float64 --save /tmp/ref50.json
    python bench/bench_stability.py --reference /tmp/ref50.json
    # the CIFAR ResNet-20 at 32 px
    python bench/bench_stability.py --checkpoint ../shared/data/checkpoints/cifar10-resnet20-akamaster.safetensors \\
        --preset cifar10 --classes "" --per-class 20 --save /tmp/ref20.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = REPO / ".." / "shared" / "data"

R_TOLERANCE = 0.05
GAIN_TOLERANCE = 0.15


def _compare(report: dict, reference: dict) -> bool:
    """Print per-block relative differences; True when every one is inside the tolerances."""
    ok = True
    worst = {"r": 0.0, "gain": 0.0}
    print(f"{'block':<12} {'r_min':>8} {'r_med':>8} {'r_max':>8} {'gain':>8}  (relative difference to the reference)")
    for got, want in zip(report["blocks"], reference["blocks"], strict=True):
        assert got["name"] == want["name"], (got["name"], want["name"])
        row = []
        for key, kind in (("r_min", "r"), ("r_median", "r"), ("r_max", "r"), ("worst_gain", "gain")):
            a, b = got[key], want[key]
            if a is None or b is None:
                rel = 0.0 if a is b else float("inf")
            else:
                rel = abs(a - b) / abs(b)
            worst[kind] = max(worst[kind], rel)
            row.append(rel)
        print(f"{got['name']:<12} " + " ".join(f"{100 * v:7.3f}%" for v in row))
    ok = worst["r"] <= R_TOLERANCE and worst["gain"] <= GAIN_TOLERANCE
    print(
        f"largest difference: r statistics {100 * worst['r']:.3f} % (tolerance {100 * R_TOLERANCE:.0f} %), "
        f"worst gain {100 * worst['gain']:.3f} % (tolerance {100 * GAIN_TOLERANCE:.0f} %): "
        + ("PASS" if ok else "FAIL")
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="default: a seeded torchvision resnet50 (bench_condition.py's), saved in a temp folder")
    parser.add_argument("--data", type=Path, default=SHARED / "images" / "cifar10-test-200")
    parser.add_argument("--classes", default="airplane,automobile,dog", help="comma-separated; empty: all")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--preset", default="imagenet")
    parser.add_argument("--samples", type=int, default=32, help="images measured (the audit's --samples)")
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--power-iterations", type=int, default=None, help="default: the library's")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default: the library's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from auditor.runtime import keep_freed_memory

    keep_freed_memory()  # as the resdyn command does at start (auditor/runtime.py)

    from auditor.analysis.stability import measure_stability
    from auditor.tasks.images import open_images, sample_images
    from auditor.subject import open_subject

    if args.checkpoint is None:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_condition import _save

        args.checkpoint = _save("resnet50", Path(tempfile.mkdtemp()))
    subject = open_subject(args.checkpoint)
    classes = [c for c in args.classes.split(",") if c] or None
    images = open_images(args.data, subject, preset=args.preset, classes=classes, per_class=args.per_class)
    batch = sample_images(images, args.samples, 0).images
    model = subject.loaded.model.eval()
    print(f"{subject.loaded.arch} at {tuple(batch.shape[1:])}: {len(batch)} images, "
          f"{len(subject.anatomy.blocks)} blocks, {torch.get_num_threads()} threads")

    # Baseline: a bare forward pass over the same images (warm once, then timed).
    with torch.inference_mode():
        model(batch[:2])
        start = time.perf_counter()
        for chunk in batch.split(32):
            model(chunk)
        forward = time.perf_counter() - start
    rss_baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    kwargs = {"directions": args.directions}
    if args.power_iterations is not None:
        kwargs["power_iterations"] = args.power_iterations
    if args.dtype is not None:
        kwargs["dtype"] = getattr(torch, args.dtype)
    marks = [time.perf_counter()]
    start = marks[0]
    report = measure_stability(model, subject.anatomy, batch, progress=lambda d, t: marks.append(time.perf_counter()), **kwargs)
    total = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    names = [b.name for b in report.blocks] + ["trajectory"]
    for name, (a, b) in zip(names, zip(marks, marks[1:])):
        print(f"  {name:<14} {b - a:8.2f} s")
    print(f"stability ({report.dtype}, power iterations <= {report.power_iterations}): {total:.2f} s")
    print(f"baseline: bare forward pass over the same {len(batch)} images: {forward:.3f} s")
    print(f"ratio stability / forward: {total / forward:.1f}x")
    print(f"peak RSS: {rss:.0f} MiB (after the baseline: {rss_baseline:.0f} MiB)")

    document = report.to_dict()
    document["blocks"] = [b.to_dict(include_ratios=True) for b in report.blocks]
    document["seconds"] = total
    if args.save:
        args.save.write_text(json.dumps(document, indent=1, allow_nan=False))
        print(f"wrote {args.save}")
    if args.reference:
        return 0 if _compare(document, json.loads(args.reference.read_text())) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
