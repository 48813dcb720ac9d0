#!/usr/bin/env bash
# Runs `mpirun -np N PROGRAM ARGS...` with the flags this machine needs:
#   --allow-run-as-root when run as root,
#   --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 when there are more ranks
#     than cores (so idle ranks yield instead of busy-polling),
#   and otherwise one core per rank (--bind-to core).
# Extra mpirun flags can be given in MPIRUN_FLAGS (e.g. "--hostfile hosts"); MPIRUN_BIND=none
# leaves ranks unbound (for a rank that runs more than one thread).
# usage: scripts/mpirun.sh N PROGRAM [ARGS...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RANKS PROGRAM [ARGS...]" >&2
  exit 2
fi
np=$1
shift
case $np in
  ''|*[!0-9]*|0) echo "$0: ranks must be a positive integer, got '$np'" >&2; exit 2 ;;
esac
flags=()
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
cores=$(nproc)
if [ "$np" -gt "$cores" ]; then
  flags+=(--oversubscribe --bind-to none --mca mpi_yield_when_idle 1)
elif [ "${MPIRUN_BIND:-}" = none ]; then
  flags+=(--bind-to none)
else
  flags+=(--bind-to core)
fi
# shellcheck disable=SC2086  # MPIRUN_FLAGS is a list of words on purpose
exec mpirun "${flags[@]}" ${MPIRUN_FLAGS:-} -np "$np" "$@"
