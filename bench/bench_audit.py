"""Time a full audit of the real ResNet-56 on the 200 CIFAR-10 images, phase by phase.

Baseline in the same run: one bare forward pass over the same images
(``model(x)`` under ``torch.inference_mode()``), so the audit's cost reads as a
multiple of what the network itself costs.

Usage: python bench/bench_audit.py [--checkpoint PATH] [--data DIR]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=SHARED / "checkpoints" / "cifar10-resnet56-akamaster.th")
    parser.add_argument("--data", type=Path, default=SHARED / "images" / "cifar10-test-200")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from auditor.tasks.audit import audit
    from auditor.tasks.images import open_images, sample_images
    from auditor.subject import open_subject

    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # akamaster's preprocessing
    start = time.perf_counter()
    report = audit(args.checkpoint, data=args.data, **imagenet)
    total = time.perf_counter() - start

    subject = open_subject(args.checkpoint)
    images = open_images(args.data, subject, **imagenet)
    batch = sample_images(images, len(images.dataset)).images
    start = time.perf_counter()
    with torch.inference_mode():
        for chunk in batch.split(32):
            subject.loaded.model(chunk)
    forward = time.perf_counter() - start

    print(f"full audit of {subject.loaded.arch} on {len(batch)} images: {total:.2f} s")
    for phase, seconds in report.timings.items():
        print(f"  {phase:<16} {seconds:8.2f} s  ({100 * seconds / total:5.1f} %)")
    print(f"baseline: bare forward pass over the same images: {forward:.3f} s")
    print(f"ratio audit / forward: {total / forward:.0f}x")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    from auditor.report.nonfinite import shown

    summary = report.document["summary"]
    print(f"blocks violating Lemma 1's lower bound: {summary['lemma1_lower_violations']} of {summary['blocks']}; "
          f"max exact kappa {shown(summary, 'max_kappa_linear_residual', lambda v: f'{v:.4g}', 'undefined')}")


if __name__ == "__main__":
    main()
