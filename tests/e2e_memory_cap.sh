#!/usr/bin/env bash
# A training set larger than the memory a process may use: under a cap on its address space
# (ulimit -v) that leaves room for half of the set, `train --data-placement replicated`
# stops with one line that names the file and says what to do, and `--data-placement
# streamed` trains. The cap is measured, not guessed: the peak address space of the same run
# on a 1,000-row set of the same width, plus half of the large set.
# usage: e2e_memory_cap.sh SHARDPROP MAKE_BLOBS MPIEXEC [MPIEXEC FLAGS...]
set -euo pipefail
shardprop=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# One malloc arena: a thread's arena reserves 64 MB of address space, which would make the
# cap depend on which threads allocate first.
export MALLOC_ARENA_MAX=1
/usr/bin/python3 - <<'PY'
import h5py, numpy as np
rng = np.random.default_rng(3)
def make(name, rows):
    labels = rng.integers(0, 10, rows).astype(np.int32)
    with h5py.File(name, "w") as f:
        features = f.create_dataset("features", (rows, 1000), np.float32)
        for begin in range(0, rows, 8000):  # 32 MB at a time
            n = min(8000, rows - begin)
            block = rng.standard_normal((n, 1000), dtype=np.float32) * 0.1
            block[np.arange(n), labels[begin:begin + n]] += 1
            features[begin:begin + n] = block
        f["labels"] = labels
make("small.h5", 1000)
make("large.h5", 48000)  # 192 MB of features
PY
run=(train --layers 1000,32:relu,10:softmax --batch 100 --threads 1 --progress never)

# The peak address space of a run on the small set, polled until it exits.
"$shardprop" "${run[@]}" --train small.h5 --epochs 2 --data-placement streamed > /dev/null &
pid=$!
peak=0
while kill -0 "$pid" 2> /dev/null; do
  v=$(awk '/^VmPeak:/ {print $2}' "/proc/$pid/status" 2> /dev/null || true)
  [ -n "$v" ] && peak=$v
  sleep 0.01
done
wait "$pid"
[ "$peak" -gt 0 ] || { echo "FAIL: could not measure the small run's address space"; exit 1; }
cap=$((peak + 96 * 1024 + 32 * 1024))  # KB: half the large set, and room to spare
echo "small run: peak address space $((peak / 1024)) MB; cap $((cap / 1024)) MB for a set of 192 MB"

status=0
(ulimit -v "$cap" && exec "$shardprop" "${run[@]}" --train large.h5 --max-steps 50 \
  --data-placement replicated) > replicated.txt 2>&1 || status=$?
[ "$status" -eq 1 ] || { echo "FAIL: replicated under the cap exited $status"; cat replicated.txt; exit 1; }
errors=$(grep -c "^shardprop: error:" replicated.txt || true)
[ "$errors" -eq 1 ] || { echo "FAIL: $errors error lines"; cat replicated.txt; exit 1; }
grep -q "^shardprop: error: .*large.h5: dataset 'features': not enough memory for its 48000 × 1000 features (183 MB); --data-placement streamed reads them as needed" replicated.txt ||
  { echo "FAIL: replicated's error:"; cat replicated.txt; exit 1; }
echo "replicated under the cap: $(grep '^shardprop: error' replicated.txt)"

(ulimit -v "$cap" && exec "$shardprop" "${run[@]}" --train large.h5 --max-steps 300 \
  --data-placement streamed --metrics streamed.jsonl) > streamed.txt 2>&1 ||
  { echo "FAIL: streamed under the cap failed"; cat streamed.txt; exit 1; }
grep -q '"train_acc"' streamed.jsonl || { echo "FAIL: streamed wrote no metrics"; exit 1; }
echo "streamed under the cap: trained 300 steps ($(grep -o '"train_acc":[0-9.]*' streamed.jsonl | tail -1))"
echo "e2e_memory_cap: passed"
