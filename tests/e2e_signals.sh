#!/usr/bin/env bash
# Stopping on a signal, under `mpirun -np 2` (what a batch scheduler does before its time
# limit or on preemption):
#   SIGUSR1 to mpirun (forwarded to every rank), twice in a row: the job ends at the next step
#     boundary with status 75, its last line names the signal, the step and the checkpoint of
#     that step, which verifies; --resume continues it to the same bits as a run never stopped
#     (--deterministic);
#   SIGTERM to one rank alone: every rank stops at the same step, status 75;
#   SIGINT without --checkpoint-dir: status 75, and the line says that nothing was saved.
# The runs are long (1000 epochs), so a signal always lands mid-run; each is sent once the
# run shows it is training (its first checkpoint, or its header).
# usage: e2e_signals.sh SHARDPROP MAKE_BLOBS CHECKPOINT_TOOL MPIEXEC [MPIEXEC FLAGS...]
extras=1
# shellcheck source=tests/e2e_lib.sh
. "$(dirname "$0")/e2e_lib.sh"
tool=${extra[0]}
python=/usr/bin/python3
trap 'pkill -KILL -f "^$shardprop train .*$work" 2> /dev/null || true; rm -rf "$work"' EXIT
cd "$work"
"$make_blobs" train.h5 test.h5

common=(--train "$work/train.h5" --layers 10,32:relu,16:tanh,4:softmax --batch 48
        --epochs 1000 --lr 0.05 --momentum 0.9 --seed 3 --deterministic --progress never)
# wait_for FILE PATTERN: until FILE has a line matching PATTERN (at most 120 s).
wait_for() {
  for _ in $(seq 1 1200); do
    grep -q "$2" "$1" 2> /dev/null && return 0
    sleep 0.1
  done
  fail "no '$2' in $1 after 120 s: $(cat "$1")"
}

# --- SIGUSR1 to mpirun, twice.
"${mpirun[@]}" -np 2 "$shardprop" train "${common[@]}" --checkpoint-dir "$work/ck" \
  --checkpoint-every-steps 20 > usr1.txt 2>&1 &
job=$!
wait_for usr1.txt "^checkpoint $work/ck/ckpt-000000020.h5"
kill -USR1 "$job"
sleep 0.05
kill -USR1 "$job" 2> /dev/null || true  # a second signal while it stops
status=0
wait "$job" || status=$?
[ "$status" -eq 75 ] || fail "SIGUSR1: status $status, not 75: $(cat usr1.txt)"
line=$(grep '^stopped by' usr1.txt) || fail "SIGUSR1: no 'stopped by' line: $(cat usr1.txt)"
[[ $line =~ ^"stopped by SIGUSR1 at step "([0-9]+)": checkpoint $work/ck/ckpt-"0*([0-9]+)".h5; continue with --resume $work/ck"$ ]] ||
  fail "SIGUSR1: unexpected line: $line"
step=${BASH_REMATCH[1]}
[ "${BASH_REMATCH[2]}" = "$step" ] || fail "the checkpoint is not of the step stopped at: $line"
[ "$step" -gt 20 ] || fail "stopped at step $step, before the first checkpoint"
test "$(cat "$work/ck/latest")" = "$(printf 'ckpt-%09d.h5' "$step")"
"$python" "$tool" verify "$work/ck/$(cat "$work/ck/latest")"
[ "$(grep -c '^stopped by' usr1.txt)" -eq 1 ] || fail "more than one stop line"

# It resumes exactly: 15 steps on from the stop, the same bits as a run that never stopped.
until=$((step + 15))
"${mpirun[@]}" -np 2 "$shardprop" train --resume "$work/ck" --stop-at-step "$until" > resumed.txt
"${mpirun[@]}" -np 2 "$shardprop" train "${common[@]}" --checkpoint-dir "$work/straight" \
  --stop-at-step "$until" > straight.txt
name=$(printf 'ckpt-%09d.h5' "$until")
"$python" "$tool" same "$work/ck/$name" "$work/straight/$name"

# stop_rank SIGNAL OUT PATTERN FLAGS...: starts the run with FLAGS, waits for a line of OUT
# matching PATTERN, sends SIGNAL to one rank and expects the whole job to end with status 75.
stop_rank() {
  local signal=$1 out=$2 pattern=$3 status=0 rank
  shift 3
  "${mpirun[@]}" -np 2 "$shardprop" train "${common[@]}" "$@" > "$out" 2>&1 &
  job=$!
  wait_for "$out" "$pattern"
  rank=$(pgrep -f "^$shardprop train .*$work" | tail -1)
  [ -n "$rank" ] || fail "SIG$signal: no rank found"
  kill "-$signal" "$rank"
  wait "$job" || status=$?
  [ "$status" -eq 75 ] || fail "SIG$signal: status $status, not 75: $(cat "$out")"
}

# --- SIGTERM to one rank alone.
stop_rank TERM term.txt "^checkpoint $work/ck2/ckpt-000000020.h5" --checkpoint-dir "$work/ck2" \
  --checkpoint-every-steps 20
grep -qE "^stopped by SIGTERM at step [0-9]+: checkpoint $work/ck2/ckpt-[0-9]+\.h5; continue with --resume $work/ck2$" term.txt ||
  fail "SIGTERM: no stop line: $(cat term.txt)"
"$python" "$tool" verify "$work/ck2/$(cat "$work/ck2/latest")"

# --- SIGINT to a rank, no checkpoint directory (once the header is out and training runs).
stop_rank INT int.txt "^epoch   1/1000"
grep -qE "^stopped by SIGINT at step [0-9]+: nothing saved \(no --checkpoint-dir\)$" int.txt ||
  fail "SIGINT: no stop line: $(cat int.txt)"
echo "e2e_signals: passed (SIGUSR1 stop at step $step, resumed bit for bit)"
