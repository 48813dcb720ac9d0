#!/usr/bin/env bash
# End to end: checkpoints under mpirun. A run stopped mid-epoch and resumed on the same
# ranks ends bit for bit where the uninterrupted run ends; resumed on 3 ranks it ends within
# float rounding; a run whose ranks are killed with SIGKILL resumes from its newest
# checkpoint; eval, predict and info read the files; contradicting flags are refused.
# usage: e2e_resume.sh SHARDPROP MAKE_BLOBS CHECKPOINT_TOOL MPIEXEC [MPIEXEC FLAGS...]
set -euo pipefail
shardprop=$1 make_blobs=$2 tool=$3
shift 3
mpirun=("$@")
work=$(mktemp -d)
trap 'pkill -KILL -f "$work/" 2>/dev/null || true; rm -rf "$work"' EXIT
python=/usr/bin/python3  # Debian's, with h5py

"$make_blobs" "$work/train.h5" "$work/test.h5"
common=(--train "$work/train.h5" --layers 10,32:relu,16:tanh,4:softmax --batch 48 --epochs 4
        --lr 0.05 --lr-schedule cosine --momentum 0.9 --weight-decay 1e-4 --seed 7)
train() { "${mpirun[@]}" -np "$1" "$shardprop" train "${@:2}"; }

train 2 "${common[@]}" --save "$work/straight.h5" > /dev/null
# 42 batches per epoch; stop at step 59, in the middle of the second epoch.
train 2 "${common[@]}" --checkpoint-dir "$work/ck" --checkpoint-every-steps 25 \
  --stop-at-step 59 > "$work/first.txt"
ls "$work/ck"
test "$(cat "$work/ck/latest")" = ckpt-000000059.h5
test "$(ls "$work/ck" | grep -c '^ckpt-')" = 3   # 25, 50 and the stop at 59
"$python" "$tool" verify "$work/ck/ckpt-000000059.h5"

# Same ranks: bitwise. Flags not given come from the checkpoint, the checkpoint cadence
# among them: resumed from a copy of the directory, the run goes on writing every 25 steps
# into it and keeps 3.
cp -a "$work/ck" "$work/ck2"
train 2 --resume "$work/ck2" --save "$work/again2.h5" | tee "$work/resume2.txt"
grep -q "resume .*ckpt-000000059.h5: step 59, epoch 2, batch 17 of 42; written by 2 ranks" "$work/resume2.txt"
grep -q "restored .*--train $work/train.h5 .*--checkpoint-dir $work/ck2 --checkpoint-every-steps 25" "$work/resume2.txt"
grep -q "checkpoint $work/ck2, every 25 steps, at the end; keeping 3" "$work/resume2.txt"
test "$(ls "$work/ck2" | tr '\n' ' ')" = "ckpt-000000125.h5 ckpt-000000150.h5 ckpt-000000168.h5 latest "
"$python" "$tool" same "$work/straight.h5" "$work/again2.h5"

# Three ranks: the same global batches, sums in another order (see checkpoint_test.cpp).
train 3 --train "$work/train.h5" --resume "$work/ck/ckpt-000000059.h5" --lr 0.05 \
  --save "$work/again3.h5" > /dev/null
"$python" "$tool" close "$work/straight.h5" "$work/again3.h5" 1e-5

# A flag that may change is applied and logged.
train 2 --train "$work/train.h5" --resume "$work/ck/ckpt-000000050.h5" --epochs 5 \
  --lr 0.02 --stop-at-step 51 > "$work/changed.txt"
grep -q "changed    --epochs 5 (checkpoint: 4)" "$work/changed.txt"
grep -q "changed    --lr 0.02 (checkpoint: 0.05)" "$work/changed.txt"

# Every epoch (42 steps), and --max-steps 0 writes the initial model.
train 2 "${common[@]}" --epochs 2 --checkpoint-dir "$work/epochs" --checkpoint-every-epochs 1 > /dev/null
test "$(ls "$work/epochs" | tr '\n' ' ')" = "ckpt-000000042.h5 ckpt-000000084.h5 latest "
train 2 "${common[@]}" --max-steps 0 --checkpoint-dir "$work/zero" > /dev/null
"$shardprop" info "$work/zero/ckpt-000000000.h5" | grep -q "position   step 0: epoch 1 of 4, next batch 0 of 42"

# --resume auto starts a new run in an empty --checkpoint-dir and continues one that has a
# checkpoint; a requeued job script can always pass it.
train 2 "${common[@]}" --checkpoint-dir "$work/auto" --resume auto --stop-at-step 30 > "$work/auto1.txt"
grep -q "no checkpoint in $work/auto yet: starting a new run" "$work/auto1.txt"
train 2 "${common[@]}" --checkpoint-dir "$work/auto" --resume auto --save "$work/auto.h5" > "$work/auto2.txt"
grep -q "resume .*ckpt-000000030.h5: step 30" "$work/auto2.txt"
"$python" "$tool" same "$work/straight.h5" "$work/auto.h5"

# Using a checkpoint: eval (with and without mpirun), predict (HDF5 and CSV), info.
"$shardprop" eval --checkpoint "$work/again2.h5" --data "$work/test.h5" > "$work/eval1.json"
"${mpirun[@]}" -np 3 "$shardprop" eval --checkpoint "$work/again2.h5" --data "$work/test.h5" \
  > "$work/eval3.json"
"$shardprop" predict --checkpoint "$work/again2.h5" --data "$work/test.h5" --out "$work/p.h5"
"${mpirun[@]}" -np 2 "$shardprop" predict --checkpoint "$work/again2.h5" --data "$work/test.h5" \
  --out "$work/p.csv"
"$shardprop" info "$work/again2.h5" | tee "$work/info.txt"
grep -q "checksum   crc32 .*, verified" "$work/info.txt"
"$python" - "$work" <<'PY'
import json, sys
import h5py, numpy as np
w = sys.argv[1]
e1, e3 = (json.load(open(f"{w}/{n}")) for n in ("eval1.json", "eval3.json"))
assert e1["samples"] == e3["samples"] == 500 and e1["accuracy"] == e3["accuracy"], (e1, e3)
with h5py.File(f"{w}/p.h5") as p, h5py.File(f"{w}/test.h5") as t:
    pred, out, labels = p["predictions"][()], p["outputs"][()], t["labels"][()]
assert pred.shape == (500,) and out.shape == (500, 4)
assert np.allclose(out.sum(axis=1), 1, atol=1e-5) and (pred == out.argmax(axis=1)).all()
accuracy = float((pred == labels).mean())
assert accuracy == e1["accuracy"], (accuracy, e1)
csv = np.loadtxt(f"{w}/p.csv", delimiter=",", skiprows=1)
assert (csv[:, 0] == pred).all() and np.allclose(csv[:, 1:], out, rtol=1e-6)
print(f"eval, predict and info agree: accuracy {accuracy:.4f}")
PY

# Contradicting flags name both values; every rank exits, nothing in the directory changes.
before=$(ls -l --time-style=+%s.%N "$work/ck" | md5sum)
expect_fail() {
  local fragment=$1
  shift
  if timeout 60 "${mpirun[@]}" -np 2 "$shardprop" "$@" > "$work/err.txt" 2>&1; then
    echo "FAIL: succeeded: $*"; exit 1
  fi
  grep -qF -- "$fragment" "$work/err.txt" || { echo "FAIL: '$fragment' not in:"; cat "$work/err.txt"; exit 1; }
  echo "ok: $(grep -F -- "$fragment" "$work/err.txt" | head -1)"
}
expect_fail "--layers 10,8:relu,4:softmax contradicts the checkpoint's 10,32:relu,16:tanh,4:softmax" \
  train --train "$work/train.h5" --resume "$work/ck" --layers 10,8,4
expect_fail "--batch 64 contradicts the checkpoint's 48" train --train "$work/train.h5" --resume "$work/ck" --batch 64
expect_fail "--optimizer adam contradicts the checkpoint's sgd" train --train "$work/train.h5" --resume "$work/ck" --optimizer adam
expect_fail "test.h5: 500 samples of 10 features, but the checkpoint was trained on 2000 of 10" train --train "$work/test.h5" --resume "$work/ck"
expect_fail "--resume $work/nothing: no such file or directory" train --train "$work/train.h5" --resume "$work/nothing"
expect_fail "need --checkpoint-dir" train --train "$work/train.h5" --layers 10,4 --checkpoint-every-steps 5
expect_fail "--out $work/p.txt: name a .h5 or .csv file" predict --checkpoint "$work/again2.h5" --data "$work/test.h5" --out "$work/p.txt"
test "$before" = "$(ls -l --time-style=+%s.%N "$work/ck" | md5sum)"

# Outputs never replace a file they did not write: not the training set, not the test set.
data_sum=$(md5sum "$work/train.h5" "$work/test.h5")
expect_fail "--save $work/train.h5: exists and is not a file this command writes; not overwriting it" \
  train --train "$work/train.h5" --layers 10,4 --save "$work/train.h5"
expect_fail "--out $work/test.h5: exists and is not a file this command writes" \
  predict --checkpoint "$work/again2.h5" --data "$work/test.h5" --out "$work/test.h5"
expect_fail "--save $work/nodir/m.h5: directory $work/nodir does not exist" \
  train --train "$work/train.h5" --layers 10,4 --save "$work/nodir/m.h5"
test "$data_sum" = "$(md5sum "$work/train.h5" "$work/test.h5")"
# ... while their own files are replaced.
"$shardprop" predict --checkpoint "$work/again2.h5" --data "$work/test.h5" --out "$work/p.h5" > /dev/null

# SIGKILL: every rank of a run that checkpoints every 5 steps is killed once at least two
# checkpoints exist; the newest verifies and 3 ranks finish the run from it.
slow=(--train "$work/train.h5" --layers 10,256:relu,256:relu,4:softmax --batch 48 --epochs 6
      --lr 0.02 --seed 9)
train 2 "${slow[@]}" --save "$work/slow_straight.h5" > /dev/null
setsid "${mpirun[@]}" -np 2 "$shardprop" train "${slow[@]}" --checkpoint-dir "$work/killed" \
  --checkpoint-every-steps 5 > "$work/killed.txt" 2>&1 &
job=$!
for _ in $(seq 1 3000); do
  [ "$(ls "$work/killed" 2>/dev/null | grep -c '^ckpt-.*\.h5$')" -ge 2 ] && break
  sleep 0.01
done
pkill -KILL -f "^$shardprop train .*$work/killed" || true  # the ranks, not mpirun
wait "$job" && { echo "FAIL: the killed run exited 0"; exit 1; }
newest=$(ls "$work/killed" | grep '^ckpt-.*\.h5$' | sort | tail -1)
echo "killed; newest checkpoint $newest, left behind: $(ls "$work/killed" | tr '\n' ' ')"
"$python" "$tool" verify "$work/killed/$newest"
train 3 --train "$work/train.h5" --resume "$work/killed" --checkpoint-dir "$work/killed" \
  --save "$work/slow_resumed.h5" > "$work/resumed.txt"
grep -q "resume .*$newest" "$work/resumed.txt"
"$python" "$tool" close "$work/slow_straight.h5" "$work/slow_resumed.h5" 1e-4
echo "e2e_resume: all checks passed"
