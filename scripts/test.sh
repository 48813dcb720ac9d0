#!/usr/bin/env bash
# Installs the dependencies, builds shardprop and runs the whole test suite with ctest; then
# builds the OpenBLAS configuration (SHARDPROP_USE_OPENBLAS) and runs its unit tests, which
# include the allocation-free step.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
"$root/scripts/setup-deps.sh"
"$root/scripts/build.sh"
(cd "$build" && ctest --output-on-failure -j "$(nproc)")

blas=$build-openblas
cmake -S "$root" -B "$blas" -DCMAKE_BUILD_TYPE=Release -DSHARDPROP_USE_OPENBLAS=ON \
  > "$blas.configure.log" 2>&1 || { cat "$blas.configure.log"; exit 1; }
cmake --build "$blas" -j "$(nproc)"
(cd "$blas" && ctest --output-on-failure -j "$(nproc)" -E '^(mpi_np|e2e_)')
