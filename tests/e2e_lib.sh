# Shared by the end-to-end scripts (sourced): takes the script's arguments
#   SHARDPROP MAKE_BLOBS [EXTRA...] MPIEXEC [MPIEXEC FLAGS...]
# with `extras` naming how many EXTRA arguments come before mpirun, and sets shardprop,
# make_blobs, extra (array), mpirun (array) and work, a temporary directory removed on exit.
# Also defines fail MESSAGE.
set -euo pipefail
shardprop=$1 make_blobs=$2
shift 2
extra=("${@:1:${extras:-0}}")
shift "${extras:-0}"
mpirun=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() {
  echo "FAIL: $*"
  exit 1
}
