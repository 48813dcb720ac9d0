#!/usr/bin/env bash
# Installs the dependencies, builds shardprop and runs the test suite in stages
# (scripts/stages.sh):
#   plain     the whole suite with ctest;
#   openblas  the unit tests again with every product by OpenBLAS (SHARDPROP_GEMM=openblas)
#             instead of the default backend (oneDNN);
#   sanitize  AddressSanitizer and UndefinedBehaviorSanitizer, the whole suite again
#             (SANITIZE=0 skips it);
#   fuzz      each libFuzzer target for FUZZ_SECONDS (default 20; 0 skips it).
# It stops at the first stage that fails, and ends with one line per stage: its tests
# passed and failed, and its time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/stages.sh
. "$root/scripts/stages.sh"
"$root/scripts/setup-deps.sh"

summary=()
report() {
  echo
  echo "test.sh: stages"
  for line in "${summary[@]}"; do echo "  $line"; done
}
trap report EXIT

# run_stage NAME: builds the stage and runs its tests, adding its line to the summary.
run_stage() {
  local name=$1 start log status=0
  start=$(date +%s)
  log=$(mktemp)
  if ! stage_build "$name"; then
    summary+=("$(printf '%-9s build FAILED after %d s' "$name" $(($(date +%s) - start)))")
    return 1
  fi
  stage_ctest "$name" --output-on-failure 2>&1 | tee "$log" || status=$?
  local counts
  counts=$(grep -oE '[0-9]+ tests failed out of [0-9]+' "$log" | tail -1)
  rm -f "$log"
  local failed=${counts%% *} total=${counts##* }
  summary+=("$(printf '%-9s %3d passed, %2d failed  %5d s' "$name" $((total - failed)) "$failed" \
    $(($(date +%s) - start)))")
  return "$status"
}

run_stage plain
run_stage openblas
if [ "${SANITIZE:-1}" != 0 ]; then
  run_stage sanitize
else
  summary+=("sanitize  skipped (SANITIZE=0)")
fi
if [ "${FUZZ_SECONDS:-20}" != 0 ]; then
  start=$(date +%s)
  status=0
  fuzz_log=$(mktemp)
  "$root/scripts/fuzz.sh" "${FUZZ_SECONDS:-20}" | tee "$fuzz_log" || status=$?
  clean=$(grep -c 'nothing found' "$fuzz_log" || true)
  found=$(grep -c 'FOUND A PROBLEM' "$fuzz_log" || true)
  rm -f "$fuzz_log"
  summary+=("$(printf '%-9s %3d targets clean, %2d with findings  %5d s' fuzz "$clean" "$found" \
    $(($(date +%s) - start)))")
  exit "$status"
else
  summary+=("fuzz      skipped (FUZZ_SECONDS=0)")
fi
