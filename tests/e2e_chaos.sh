#!/usr/bin/env bash
# Chaos under `mpirun -np 2`: a --deterministic run with checkpoints every 10 steps is hit,
# CHAOS_FAULTS times (30), at random moments, by one of: SIGKILL of a random rank; SIGSTOP of
# a random rank, SIGCONT after the 2 s collective timeout has passed; SIGTERM of a random rank.
# After each fault the job must have ended (any status but 0), `latest` must name a checkpoint
# that verifies, and the same command with --resume auto continues the run. At the end the
# parameters equal those of the run never interrupted, bit for bit.
# The moments come from CHAOS_SEED (printed; set it to replay a run): each fault lands a
# random 0-250 ms after the run has written a checkpoint newer than the one it resumed from.
# usage: e2e_chaos.sh SHARDPROP MAKE_BLOBS CHECKPOINT_TOOL MPIEXEC [MPIEXEC FLAGS...]
extras=1
# shellcheck source=tests/e2e_lib.sh
. "$(dirname "$0")/e2e_lib.sh"
tool=${extra[0]}
python=/usr/bin/python3
faults=${CHAOS_FAULTS:-30}
seed=${CHAOS_SEED:-$(($(date +%s%N) % 1000000))}
echo "e2e_chaos: seed $seed, $faults faults (CHAOS_SEED=$seed replays the moments)"
RANDOM=$seed
trap 'pkill -KILL -f "^$shardprop train .*$work" 2> /dev/null || true; rm -rf "$work"' EXIT
cd "$work"
"$make_blobs" train.h5 test.h5 > /dev/null

fail() {
  echo "FAIL (seed $seed): $*"
  exit 1
}
ranks() { pgrep -f "^$shardprop train .*$work" || true; }
newest() { cat "$work/ck/latest" 2> /dev/null || true; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# 40 steps per epoch, about 2 ms a step: far more steps than the faults leave time for.
run=(--train "$work/train.h5" --layers 10,256:relu,256:tanh,4:softmax --batch 50 --epochs 400
     --seed 9 --deterministic --progress never)
chaos=(--checkpoint-dir "$work/ck" --checkpoint-every-steps 10 --resume auto
       --collective-timeout 2 --save "$work/final.h5")
"${mpirun[@]}" -np 2 "$shardprop" train "${run[@]}" --save "$work/straight.h5" > straight.txt

kinds=(KILL STOP TERM)
declare -A count=([KILL]=0 [STOP]=0 [TERM]=0)
for fault in $(seq 1 "$faults"); do
  before=$(newest)
  "${mpirun[@]}" -np 2 "$shardprop" train "${run[@]}" "${chaos[@]}" > "run-$fault.txt" 2>&1 &
  job=$!
  # Until the run has written a checkpoint of its own (it made progress) and both ranks run.
  started=$(now_ms)
  until [ -n "$(newest)" ] && [[ "$(newest)" > "$before" ]] && [ "$(ranks | wc -l)" -eq 2 ]; do
    kill -0 "$job" 2> /dev/null || fail "fault $fault: the run ended before it was hit: $(tail -5 "run-$fault.txt")"
    [ $(($(now_ms) - started)) -lt 120000 ] || fail "fault $fault: no new checkpoint in 120 s"
    sleep 0.005
  done
  sleep "0.$(printf '%03d' $((RANDOM % 250)))"
  mapfile -t pids < <(ranks)
  [ "${#pids[@]}" -ge 1 ] || fail "fault $fault: no rank left to hit: $(tail -5 "run-$fault.txt")"
  victim=${pids[$((RANDOM % ${#pids[@]}))]}
  kind=${kinds[$((RANDOM % 3))]}
  count[$kind]=$((count[$kind] + 1))
  case $kind in
    KILL) kill -KILL "$victim" 2> /dev/null || true ;;
    TERM) kill -TERM "$victim" 2> /dev/null || true ;;
    STOP)
      kill -STOP "$victim" 2> /dev/null || true
      sleep 3  # past the collective timeout
      kill -CONT "$victim" 2> /dev/null || true
      ;;
  esac
  status=0
  ended=$(now_ms)
  while kill -0 "$job" 2> /dev/null; do
    [ $(($(now_ms) - ended)) -lt 60000 ] || fail "fault $fault ($kind): the job still runs 60 s later"
    sleep 0.01
  done
  wait "$job" || status=$?
  [ "$status" -ne 0 ] || fail "fault $fault ($kind): the job exited 0: $(tail -5 "run-$fault.txt")"
  for _ in $(seq 1 500); do [ -z "$(ranks)" ] && break; sleep 0.01; done
  [ -z "$(ranks)" ] || fail "fault $fault ($kind): a rank outlived the job"
  [ -n "$(newest)" ] || fail "fault $fault ($kind): no checkpoint named by latest"
  "$python" "$tool" verify "$work/ck/$(newest)" > /dev/null ||
    fail "fault $fault ($kind): latest names $(newest), which does not verify"
  echo "fault $fault: SIG$kind, status $status, latest $(newest)"
done

# The rest of the run, untouched, ends where the run never interrupted ends.
"${mpirun[@]}" -np 2 "$shardprop" train "${run[@]}" "${chaos[@]}" > final.txt 2>&1 ||
  fail "the final run failed: $(tail -5 final.txt)"
"$python" "$tool" same "$work/straight.h5" "$work/final.h5" ||
  fail "the parameters differ from the run never interrupted"
echo "$faults faults, 0 lost (SIGKILL ${count[KILL]}, SIGSTOP ${count[STOP]}, SIGTERM ${count[TERM]}; seed $seed)"
