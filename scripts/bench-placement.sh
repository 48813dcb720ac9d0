#!/usr/bin/env bash
# What each --data-placement costs on 2 ranks x 1 thread (each bound to a core, as
# scripts/mpirun.sh binds them), Fashion-MNIST, the placements
# alternating: the training throughput (median samples/s of the epochs after the first, from
# --metrics) and each rank's peak resident memory (/usr/bin/time), from which the same run
# on a 512-row training set of the same width ("without data") is subtracted: the data's
# share. Also the peak of the memory the ranks allocate (RssAnon, polled every 0.25 s), which
# leaves out file pages a rank maps (streamed maps its file: those pages are the kernel's
# page cache, counted in the resident figure but reclaimed under memory pressure). Prints
# one table; a benchmark, not a test.
# usage: scripts/bench-placement.sh [PLACEMENT...]   (default: replicated partitioned)
# Environment: BUILD_DIR (build), ROUNDS (2: each case this many times, best kept).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
shardprop=$build/apps/shardprop
data=$build/fashion-mnist/train.h5
[ -s "$data" ] || { echo "$0: needs $data (bash scripts/demo.sh or scripts/bench.sh makes it)" >&2; exit 2; }
placements=("$@")
[ ${#placements[@]} -gt 0 ] || placements=(replicated partitioned)
rounds=${ROUNDS:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec {nap}<> <(:)  # a pipe nobody writes: read -t on it sleeps without starting a process
/usr/bin/python3 - "$data" "$work/small.h5" <<'PY'
import sys, h5py
with h5py.File(sys.argv[1]) as f, h5py.File(sys.argv[2], "w") as out:
    out["features"] = f["features"][:512]
    out["labels"] = f["labels"][:512]
PY

# run NAME TRAIN PLACEMENT LAYERS BATCH EPOCHS: peak KB of the largest rank and median
# samples/s of epochs 2.., as "peak rate".
run() {
  local name=$1 train=$2 placement=$3 layers=$4 batch=$5 epochs=$6
  # shellcheck disable=SC2016  # expanded by each rank's shell
  "$root/scripts/mpirun.sh" 2 /bin/sh -c \
    'exec /usr/bin/time -f "peak-kb %M" -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' "$work/$name" \
    "$shardprop" train --train "$train" --layers "$layers" --batch "$batch" --epochs "$epochs" \
    --threads 1 --data-placement "$placement" --progress never --metrics "$work/$name.jsonl" > /dev/null &
  local job=$! anon=0 pid key v _ pids=()
  # The ranks' pids once, then their status files read by the shell alone: a poll that
  # started processes would take the ranks' cores from them and slow what it measures.
  while kill -0 "$job" 2> /dev/null && [ ${#pids[@]} -lt 2 ]; do
    mapfile -t pids < <(pgrep -f "^$shardprop train .*$work/$name.jsonl" || true)
    sleep 0.05
  done
  while kill -0 "$job" 2> /dev/null; do
    for pid in "${pids[@]}"; do
      {
        while read -r key v _; do
          [ "$key" = RssAnon: ] && [ "$v" -gt "$anon" ] && anon=$v
        done < "/proc/$pid/status"
      } 2> /dev/null || true  # the rank has ended
    done
    # The data, once read, stays: a sparse poll finds its peak.
    read -r -t 0.25 -u "$nap" _ || true
  done
  wait "$job"
  /usr/bin/python3 - "$work" "$name" "$anon" <<'PY'
import glob, json, statistics, sys
work, name, anon = sys.argv[1], sys.argv[2], sys.argv[3]
peak = max(int(open(p).read().split()[-1]) for p in glob.glob(f"{work}/{name}.[0-9]*"))
rates = [json.loads(l)["samples_per_s"] for l in open(f"{work}/{name}.jsonl") if l.strip()]
print(peak, statistics.median(rates[1:] or rates), anon)
PY
}

printf '%-6s %-12s %12s %14s %16s %10s %18s\n' model placement samples/s "peak MB/rank" "no-data MB/rank" \
  "data MB" "allocated MB/rank"
for model in "small 784,256:relu,128:relu,10:softmax 128 8" "wide 784,1024:relu,1024:relu,10:softmax 256 3"; do
  read -r name layers batch epochs <<< "$model"
  declare -A best_rate=() best_peak=() base_peak=() best_anon=()
  for ((round = 0; round < rounds; round++)); do
    for placement in "${placements[@]}"; do
      read -r peak rate anon <<< "$(run "$name-$placement" "$data" "$placement" "$layers" "$batch" "$epochs")"
      read -r base _ <<< "$(run "$name-$placement-base" "$work/small.h5" "$placement" "$layers" "$batch" 1)"
      if [ -z "${best_rate[$placement]:-}" ] || /usr/bin/python3 -c "import sys; sys.exit(0 if $rate > ${best_rate[$placement]} else 1)"; then
        best_rate[$placement]=$rate
      fi
      [ -z "${best_peak[$placement]:-}" ] || [ "$peak" -lt "${best_peak[$placement]}" ] && best_peak[$placement]=$peak
      [ -z "${base_peak[$placement]:-}" ] || [ "$base" -lt "${base_peak[$placement]}" ] && base_peak[$placement]=$base
      [ -z "${best_anon[$placement]:-}" ] || [ "$anon" -lt "${best_anon[$placement]}" ] && best_anon[$placement]=$anon
    done
  done
  for placement in "${placements[@]}"; do
    /usr/bin/python3 -c "
p, b, r, a = ${best_peak[$placement]}, ${base_peak[$placement]}, ${best_rate[$placement]}, ${best_anon[$placement]}
print('%-6s %-12s %12.0f %14.1f %16.1f %10.1f %18.1f' % ('$name', '$placement', r, p / 1024, b / 1024, (p - b) / 1024, a / 1024))"
  done
  unset best_rate best_peak base_peak best_anon
done
