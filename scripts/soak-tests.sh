#!/usr/bin/env bash
# Runs the test suite N times under load and prints, per test, in how many runs it failed.
# A CPU hog on every core (one busy loop per core, normal priority) runs from the first run
# to the last, so every timing in the suite is tested on a machine slower than it expects.
# A test that fails in any run has a bug at its cause: a race, a fixed timing, a shared
# port or file.
# usage: scripts/soak-tests.sh N [STAGE...]   (stages: plain openblas sanitize fuzz; all by default)
# Environment: FUZZ_SECONDS (20) per target and run; BUILD_DIR as for scripts/test.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/stages.sh
. "$root/scripts/stages.sh"
runs=${1:-}
case $runs in
  ''|*[!0-9]*|0) echo "usage: $0 N [STAGE...] (N >= 1)" >&2; exit 2 ;;
esac
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(plain openblas sanitize fuzz)
for s in "${stages[@]}"; do
  case $s in plain|openblas|sanitize|fuzz) ;; *) echo "$0: unknown stage '$s'" >&2; exit 2 ;; esac
done

"$root/scripts/setup-deps.sh"
logs=$(mktemp -d)
for s in "${stages[@]}"; do
  [ "$s" = fuzz ] && continue
  stage_build "$s" > "$logs/build-$s.log" 2>&1 ||
    { tail -40 "$logs/build-$s.log"; echo "soak: the $s build failed" >&2; exit 1; }
done

hogs=()
stop_hogs() { [ ${#hogs[@]} -eq 0 ] || kill "${hogs[@]}" 2> /dev/null || true; }
trap stop_hogs EXIT
for _ in $(seq 1 "$(nproc)"); do
  (while :; do :; done) &
  hogs+=($!)
done
echo "soak: ${#hogs[@]} CPU hogs running; $runs runs of: ${stages[*]}"

declare -A failures seen
start=$(date +%s)
for run in $(seq 1 "$runs"); do
  for s in "${stages[@]}"; do
    log="$logs/$s-$run.log"
    if [ "$s" = fuzz ]; then
      FUZZ_BUILD_DIR=$(stage_dir plain)-fuzz "$root/scripts/fuzz.sh" "${FUZZ_SECONDS:-20}" \
        > "$log" 2>&1 || true
      results=$(sed -nE 's/^(fuzz_[a-z]+): .*nothing found$/\1 Passed/p;
                         s/^(fuzz_[a-z]+): FOUND A PROBLEM.*/\1 Failed/p' "$log")
    else
      stage_ctest "$s" --output-on-failure > "$log" 2>&1 || true
      # "  12/89 Test #12: Name [# GetParam() = ...] .....   Passed    0.01 sec" (or
      # ***Failed, ***Timeout, ***Exception: SegFault, ...)
      results=$(sed -nE 's/^ *[0-9]+\/[0-9]+ Test +#[0-9]+: ([^ ]+) .*[.] *(\*\*\*)?([A-Za-z]+)(: [A-Za-z]+)? +[0-9.]+ sec$/\1 \3/p' "$log")
    fi
    count=0 failed=0
    while read -r name result; do
      [ -n "$name" ] || continue
      seen["$s|$name"]=1
      count=$((count + 1))
      if [ "$result" != Passed ] && [ "$result" != Skipped ]; then
        failures["$s|$name"]=$((${failures["$s|$name"]:-0} + 1))
        failed=$((failed + 1))
        cp "$log" "$logs/FAILED-$s-$run.log"
      fi
    done <<< "$results"
    echo "soak: run $run/$runs, $s: $count tests, $failed failed ($(($(date +%s) - start)) s so far)"
  done
done
stop_hogs

echo
printf '%-80s' "test"
for s in "${stages[@]}"; do printf ' %9s' "$s"; done
echo
names=$(for key in "${!seen[@]}"; do echo "${key#*|}"; done | sort -u)
total=0
while read -r name; do
  printf '%-80s' "$name"
  for s in "${stages[@]}"; do
    if [ -n "${seen["$s|$name"]:-}" ]; then
      f=${failures["$s|$name"]:-0}
      total=$((total + f))
      printf ' %9s' "$f/$runs"
    else
      printf ' %9s' "-"
    fi
  done
  echo
done <<< "$names"
echo
echo "soak: $total failed test runs in $runs runs under load, $(($(date +%s) - start)) s; logs in $logs"
[ "$total" -eq 0 ]
