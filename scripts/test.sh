#!/usr/bin/env bash
# Installs the dependencies, builds shardprop and runs the whole test suite with ctest; then
#   - builds the OpenBLAS configuration (SHARDPROP_USE_OPENBLAS) and runs its unit tests,
#     which include the allocation-free step;
#   - builds with AddressSanitizer and UndefinedBehaviorSanitizer (SHARDPROP_SANITIZE) and
#     runs the whole suite again (SANITIZE=0 skips this stage);
#   - builds the libFuzzer targets with clang and runs each briefly (FUZZ_SECONDS, 0 skips).
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

if [ "${SANITIZE:-1}" != 0 ]; then
  asan=$build-sanitize
  cmake -S "$root" -B "$asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHARDPROP_SANITIZE=ON \
    > "$asan.configure.log" 2>&1 || { cat "$asan.configure.log"; exit 1; }
  cmake --build "$asan" -j "$(nproc)"
  (cd "$asan" && ctest --output-on-failure -j "$(nproc)")
fi

if [ "${FUZZ_SECONDS:-20}" != 0 ]; then
  "$root/scripts/fuzz.sh" "${FUZZ_SECONDS:-20}"
fi
