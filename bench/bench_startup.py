"""Time the command line's start-up: help, usage errors and shell completion.

Baseline in the same run: a bare ``python -c "import typer, rich"`` process,
so every command reads as a multiple of what its two libraries cost (goal of
issue 12: at most 2x). Each command runs ``--repeat`` times, interleaved with
the others so that a busy machine slows every side alike; the best time
counts. The ``resdyn`` console script next to this interpreter is used (it
applies the runtime settings of :func:`auditor.cli.main`).

The last lines show what typer itself costs, whatever the program: a
two-command typer app printing its help and a command's help, and parsing one
option (typer 0.29 coerces every option value through pydantic, imported on
first use; its rich help imports typer.rich_utils, rich.markdown included).

Usage: python bench/bench_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "fixtures" / "resnet8-digits.safetensors"
GOAL = 2.0
_MINIMAL_APP = (
    "import typer\n"
    "app = typer.Typer()\n"
    "@app.command()\n"
    "def a(x: int = 1):\n"
    "    'A.'\n"
    "@app.command()\n"
    "def b(y: int = 2):\n"
    "    'B.'\n"
    "app()\n"
)


def _resdyn() -> list[str]:
    script = Path(sys.executable).parent / "resdyn"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from auditor.cli import main; sys.argv[0] = 'resdyn'; main()"]


def _cases() -> list[tuple[str, list[str], dict[str, str]]]:
    resdyn = _resdyn()
    completion = {"_RESDYN_COMPLETE": "complete_bash", "COMP_WORDS": "resdyn au", "COMP_CWORD": "1"}
    return [
        ("python -c 'import typer, rich'", [sys.executable, "-c", "import typer, rich"], {}),
        ("resdyn --help", [*resdyn, "--help"], {}),
        ("resdyn audit --help", [*resdyn, "audit", "--help"], {}),
        ("resdyn audit missing.safetensors", [*resdyn, "audit", "missing.safetensors"], {}),
        ("resdyn audit CKPT --fail-on garbage", [*resdyn, "audit", str(CHECKPOINT), "--fail-on", "garbage"], {}),
        ("resdyn audit --bogus", [*resdyn, "audit", "--bogus"], {}),
        ("completion 'resdyn au<TAB>'", resdyn, completion),
        ("(typer alone) minimal app --help", [sys.executable, "-c", _MINIMAL_APP, "--help"], {}),
        ("(typer alone) minimal app a --help", [sys.executable, "-c", _MINIMAL_APP, "a", "--help"], {}),
        ("(typer alone) minimal app a --x 3", [sys.executable, "-c", _MINIMAL_APP, "a", "--x", "3"], {}),
    ]


def _time(argv: list[str], extra_env: dict[str, str]) -> float:
    env = {**os.environ, **extra_env}
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="Runs per command; the best counts.")
    args = parser.parse_args()
    cases = _cases()
    best = {name: float("inf") for name, _, _ in cases}
    for _ in range(args.repeat):
        for name, argv, env in cases:
            best[name] = min(best[name], _time(argv, env))
    baseline = best[cases[0][0]]
    width = max(len(name) for name in best)
    print(f"best of {args.repeat}, {os.cpu_count()} CPUs, {sys.executable}")
    for name, seconds in best.items():
        ratio = seconds / baseline
        mark = "" if name == cases[0][0] or name.startswith("(") else ("  ok" if ratio <= GOAL else f"  over the {GOAL:g}x goal")
        print(f"  {name:<{width}}  {seconds:7.3f} s  {ratio:5.2f}x{mark}")


if __name__ == "__main__":
    main()
