#!/usr/bin/env bash
# Builds shardprop in Release and runs `shardprop-bench` on 2 ranks: every GEMM backend's
# single-core speed at each workload's step shapes (the best is the limit), then the small
# and wide workloads at 1x1, 1x2 and 2x1, in float32 and (where the CPU can) bf16.
# Writes build/bench.json. Extra arguments go to `shardprop-bench`.
# Environment: BUILD_DIR (build), DATA (build/fashion-mnist/train.h5).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
"$root/scripts/setup-deps.sh" > /dev/null
BUILD_TYPE=Release "$root/scripts/build.sh" > /dev/null
data=${DATA:-$build/fashion-mnist/train.h5}
if [ ! -s "$data" ] && [ -z "${DATA:-}" ]; then
  src=/usr/share/datasets/fashion-mnist
  mkdir -p "$(dirname "$data")"
  "$build/apps/shardprop" convert --images "$src/train-images-idx3-ubyte.gz" \
    --labels "$src/train-labels-idx1-ubyte.gz" --out "$data.tmp" && mv "$data.tmp" "$data"
fi
# Unbound: in the 1 x 2 cases rank 0 runs two threads while rank 1 sleeps.
MPIRUN_BIND=none "$root/scripts/mpirun.sh" 2 "$build/apps/shardprop-bench" --data "$data" \
  --json "$build/bench.json" "$@"
