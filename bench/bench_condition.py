"""Benchmark: ``resdyn condition`` on the paper's ImageNet ResNets vs WeightWatcher, whole processes.

Run by hand (not part of the tests)::

    python bench/bench_condition.py                      # resnet18/34/50/101, 224 px
    python bench/bench_condition.py --models resnet50 --repeat 3
    python bench/bench_condition.py --cifar-only         # ResNet-56: fast extremes vs full spectra
    python bench/bench_condition.py --models resnet50 --audit   # and the whole audit vs its baseline

For each torchvision architecture, a randomly initialised model (seed 0) whose
BatchNorm statistics are drawn away from the identity (so folding matters, as
in a trained network) is saved as safetensors in a temporary folder. Then, in
the same run, interleaved, each in its own fresh process:

- ``resdyn condition MODEL --format json -o OUT`` (every layer and every block,
  circular boundary, BN folded, 224 px): the command a user runs;
- the baseline: a process that builds the same torchvision model from the same
  file and runs ``weightwatcher.WeightWatcher(model=model).analyze()``.

Wall time (best of ``--repeat``) and peak RSS of each process are printed with
their ratio. Goal (issue 11): resnet50 <= 1.0x in time, <= 1.5x in memory.
Without weightwatcher installed (``pip install -e .[bench]``) only resdyn's
side is timed.

``--cifar-only`` (and the last line of a default run): the real CIFAR ResNet-56
(``../shared/data``), in one process, block conditioning by the fast extremes
against the full per-frequency spectra (``full_spectra=True``, the reference
path): the CIFAR networks must not get slower, and the two must agree.

``--audit``: ``resdyn audit`` of the resnet50 on 3 classes x 20 CIFAR images at
224 px (``--preset imagenet``), whole process, against one process that runs
WeightWatcher's ``analyze()`` and a bare forward pass over the same 60 images
(issue 11's baseline; goal <= 3.0x time, <= 2.0x memory).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

_MEASURE = """
import resource, sys, time
start = time.perf_counter()
code = 0
try:
    {body}
except SystemExit as stop:
    code = stop.code or 0
print("BENCH", time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code,
      file=sys.stderr)
"""

_RESDYN = """from auditor.cli import main
    sys.argv = ["resdyn", "condition", {model!r}, "--format", "json", "-o", {out!r}, "--no-progress"]
    main()"""

_WEIGHTWATCHER = """import torch, torchvision, weightwatcher
    from safetensors.torch import load_file
    torch.set_num_threads(2)
    model = torchvision.models.{arch}(weights=None)
    model.load_state_dict(load_file({model!r}))
    weightwatcher.WeightWatcher(model=model.eval()).analyze()"""


_AUDIT = """from auditor.cli import main
    sys.argv = ["resdyn", "audit", {model!r}, "--data", {data!r}, "--classes", {classes!r}, "--per-class", "20",
                "--preset", "imagenet", "--format", "json", "-o", {out!r}, "--no-progress"]
    main()"""

_AUDIT_BASELINE = """import torch, torchvision, weightwatcher
    from safetensors.torch import load_file
    from auditor.tasks.images import open_images
    from auditor.subject import open_subject
    torch.set_num_threads(2)
    model = torchvision.models.{arch}(weights=None)
    model.load_state_dict(load_file({model!r}))
    weightwatcher.WeightWatcher(model=model.eval()).analyze()
    images = open_images({data!r}, open_subject({model!r}), preset="imagenet", classes={classes!r}.split(","),
                         per_class=20)
    batch = torch.stack([images.dataset[i][0] for i in range(len(images.dataset))])
    with torch.inference_mode():
        for chunk in batch.split(32):
            model(chunk)"""


def _save(arch: str, folder: Path) -> Path:
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"arch": arch})
    return path


def _run(body: str) -> tuple[float, float]:
    """Wall seconds (measured inside the child, from interpreter start of the body) and peak RSS in MiB."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE.format(body=body)], capture_output=True, text=True,
                          cwd=ROOT)
    wall = time.perf_counter() - start
    line = next((x for x in done.stderr.splitlines() if x.startswith("BENCH")), None)
    if line is None or done.returncode:
        raise SystemExit(f"benchmark child failed:\n{done.stderr[-2000:]}")
    _, _, rss, code = line.split()
    if int(code):
        raise SystemExit(f"benchmark child exited {code}:\n{done.stderr[-2000:]}")
    return wall, int(rss) / 1024


def _has_weightwatcher() -> bool:
    try:
        import weightwatcher  # noqa: F401
    except ImportError:
        return False
    return True


def _imagenet(models: list[str], repeat: int) -> None:
    baseline = _has_weightwatcher()
    print(f"{'model':<10} {'resdyn s':>9} {'MiB':>6} {'WW s':>7} {'MiB':>6} {'time x':>7} {'mem x':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch in models:
            model = _save(arch, folder)
            out = folder / f"{arch}.json"
            ours, theirs = [], []
            for _ in range(repeat):  # interleaved, so drifts of the machine hit both sides
                ours.append(_run(_RESDYN.format(model=str(model), out=str(out))))
                if baseline:
                    theirs.append(_run(_WEIGHTWATCHER.format(arch=arch, model=str(model))))
            ours_t, ours_m = min(t for t, _ in ours), max(m for _, m in ours)
            if not baseline:
                print(f"{arch:<10} {ours_t:9.2f} {ours_m:6.0f}   (weightwatcher not installed)")
                continue
            ww_t, ww_m = min(t for t, _ in theirs), max(m for _, m in theirs)
            print(f"{arch:<10} {ours_t:9.2f} {ours_m:6.0f} {ww_t:7.2f} {ww_m:6.0f} {ours_t / ww_t:7.2f} "
                  f"{ours_m / ww_m:6.2f}")
            blocks = json.loads(out.read_text())["blocks"]
            methods = sorted({b.get("linear_method", {}).get("residual", "-").split(";")[0] for b in blocks})
            print(f"{'':<10} {len(blocks)} blocks; residual sigma_max by: {', '.join(methods)}")


def _cifar() -> None:
    import torch

    from auditor.tasks.condition import condition
    from auditor.subject import open_subject

    checkpoint = SHARED / "checkpoints" / "cifar10-resnet56-akamaster.th"
    if not checkpoint.exists():
        print(f"(no {checkpoint}: CIFAR comparison skipped)")
        return
    torch.set_num_threads(2)
    subject = open_subject(checkpoint)
    times, reports = {}, {}
    for full in (True, False, True, False):
        start = time.perf_counter()
        reports[full] = condition(subject, full_spectra=full)
        times[full] = min(times.get(full, float("inf")), time.perf_counter() - start)
    worst = 0.0
    for a, b in zip(reports[False].blocks, reports[True].blocks):
        for key in ("kappa_linear_residual", "kappa_linear_plain"):
            x, y = getattr(a, key), getattr(b, key)
            if x is not None and y is not None:
                worst = max(worst, abs(x - y) / y)
            elif (x is None) != (y is None):
                worst = float("inf")
    print(f"CIFAR ResNet-56 condition (in process, best of 2): fast extremes {times[False]:.2f} s, "
          f"full spectra {times[True]:.2f} s, ratio {times[False] / times[True]:.2f}; "
          f"largest relative kappa difference {worst:.1e}")


def _audit(arch: str, data: Path, classes: str) -> None:
    """The whole ``resdyn audit`` against WeightWatcher + a bare forward over the same 60 images, one process each."""
    with tempfile.TemporaryDirectory() as tmp:
        model = _save(arch, Path(tmp))
        out = Path(tmp) / "audit.json"
        ours = _run(_AUDIT.format(model=str(model), data=str(data), classes=classes, out=str(out)))
        theirs = _run(_AUDIT_BASELINE.format(arch=arch, model=str(model), data=str(data), classes=classes))
    print(f"audit {arch}, 3 classes x 20 images at 224 px: resdyn {ours[0]:.1f} s / {ours[1]:.0f} MiB; "
          f"WeightWatcher + bare forward {theirs[0]:.1f} s / {theirs[1]:.0f} MiB; "
          f"ratio {ours[0] / theirs[0]:.2f}x time, {ours[1] / theirs[1]:.2f}x memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet34,resnet50,resnet101")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cifar-only", action="store_true")
    parser.add_argument("--audit", action="store_true", help="also the whole audit of resnet50 against its baseline")
    parser.add_argument("--data", type=Path, default=SHARED / "images" / "cifar10-test-200")
    parser.add_argument("--classes", default="airplane,automobile,dog", help="three classes with 20 images each")
    args = parser.parse_args()
    if not args.cifar_only:
        _imagenet(args.models.split(","), args.repeat)
    _cifar()
    if args.audit:
        _audit("resnet50", args.data, args.classes)


if __name__ == "__main__":
    main()
