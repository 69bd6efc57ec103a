#!/usr/bin/env bash
# The smoke preset trained on wgpu (the cubecl stack CUDA shares: fusion, autotune, the same
# kernels; lavapipe on a CPU-only machine) and on flex with the same seed, and their reports
# compared. Too slow for CI on lavapipe (about 25 minutes), so run by hand:
#
#   scripts/wgpu-smoke.sh [OUT]        # default OUT: runs/wgpu-smoke; needs target/release/cmoe
#                                      # built with --features wgpu (the test build makes it)
#
# Prints both runs' accuracy rows, PTL location and experts per layer, and exits non-zero when
# a run fails. The backends draw different random numbers (probe and router columns, dropout),
# so PGKE's plans and PTL's confusion may differ; the accuracies should agree within the seeds'
# spread. docs/scale.md records the last result.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/wgpu-smoke}"
CMOE="${CMOE:-target/release/cmoe}"
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"
for backend in flex wgpu; do
  start=$SECONDS
  "$CMOE" train --backend "$backend" --preset smoke --runs "$OUT" --name "$backend" > "$OUT-$backend.log" 2>&1
  echo "$backend: $((SECONDS - start)) s"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
runs = {b: json.load(open(f"{out}/{b}/report.json")) for b in ["flex", "wgpu"]}
for key in ["zero_shot", "immediate", "last", "ptl_accuracy", "experts_per_layer"]:
    for backend, report in runs.items():
        value = report[key][-1] if key == "experts_per_layer" else report[key]
        print(f"{key:<18} {backend:<5} {value}")
same = all(runs["flex"][k] == runs["wgpu"][k] for k in ["zero_shot", "immediate", "last"])
print("accuracy rows equal" if same else "accuracy rows differ")
PY
