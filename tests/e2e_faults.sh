#!/usr/bin/env bash
# Faults during training, under `mpirun -np 2`:
#   divergence   stops with one error line naming the step and the layer; the newest
#                checkpoint is the last good step's, verifies and holds only finite values;
#   SIGKILL      of one rank ends the job within 30 s with a non-zero status and a message
#                naming the lost rank, and --resume continues from the newest checkpoint;
#   SIGSTOP      of one rank is caught by --collective-timeout: the job aborts with a message
#                naming the step, no rank is left, and --resume continues.
# usage: e2e_faults.sh SHARDPROP MAKE_BLOBS CHECKPOINT_TOOL MPIEXEC [MPIEXEC FLAGS...]
set -euo pipefail
shardprop=$1 make_blobs=$2 tool=$3
shift 3
mpirun=("$@")
python=/usr/bin/python3
work=$(mktemp -d)
trap 'pkill -KILL -f "^$shardprop train .*$work" 2> /dev/null || true; rm -rf "$work"' EXIT
cd "$work"
"$make_blobs" train.h5 test.h5

fail() {
  echo "FAIL: $*"
  exit 1
}
newest() { ls "$1" | grep '^ckpt-.*\.h5$' | sort | tail -1; }
now() { date +%s%N; }
seconds_since() { echo $((($(now) - $1) / 1000000000)); }
no_rank_left() {
  ! pgrep -f "^$shardprop train .*$work" > /dev/null || fail "a rank of $1 is still running"
}

# --- Divergence: a huge learning rate overflows within a few steps.
status=0
"${mpirun[@]}" -np 2 "$shardprop" train --train train.h5 --layers 10,32,4 --batch 50 \
  --lr 1e6 --checkpoint-dir diverged --checkpoint-every-steps 1 --keep-checkpoints 100 \
  > diverged.txt 2>&1 || status=$?
[ "$status" -ne 0 ] || fail "the diverging run exited 0"
[ "$(grep -c '^shardprop: error:' diverged.txt)" -eq 1 ] || fail "not one error line: $(cat diverged.txt)"
line=$(grep '^shardprop: error:' diverged.txt)
[[ $line =~ "training diverged at step "([0-9]+)": loss is ".*" in layer "[12]" of 2 (" ]] ||
  fail "unexpected error line: $line"
step=${BASH_REMATCH[1]}
last_good=$(printf 'ckpt-%09d.h5' $((step - 1)))
[ "$(newest diverged)" = "$last_good" ] || fail "newest is $(newest diverged), expected $last_good"
[ "$(cat diverged/latest)" = "$last_good" ] || fail "latest names $(cat diverged/latest)"
"$python" "$tool" verify "diverged/$last_good"
"$python" "$tool" finite "diverged/$last_good"
echo "ok: divergence -> $line; newest checkpoint $last_good"

# A run that lasts: about 2 ms a step, checkpoints every 20 steps.
long=(--train train.h5 --layers 10,256,256,4 --batch 50 --epochs 5000 --seed 4
      --checkpoint-every-steps 20)
# rank_pid DIR R: the pid of rank R of the job that checkpoints into DIR.
rank_pid() {
  local pid
  for pid in $(pgrep -f "^$shardprop train .*$work/$1"); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
      echo "$pid"
      return
    fi
  done
}
# start_long DIR [FLAGS...]: starts the long run in the background; returns when DIR holds a
# checkpoint.
start_long() {
  local dir=$1
  shift
  "${mpirun[@]}" -np 2 "$shardprop" train "${long[@]}" --checkpoint-dir "$work/$dir" "$@" \
    > "$dir.txt" 2>&1 &
  job=$!
  for _ in $(seq 1 3000); do
    [ -e "$dir/latest" ] && [ -n "$(rank_pid "$dir" 1)" ] && return
    sleep 0.01
  done
  fail "$dir: no checkpoint after 30 s"
}
# resume_from DIR: 2 ranks continue DIR's run for 20 steps from its newest checkpoint.
resume_from() {
  local from
  from=$(newest "$1")
  "$python" "$tool" verify "$1/$from"
  local step=$((10#${from:5:9}))
  "${mpirun[@]}" -np 2 "$shardprop" train --train train.h5 --resume "$1" --checkpoint-dir "$1" \
    --stop-at-step $((step + 20)) > "$1-resumed.txt" 2>&1 || fail "resume of $1: $(cat "$1-resumed.txt")"
  grep -q "resume .*$from: step $step" "$1-resumed.txt" || fail "$1 did not resume from $from"
  [ "$(newest "$1")" = "$(printf 'ckpt-%09d.h5' $((step + 20)))" ] || fail "$1: resumed run did not finish"
  echo "ok: $1 resumed from $from and reached step $((step + 20))"
}

# --- SIGKILL of rank 1.
start_long killed
kill -KILL "$(rank_pid killed 1)"
killed_at=$(now)
status=0
wait "$job" || status=$?
took=$(seconds_since "$killed_at")
[ "$status" -ne 0 ] || fail "the job whose rank 1 was killed exited 0"
[ "$took" -le 30 ] || fail "the job took $took s to end after the kill"
grep -qE "rank 1 .*(signal 9|Killed)" killed.txt || fail "no message names rank 1: $(cat killed.txt)"
no_rank_left killed
echo "ok: SIGKILL of rank 1 -> status $status after ${took}s: $(grep -E 'rank 1 .*signal 9' killed.txt)"
resume_from killed

# --- SIGSTOP of rank 1, with a 3 s collective timeout.
start_long stopped --collective-timeout 3
stopped_pid=$(rank_pid stopped 1)
kill -STOP "$stopped_pid"
stopped_at=$(now)
status=0
wait "$job" || status=$?
took=$(seconds_since "$stopped_at")
for _ in $(seq 1 200); do  # gone, or a zombie waiting for its reaper
  state=$(awk '{print $3}' "/proc/$stopped_pid/stat" 2> /dev/null || echo gone)
  [ "$state" = gone ] || [ "$state" = Z ] && break
  sleep 0.01
done
[ "$state" = gone ] || [ "$state" = Z ] || fail "the stopped rank outlived the job (state $state)"
[ "$status" -ne 0 ] || fail "the job with a stopped rank exited 0"
[ "$took" -le 15 ] || fail "the job took $took s to end after the stop"
line=$(grep -m1 '^shardprop: error:' stopped.txt) || fail "no error line: $(cat stopped.txt)"
# The stop lands wherever it lands (a gradient reduction through MPI or the node's shared
# memory, a checkpoint's agreement, ...): every collective during training names the step.
timed_out="\[rank 0\] step [0-9]+: (MPI_[A-Za-z_ ]+|the [a-z' ]+) did not complete on every rank within 3 s"
[[ $line =~ $timed_out ]] ||
  fail "unexpected error line: $line"
no_rank_left stopped
echo "ok: SIGSTOP of rank 1 -> status $status after ${took}s: $line"
resume_from stopped
echo "e2e_faults: all checks passed"
