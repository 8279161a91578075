"""Benchmark: ``resdyn condition --boundary zero`` against the circular default, whole processes.

Run by hand (not part of the tests)::

    python bench/bench_zero_blocks.py                    # the trained CIFAR ResNet-56, zero vs circular
    python bench/bench_zero_blocks.py --repeat 2
    python bench/bench_zero_blocks.py --imagenet resnet18 resnet50   # 224 px, zero only (must finish)
    python bench/bench_zero_blocks.py --operators layer1.1 layer2.1 layer3.1   # ResNet-56, in process, per operator

ResNet-56 (``../shared/data/checkpoints/cifar10-resnet56-akamaster.th``): both
commands in the same run, each in a fresh process (``--format json -o OUT``),
best of ``--repeat``; the wall times, their ratio (goal of issue 23: zero <= 5x
circular) and the load average before each run are printed (a busy machine
slows both, not always alike: time on a quiet one, load below 1.2).

``--imagenet``: a torchvision model (random init, seed 0, BatchNorm statistics
drawn away from the identity), saved as safetensors in a temporary folder, then
``resdyn condition --boundary zero`` on it at 224 px; prints the time and how
many blocks have a certified ``sigma_min`` and how many an interval.

``--operators``: ResNet-56's named blocks in this process, each operator (plain
branch, residual) on its own: wall and CPU seconds of
:func:`auditor.analysis.zero_block_extremes.zero_operator_extremes` (one
thread: CPU seconds are what a quiet machine's wall time would be), the
method and ``sigma_min``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESNET56 = ROOT.parent / "shared" / "data" / "checkpoints" / "cifar10-resnet56-akamaster.th"


def _condition(model: Path, out: Path, *extra: str) -> float:
    """Wall seconds of one ``resdyn condition`` process."""
    command = [sys.executable, "-m", "auditor", "condition", str(model), "--format", "json", "-o", str(out),
               "--no-progress", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _intervals(report: Path) -> tuple[int, int]:
    """Blocks whose residual (or plain) sigma_min is certified, and those with an interval."""
    blocks = json.loads(report.read_text())["blocks"]
    interval = sum(any(k.startswith("sigma_min_interval") for k in b) for b in blocks)
    return len(blocks) - interval, interval


def _cifar(repeat: int) -> None:
    best = {"circular": float("inf"), "zero": float("inf")}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeat):
            for boundary in ("circular", "zero"):
                load = os.getloadavg()[0]
                seconds = _condition(RESNET56, Path(folder) / f"{boundary}.json", "--boundary", boundary)
                print(f"resnet56 {boundary:8s} {seconds:8.1f} s   (load before: {load:.2f})", flush=True)
                best[boundary] = min(best[boundary], seconds)
        certified, interval = _intervals(Path(folder) / "zero.json")
    print(f"resnet56 zero / circular = {best['zero'] / best['circular']:.2f}x (goal <= 5x); "
          f"blocks certified {certified}, interval {interval}")


def _imagenet(models: list[str]) -> None:
    import torch
    import torchvision
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        for arch in models:
            torch.manual_seed(0)
            model = getattr(torchvision.models, arch)(weights=None).eval()
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_var.uniform_(0.5, 1.5)
                    module.running_mean.uniform_(-0.1, 0.1)
            path = Path(folder) / f"{arch}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            load = os.getloadavg()[0]
            out = Path(folder) / f"{arch}.json"
            seconds = _condition(path, out, "--boundary", "zero")
            certified, interval = _intervals(out)
            print(f"{arch} 224 px zero {seconds:8.1f} s (load before: {load:.2f}); blocks certified {certified}, "
                  f"interval {interval}", flush=True)


def _operators(names: list[str]) -> None:
    from auditor.analysis.zero_block_extremes import zero_operator_extremes
    from auditor.subject import open_subject
    from auditor.tasks.condition import block_operators

    subject = open_subject(RESNET56)
    modules = dict(subject.loaded.model.named_modules())
    total = 0.0
    for block in subject.anatomy.blocks:
        if names and block.name not in names:
            continue
        convs, shortcut = block_operators(modules, block)
        for part, name in ((None, "plain"), (shortcut, "residual")):
            load = os.getloadavg()[0]
            wall, cpu = time.perf_counter(), time.process_time()
            found = zero_operator_extremes(convs, part)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            total += cpu
            print(f"{block.name:9s} {name:8s} {tuple(convs[0].input_shape)}  wall {wall:6.2f} s  cpu {cpu:6.2f} s  "
                  f"(load before: {load:.2f})  sigma_min {found.sigma_min}  {found.method}", flush=True)
    print(f"cpu seconds in all: {total:.1f}")


def main() -> None:
    """Parse the options and run the benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--imagenet", nargs="*", metavar="ARCH", help="torchvision architectures at 224 px")
    parser.add_argument("--operators", nargs="*", metavar="BLOCK",
                        help="ResNet-56 blocks to time per operator in process (none named: every block)")
    args = parser.parse_args()
    if args.operators is not None:
        _operators(args.operators)
    elif args.imagenet:
        _imagenet(args.imagenet)
    else:
        _cifar(args.repeat)


if __name__ == "__main__":
    main()
