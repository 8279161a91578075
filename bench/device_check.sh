#!/usr/bin/env bash
# GPU check (issue 11): the resnet50 audit at 224 px with --device cuda equals the CPU report
# (1e-6 relative on conditioning, 5 % on stability statistics) and how long each took.
# Run by hand on a machine with a GPU, from the repository root, with resdyn installed
# (pip install -e .): bash bench/device_check.sh [DATA_DIR]. A few minutes; never part of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/images/cifar10-test-200}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
python - "$OUT" <<'EOF'
import sys, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
sys.argv[1:] = [sys.argv[1]]
sys.path.insert(0, "bench")
from pathlib import Path
from bench_condition import _save
_save("resnet50", Path(sys.argv[1]))
EOF
MODEL="$OUT/resnet50.safetensors"
ARGS=(--data "$DATA" --classes airplane,automobile,dog --per-class 20 --preset imagenet --format json --no-progress)
for device in cuda cpu; do
  start=$(date +%s.%N)
  resdyn audit "$MODEL" "${ARGS[@]}" --device "$device" -o "$OUT/audit-$device.json"
  end=$(date +%s.%N)
  echo "audit --device $device: $(python -c "print(f'{$end - $start:.1f}')") s"
done
python - "$OUT/audit-cuda.json" "$OUT/audit-cpu.json" <<'EOF'
import json, math, sys
gpu, cpu = (json.load(open(p)) for p in sys.argv[1:3])
bad = []
def rel(a, b):
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b) / max(abs(b), 1e-300)
for a, b in zip(gpu["layers"], cpu["layers"]):
    for key in ("sigma_max", "sigma_min", "kappa"):
        if rel(a[key], b[key]) > 1e-6:
            bad.append(("layer", a["name"], key, a[key], b[key]))
for a, b in zip(gpu["blocks"], cpu["blocks"]):
    for key in ("kappa_paper_residual", "kappa_paper_plain", "kappa_linear_residual", "kappa_linear_plain",
                "lemma1_upper_holds", "lemma1_lower_holds"):
        x, y = a.get(key), b.get(key)
        if (rel(x, y) > 1e-6) if not isinstance(y, bool) else x != y:
            bad.append(("block", a["name"], key, x, y))
for a, b in zip(gpu["stability"]["blocks"], cpu["stability"]["blocks"]):
    for key, value in b.items():
        if isinstance(value, float) and rel(a.get(key), value) > 0.05:
            bad.append(("stability", b["name"], key, a.get(key), value))
for entry in bad:
    print("MISMATCH", *entry)
print("device check:", "FAILED" if bad else "cuda report equals the cpu report (1e-6 conditioning, 5 % stability)")
sys.exit(1 if bad else 0)
EOF
