#!/usr/bin/env bash
# shardprop under a real Slurm: starts munged, slurmctld and slurmd on this machine, all in a
# temporary directory (own ports, sockets, state and logs; nothing left behind), submits
# scripts/slurm/shardprop.sbatch with 2 tasks, preempts the running job twice with
# `scontrol requeue`, and checks that the job comes back each time, continues from its
# checkpoints and ends with parameters bitwise equal to a run never interrupted
# (--deterministic).
# Needs root and Debian's slurm-wlm and munge (scripts/setup-deps.sh); skipped (77) otherwise.
# usage: slurm_test.sh SHARDPROP MAKE_BLOBS CHECKPOINT_TOOL SBATCH_SCRIPT MPIEXEC [FLAGS...]
set -euo pipefail
shardprop=$1 make_blobs=$2 tool=$3 script=$4
shift 4
mpirun=("$@")
python=/usr/bin/python3
for command in munged slurmctld slurmd sbatch scontrol; do
  command -v "$command" > /dev/null || { echo "SKIP: no $command (slurm-wlm, munge)"; exit 77; }
done
[ "$(id -u)" -eq 0 ] || { echo "SKIP: the Slurm daemons of this test run as root"; exit 77; }

work=$(mktemp -d)
job=
stop_daemons() {
  # The job first, while the daemons that run it are there to end it.
  if [ -n "$job" ]; then
    scancel "$job" 2> /dev/null || true
    for _ in $(seq 1 50); do
      case $(scontrol show job "$job" 2> /dev/null | grep -oE 'JobState=[A-Z]+') in
        JobState=RUNNING | JobState=COMPLETING | JobState=PENDING) sleep 0.2 ;;
        *) break ;;
      esac
    done
  fi
  for pid in "$work"/slurmd.pid "$work"/slurmctld.pid "$work"/munged.pid; do
    [ -s "$pid" ] && kill "$(cat "$pid")" 2> /dev/null || true
  done
  sleep 1
  pkill -KILL -f "^$shardprop train .*$work" 2> /dev/null || true
  rm -rf "$work"
}
trap stop_daemons EXIT
fail() {
  echo "FAIL: $*"
  for log in "$work"/slurmctld.log "$work"/slurmd.log "$work"/out.txt; do
    [ -f "$log" ] && { echo "--- $log"; tail -30 "$log"; }
  done
  exit 1
}
cd "$work"
mkdir state spool

# munge: a fresh key and its own socket.
dd if=/dev/urandom of=munge.key bs=1024 count=1 status=none
chmod 400 munge.key
munged --force --key-file="$work/munge.key" --socket="$work/munge.socket" \
  --pid-file="$work/munged.pid" --log-file="$work/munged.log" --seed-file="$work/munge.seed"

# Two free TCP ports for the controller and the node daemon.
read -r ctld_port node_port < <("$python" -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
host=$(hostname)
cat > slurm.conf <<EOF
ClusterName=shardproptest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
AuthType=auth/munge
AuthInfo=socket=$work/munge.socket
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
export SLURM_CONF=$work/slurm.conf
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 100); do
  sinfo -h -o %T 2> /dev/null | grep -qE '^idle' && break
  sleep 0.2
done
sinfo -h -o %T | grep -qE '^idle' || fail "the node did not come up: $(sinfo 2>&1)"

"$make_blobs" train.h5 test.h5 > /dev/null
run=(--train "$work/train.h5" --layers 10,512:relu,512:tanh,4:softmax --batch 48 --epochs 200
     --deterministic --seed 5)

# The reference: the same run, never interrupted.
"${mpirun[@]}" -np 2 "$shardprop" train "${run[@]}" --save "$work/straight.h5" > straight.txt

job_field() { scontrol show job "$job" | grep -oE "$1=[^ ]+" | head -1 | cut -d= -f2; }
newest() { cat "$work/ck/latest" 2> /dev/null || true; }
# wait_until DESCRIPTION COMMAND...: runs COMMAND every 0.2 s until it succeeds, at most
# 180 s (COMMAND is a function, so that what it checks is read anew each time).
wait_until() {
  local what=$1
  shift
  for _ in $(seq 1 900); do
    "$@" && return 0
    sleep 0.2
  done
  fail "waited 180 s for $what (job state $(job_field JobState))"
}
past() { [ -n "$(newest)" ] && [[ "$(newest)" > "$1" ]]; }
state_is() { [ "$(job_field JobState)" = "$1" ]; }
restarts_are() { [ "$(job_field Restarts)" = "$1" ]; }

SHARDPROP=$shardprop SHARDPROP_CHECKPOINT_EVERY=500 \
  sbatch --ntasks 2 --output "$work/out.txt" "$script" "$work/ck" "${run[@]}" \
  --save "$work/final.h5" > submitted.txt
job=$(grep -oE '[0-9]+' submitted.txt)
for preemption in 1 2; do
  before=$(newest)
  wait_until "a checkpoint after '$before'" past "$before"
  [ "$(job_field JobState)" = RUNNING ] || fail "the job is $(job_field JobState) before preemption $preemption"
  scontrol requeue "$job"
  wait_until "the requeue" restarts_are "$preemption"
  # Slurm may hold a requeued job for a while before it starts again; let it start now.
  started() {
    case $(job_field JobState) in
      RUNNING | COMPLETED) return 0 ;;
      PENDING) scontrol update JobId="$job" StartTime=now 2> /dev/null || true ;;
    esac
    return 1
  }
  wait_until "the job to run again" started
done
wait_until "the job to complete" state_is COMPLETED

grep -q "shardprop.sbatch: job $job, start 3, 2 tasks" out.txt || fail "no third start in out.txt"
[ "$(grep -c '^  resume ' out.txt)" -eq 2 ] || fail "not two resumes in out.txt"
"$python" "$tool" same "$work/straight.h5" "$work/final.h5"
echo "slurm_test: passed (2 preemptions, resumed from $(grep '^  resume ' out.txt | tr '\n' ';'))"
