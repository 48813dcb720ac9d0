#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (tests/fuzz; ASan and UBSan on) and runs each for
# SECONDS (default 60), starting from the seed corpus in tests/fuzz/corpus. New inputs go to
# build-fuzz/corpus/TARGET; a crash, leak, timeout or out-of-memory input is saved in
# build-fuzz/findings/ and fails the script.
# usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (targets: idx csv layers checkpoint)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx csv layers checkpoint)
case $seconds in
  ''|*[!0-9]*) echo "$0: SECONDS must be a whole number, got '$seconds'" >&2; exit 2 ;;
esac
command -v clang++ > /dev/null || { echo "$0: clang++ not found (scripts/setup-deps.sh installs it)" >&2; exit 1; }
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
mkdir -p "$build"
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSHARDPROP_FUZZ=ON > "$build/configure.log" 2>&1 || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" > "$build/build.log" 2>&1 || { cat "$build/build.log"; exit 1; }
mkdir -p "$build/findings"
# The targets write their scratch files under TMPDIR.
export TMPDIR="$build/tmp"
mkdir -p "$TMPDIR"
trap 'rm -rf "$TMPDIR"' EXIT
status=0
for t in "${targets[@]}"; do
  [ -d "$root/tests/fuzz/corpus/$t" ] || { echo "$0: unknown target '$t'" >&2; exit 2; }
  mkdir -p "$build/corpus/$t"
  log="$build/fuzz_$t.log"
  if "$build/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
      -artifact_prefix="$build/findings/${t}-" -print_final_stats=1 \
      "$build/corpus/$t" "$root/tests/fuzz/corpus/$t" > "$log" 2>&1; then
    echo "fuzz_$t: $(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}') runs in ${seconds} s, nothing found"
  else
    echo "fuzz_$t: FOUND A PROBLEM (input in $build/findings/):"
    grep -E "ERROR|SUMMARY|runtime error|Test unit written" "$log" | head -5
    status=1
  fi
done
exit $status
