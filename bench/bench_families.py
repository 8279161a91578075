"""Benchmark: ``resdyn condition`` on today's residual families against ResNet-50, whole processes.

Run by hand (not part of the tests)::

    python bench/bench_families.py                 # convnext_tiny, efficientnet_b0, regnet_y_400mf vs resnet50
    python bench/bench_families.py --repeat 3 --models convnext_tiny

Each torchvision model is built with seed 0, its BatchNorm statistics drawn
away from the identity, and saved as safetensors (``bench_condition._save``).
Then, interleaved, each in its own fresh process, ``resdyn condition MODEL
--format json`` at 224 px (every layer and every block, circular boundary).
The baseline is ResNet-50's condition in the same run; the goal (issue 22) is
at most 2.0x its time for ConvNeXt-T, EfficientNet-B0 and RegNetY-400MF.
Printed: best wall time of ``--repeat``, peak RSS, the ratio to ResNet-50, and
how each family's blocks were computed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_condition import _RESDYN, _run, _save  # noqa: E402  (a sibling script)

BASELINE = "resnet50"
FAMILIES = ["convnext_tiny", "efficientnet_b0", "regnet_y_400mf"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=FAMILIES)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = [BASELINE, *args.models]
        paths = {name: _save(name, folder) for name in names}
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeat):  # interleaved, so drifts of the machine hit every model
            for name in names:
                wall, rss = _run(_RESDYN.format(model=str(paths[name]), out=str(folder / f"{name}.json")))
                old = best.get(name)
                best[name] = (min(wall, old[0]) if old else wall, max(rss, old[1]) if old else rss)
        base = best[BASELINE][0]
        print(f"{'model':<16} {'condition s':>11} {'MiB':>6} {'x resnet50':>10}  blocks")
        for name in names:
            wall, rss = best[name]
            blocks = json.loads((folder / f"{name}.json").read_text())["blocks"]
            methods = sorted({b.get("linear_method", {}).get("residual", "-").split(";")[0] for b in blocks})
            print(f"{name:<16} {wall:11.2f} {rss:6.0f} {wall / base:10.2f}  {len(blocks)} ({', '.join(methods)})")


if __name__ == "__main__":
    main()
