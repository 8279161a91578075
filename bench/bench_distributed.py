"""Benchmark: one command in one process and under ``torchrun`` with 2 processes.

For N = 1 (``python -m auditor ...``, torch's default threads) and N = 2
(``python -m torch.distributed.run --standalone --nproc-per-node 2 -m auditor ...``,
``cores / 2`` threads per rank) the same command runs ``--repeat`` times,
alternating; the best wall time of each is the headline (on a shared machine
noise only ever adds time), every run is printed too, and a third row runs one
process with one rank's threads (the same CPU per process as N = 2). Whether the
reports of N = 1 and N = 2 are equal (parsed JSON) is printed.

From the best N = 2 run, each rank's ledger (``RESDYN_DIST_LEDGER``, written
by :mod:`auditor.distributed`) gives per split phase the units it ran, its share
of the estimated cost, the seconds it worked and the seconds it waited for the
others; ``main_only`` phases are rank 0's alone (angles read from the store,
store writes). From those the expected speed-up on N GPUs is *estimated*, not
measured:

    T(N) = overhead + main_only + sum over phases of (phase work of all ranks) / min(N, units of the phase)

with ``overhead`` = the N = 2 wall time minus the slowest rank's split work and
rank 0's main-only work (start, loading the checkpoint on every rank, rendering,
collectives), assumed not to shrink with N; ``T(1)`` is the same model with all
the work on one rank. It assumes the units keep their relative costs on a GPU
and ignores load imbalance beyond the unit count.

Usage::

    python bench/bench_distributed.py                  # audit of the CIFAR ResNet-56 on 200 images
                                                       # (the bundled ResNet-8 on 300 digits without ../shared)
    python bench/bench_distributed.py --repeat 3 -- condition path/to/resnet50.safetensors
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
SHARED = ROOT.parent / "shared" / "data"
# the trained CIFAR ResNet-56 on 200 real CIFAR-10 images when ../shared/data has them, else the fixture
DEFAULT = (
    ["audit", str(SHARED / "checkpoints" / "cifar10-resnet56-akamaster.th"),
     "--data", str(SHARED / "images" / "cifar10-test-200")]
    if (SHARED / "checkpoints" / "cifar10-resnet56-akamaster.th").is_file()
    else ["audit", "fixtures/resnet8-digits.safetensors", "--data", "fixtures/digits"]
)


def _run(args: list[str], processes: int, ledger: Path | None, threads: int | None = None) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if processes == 1:
        command = [sys.executable, "-m", "auditor", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), "-m", "auditor", *args]
        env["RESDYN_DIST_LEDGER"] = str(ledger)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def _ledgers(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def _by_phase(entries: list[dict]) -> dict[str, dict]:
    """Entries of the same phase (the rounds of extract's batches) summed; cost share averaged."""
    phases: dict[str, dict] = {}
    for entry in entries:
        name = entry["phase"].replace("<locals>.", "")
        into = phases.setdefault(name, {"mine": 0, "units": 0, "work_s": 0.0, "wait_s": 0.0, "shares": [],
                                        "main_only": entry.get("main_only", False)})
        into["mine"] += entry["mine"]
        into["units"] += entry["units"]
        into["work_s"] += entry["work_s"]
        into["wait_s"] += entry.get("wait_s", 0.0)
        into["shares"].append(entry["cost_share"])
    for into in phases.values():
        shares = into.pop("shares")
        into["cost_share"] = sum(shares) / len(shares)
    return phases


def _estimate(wall2: float, ledgers: list[dict]) -> tuple[float, float, dict[str, tuple[float, int]]]:
    """(overhead, main-only seconds, phase -> (work seconds of all ranks, units of the phase))."""
    phases: dict[str, tuple[float, int]] = {}
    split_work = []
    main_only = 0.0
    for ledger in ledgers:
        mine = 0.0
        for name, entry in _by_phase(ledger["phases"]).items():
            if entry["main_only"]:
                main_only += entry["work_s"] if ledger["rank"] == 0 else 0.0
                continue
            mine += entry["work_s"]
            seconds, _ = phases.get(name, (0.0, 0))
            phases[name] = (seconds + entry["work_s"], entry["units"])
        split_work.append(mine)
    overhead = max(0.0, wall2 - max(split_work, default=0.0) - main_only)
    return overhead, main_only, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (best taken)")
    parser.add_argument("command", nargs="*", help="resdyn command and arguments (after --)")
    options = parser.parse_args()
    args = (options.command or DEFAULT) + ["--format", "json"]
    cores = len(os.sched_getaffinity(0))
    print(f"command: resdyn {' '.join(args)}\nmachine: {cores} cores; N = 2 runs with {max(1, cores // 2)} "
          "torch thread(s) per rank\n")
    share = max(1, cores // 2)
    configs = {"N=1": (1, None), "N=2": (2, None), f"N=1, {share} thread": (1, share)}
    walls: dict[str, list[float]] = {name: [] for name in configs}
    best_ledger: list[dict] = []
    reports = {}
    with tempfile.TemporaryDirectory(prefix="resdyn-bench-") as scratch:
        for attempt in range(options.repeat):
            for name, (processes, threads) in configs.items():
                ledger = Path(scratch, f"{processes}-{threads}-{attempt}")
                ledger.mkdir()
                wall, report = _run(args, processes, ledger, threads)
                reports[name] = report
                if processes == 2 and (not walls[name] or wall < min(walls[name])):
                    best_ledger = _ledgers(ledger)
                walls[name].append(wall)
                print(f"  {name:<14} run {attempt + 1}: {wall:6.1f} s", flush=True)
    if reports["N=1"] != reports["N=2"]:
        print("\nNOTE: the reports of 1 and 2 processes differ in the last digits (float64 products "
              "round by thread count: see docs/design.md, Scale, RESDYN_RANK_THREADS)")
    else:
        print("\nreports of N = 1 and N = 2 are equal (parsed JSON)")
    best1 = min(walls["N=1"])
    best2 = min(walls["N=2"])
    print(f"\n{'':<16} {'best wall s':>12} {'vs N=1':>7}   runs")
    for name, runs in walls.items():
        print(f"{name:<16} {min(runs):12.1f} {min(runs) / best1:7.2f}x   {' '.join(f'{w:.1f}' for w in runs)}")
    print("(the last row: one process with the threads of one rank, the same CPU per process as N=2)")

    print("\nN = 1: rank 0 does every unit of every phase (100 %).")
    print("N = 2, best run: each rank's share per phase (units, share of the estimated cost, work s, wait s)")
    for ledger in best_ledger:
        print(f"  rank {ledger['rank']}:")
        for name, entry in _by_phase(ledger["phases"]).items():
            tag = "  (rank 0 alone)" if entry.get("main_only") else ""
            print(f"    {name:<36} {entry['mine']:>4}/{entry['units']:<4} {100 * entry['cost_share']:5.1f} %"
                  f"  {entry['work_s']:7.2f} s  wait {entry['wait_s']:6.2f} s{tag}")
    overhead, main_only, phases = _estimate(best2, best_ledger)
    total_split = sum(seconds for seconds, _ in phases.values())
    print(f"\nestimate (model, not a measurement): overhead {overhead:.1f} s, rank-0-only {main_only:.1f} s, "
          f"split work {total_split:.1f} s in {len(phases)} phases")

    def model(n: int) -> float:
        return overhead + main_only + sum(seconds / min(n, units) for seconds, units in phases.values())

    for n in (2, 4, 8):
        print(f"  expected speed-up on {n} GPUs (one rank each): {model(1) / model(n):.2f}x")


if __name__ == "__main__":
    main()
