"""Benchmark: exact operator spectra of every layer of ResNet-50 vs WeightWatcher.

Run by hand (not part of the tests)::

    python bench/bench_spectra.py            # 3 repeats of each side
    python bench/bench_spectra.py --repeat 1 --no-ww

resdyn side: all singular values (circular boundary, exact, float64) of every
Conv2d of a randomly initialised torchvision ResNet-50 in eval mode, BatchNorm
folded, at 224x224, plus the final Linear layer (WeightWatcher analyses it too).
Input shapes come from forward pre-hooks on a zero input.

Baseline, in the same run: ``weightwatcher.WeightWatcher(model=model).analyze()``
(per-slice SVDs of every kernel, plus its power-law fits). Without
weightwatcher installed, the baseline is the work it represents: the SVD of
every (C_out x C_in) kernel slice and of the Linear weight.

Each side runs in its own subprocess so its peak RSS is its own; wall times
are the minimum and median over ``--repeat`` interleaved runs. Torch uses 2
threads. WeightWatcher is timed twice: as installed (its BLAS picks its own
thread count) and with BLAS limited to one thread (threadpoolctl), because on a
machine shared with other jobs a multi-threaded BLAS can run many times slower;
the load average is printed with the results.
The LAPACK floor, in the same run: ``numpy.linalg.eigvalsh`` alone on random
complex Hermitian matrices of exactly the sizes and counts of resdyn's
per-frequency Gram matrices, on the same worker threads: the time of the
eigenvalue step with every other cost (symbols, Gram matrices, sorting) at zero.
Accuracy: sigma_min and sigma_max of a few layers against an independent
float64 reference (``fft2`` of the zero-padded kernel, then an SVD of every
frequency matrix, no Gram matrix).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

THREADS = 2
CHECK_LAYERS = ("conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.1.conv2", "layer4.0.conv2", "layer4.2.conv2")


def _model():
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


def _operators(model):
    """ConvOperator of every Conv2d (BN folded) and the final Linear, in order."""
    import torch
    import torch.fx as fx
    from torch import nn

    from auditor.analysis.spectra import ConvOperator, linear_operator

    shapes, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:]))))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    bn_of = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            for user in node.users:
                if user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm2d):
                    bn_of[node.target] = modules[user.target]
    ops = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            bn = bn_of.get(name)
            scale = None if bn is None else (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
            ops.append(ConvOperator(module.weight.detach().double(), shapes[name], module.stride,
                                    module.padding, module.groups, scale, name))
        elif isinstance(module, nn.Linear):
            ops.append(linear_operator(module.weight.detach().double(), name))
    return ops


def _reference_extremes(op):
    """Independent float64 reference: fft2 of the padded polyphase kernel, SVD per frequency."""
    import torch

    torch.set_num_threads(1)  # after the timing: many small LAPACK calls

    from auditor.analysis.spectra import to_polyphase

    coarse = to_polyphase(op, op.stride)
    _, h, w = coarse.input_shape
    weight = coarse.scaled_weight().double()
    kh, kw = weight.shape[2:]
    ph, pw = coarse.padding
    padded = weight.new_zeros(*weight.shape[:2], h, w)
    for a in range(kh):
        for b in range(kw):
            padded[:, :, (a - ph) % h, (b - pw) % w] += weight[:, :, a, b]
    symbol = torch.fft.fft2(padded).permute(2, 3, 0, 1).reshape(h * w, *weight.shape[:2])
    sigma = torch.linalg.svdvals(symbol)
    return float(sigma.max()), float(sigma[:, -1].min())


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _part_resdyn() -> dict:
    import torch

    from auditor.analysis.spectra import conv_singular_values

    torch.set_num_threads(THREADS)
    ops = _operators(_model())
    start = time.perf_counter()
    cpu = time.process_time()
    spectra = {op.name: conv_singular_values(op) for op in ops}
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    rss = _peak_rss_mib()
    errors = {}
    for op in ops:
        if op.name in CHECK_LAYERS:
            ref_max, ref_min = _reference_extremes(op)
            values = spectra[op.name]
            errors[op.name] = {
                "sigma_max_rel_err": abs(values[0] - ref_max) / ref_max,
                "sigma_min_rel_err": abs(values[-1] - ref_min) / ref_min,
                "kappa": ref_max / ref_min,
            }
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss, "layers": len(ops),
            "values": int(sum(v.size for v in spectra.values())), "errors": errors}


def _part_ww(single_blas: bool) -> dict:
    import contextlib

    import torch

    torch.set_num_threads(THREADS)
    model = _model()
    try:
        import weightwatcher  # before the limits: it loads scipy's own BLAS
    except ImportError:
        weightwatcher = None
    limit = contextlib.nullcontext()
    if single_blas:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=1)  # every loaded BLAS and OpenMP
    start = time.perf_counter()
    cpu = time.process_time()
    if weightwatcher is not None:
        with limit:
            frame = weightwatcher.WeightWatcher(model=model).analyze()
        baseline, layers = f"weightwatcher {weightwatcher.__version__} analyze()", len(frame)
    else:  # the work WeightWatcher represents: an SVD per kernel slice
        layers = 0
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                weight = module.weight.detach().double()
                slices = weight.permute(2, 3, 0, 1).reshape(-1, *weight.shape[:2]) if weight.ndim == 4 else weight[None]
                torch.linalg.svdvals(slices)
                layers += 1
        baseline = "per-slice SVDs (weightwatcher not installed)"
    if single_blas:
        baseline += ", BLAS and OpenMP on 1 thread"
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "peak_rss_mib": _peak_rss_mib(), "layers": layers, "baseline": baseline}


def _eigen_problems(ops) -> dict[int, int]:
    """Size -> count of the Hermitian eigenvalue problems resdyn solves (one per
    half-plane frequency and group of each layer that is not a single tap)."""
    from auditor.analysis.frequencies import half_plane
    from auditor.analysis.spectra import to_polyphase

    problems: dict[int, int] = {}
    for op in ops:
        if op.kernel_size == (1, 1):
            continue
        coarse = to_polyphase(op, op.stride)
        c_out, c_in_g, kh, kw = coarse.weight.shape
        if kh * kw == 1:
            continue
        m = min(c_out // coarse.groups, c_in_g)
        _, h, w = coarse.input_shape
        problems[m] = problems.get(m, 0) + len(half_plane(h, w)[0]) * coarse.groups
    return problems


def _part_floor() -> dict:
    """The LAPACK floor: eigvalsh alone on random Hermitian matrices of the same
    sizes and counts as resdyn's per-frequency Gram matrices, on the same
    THREADS worker threads with BLAS on one thread each (resdyn's setting)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from auditor.analysis.batched import parallel_map

    ops = _operators(_model())
    problems = _eigen_problems(ops)
    rng = np.random.default_rng(0)
    batches = []
    for m, count in sorted(problems.items()):
        for start in range(0, count, 8):
            k = min(8, count - start)
            a = rng.standard_normal((k, m, m)) + 1j * rng.standard_normal((k, m, m))
            batches.append(a @ a.conj().transpose(0, 2, 1))
    batches.sort(key=lambda b: -b.shape[1])  # largest first balances the workers
    start = time.perf_counter()
    cpu = time.process_time()
    with threadpool_limits(limits=1, user_api="blas"):
        parallel_map(np.linalg.eigvalsh, batches, THREADS)
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "peak_rss_mib": _peak_rss_mib(), "layers": len(ops),
            "baseline": "LAPACK floor: eigvalsh alone on " + ", ".join(
                f"{count} x {m}x{m}" for m, count in sorted(problems.items())) + " complex Hermitian"}


def _run_part(part: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--part", part], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0]
    return result


def _summary(label: str, runs: list[dict]) -> None:
    wall = [r["wall_s"] for r in runs]
    print(f"{label:9s} wall min {min(wall):6.2f} s, median {statistics.median(wall):6.2f} s; "
          f"cpu median {statistics.median(r['cpu_s'] for r in runs):6.2f} s; "
          f"peak RSS {max(r['peak_rss_mib'] for r in runs):5.0f} MiB; "
          f"load avg {statistics.median(r['load'] for r in runs):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-ww", action="store_true", help="skip the baseline")
    parser.add_argument("--part", choices=("resdyn", "ww", "ww1", "floor"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        if args.part == "floor":
            result = _part_floor()
        else:
            result = _part_resdyn() if args.part == "resdyn" else _part_ww(single_blas=args.part == "ww1")
        print(json.dumps(result))
        return
    parts = ["resdyn", "floor"] if args.no_ww else ["resdyn", "ww", "ww1", "floor"]
    runs: dict[str, list[dict]] = {part: [] for part in parts}
    for _ in range(args.repeat):  # interleaved, so every side sees the same machine load
        for part in parts:
            runs[part].append(_run_part(part))
    ours = runs["resdyn"]
    print(f"command: python bench/bench_spectra.py --repeat {args.repeat}; torch threads {THREADS}, "
          f"{os.cpu_count()} CPUs")
    print(f"resdyn:   {ours[0]['layers']} layers, {ours[0]['values']:,} singular values (all, exact, float64)")
    _summary("resdyn", ours)
    for part in parts[1:]:
        print(f"baseline: {runs[part][0]['baseline']}, {runs[part][0]['layers']} layers")
        _summary(part, runs[part])
        wall, base = [r["wall_s"] for r in ours], [r["wall_s"] for r in runs[part]]
        print(f"          ratio resdyn / {part} (wall): min/min {min(wall) / min(base):.2f}, "
              f"median/median {statistics.median(wall) / statistics.median(base):.2f}")
    if "floor" in runs:
        floor = min(r["wall_s"] for r in runs["floor"])
        for part in parts[1:-1]:
            print(f"          LAPACK floor / {part} (wall, min/min): {floor / min(r['wall_s'] for r in runs[part]):.2f} "
                  "(no exact method built on dense eigenvalues can go below this ratio here)")
    print("accuracy vs an independent float64 reference (fft2 + SVD of every frequency matrix, no Gram):")
    for name, err in ours[0]["errors"].items():
        print(f"  {name:16s} kappa {err['kappa']:10.3g}  sigma_max rel err {err['sigma_max_rel_err']:.1e}  "
              f"sigma_min rel err {err['sigma_min_rel_err']:.1e}")
    worst = max(max(e["sigma_min_rel_err"], e["sigma_max_rel_err"]) for e in ours[0]["errors"].values())
    print(f"  max relative error of sigma_min / sigma_max: {worst:.1e}")


if __name__ == "__main__":
    main()
