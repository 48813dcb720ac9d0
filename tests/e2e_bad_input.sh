#!/usr/bin/env bash
# Bad input under `mpirun -np 2`: every case must end with the expected status (2 for a
# usage error: a bad flag, value or combination; 1 for a runtime failure: a bad file, a
# mismatch with the data, a full disk), print exactly one "shardprop: error:" line that holds
# the expected words (the file, flag or value), leave no rank running 10 s after it started,
# and leave the checkpoints already saved untouched.
# usage: e2e_bad_input.sh SHARDPROP MAKE_BLOBS MPIEXEC [MPIEXEC FLAGS...]
set -euo pipefail
shardprop=$1 make_blobs=$2
shift 2
mpirun=("$@")
work=$(mktemp -d)
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do umount "$m" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

"$make_blobs" train.h5 test.h5  # 2,000 and 500 samples of 10 features, 4 classes
/usr/bin/python3 - <<'PY'
import h5py, numpy as np
rng = np.random.default_rng(5)
x = rng.standard_normal((40, 10)).astype(np.float32)
y = (np.arange(40) % 4).astype(np.int32)
def make(name, **datasets):
    with h5py.File(name, "w") as f:
        for key, value in datasets.items():
            f[key] = value
make("no_features.h5", labels=y)
make("no_labels.h5", features=x)
make("features_3d.h5", features=x.reshape(40, 5, 2), labels=y)
make("features_int.h5", features=(x * 10).astype(np.int32), labels=y)
make("labels_float.h5", features=x, labels=y.astype(np.float32))
make("labels_2d.h5", features=x, labels=y.reshape(20, 2))
make("empty.h5", features=np.zeros((0, 10), np.float32), labels=np.zeros(0, np.int32))
make("label_high.h5", features=x, labels=np.where(np.arange(40) == 17, 4, y).astype(np.int32))
# In the second rank's block: partitioned (the default), only rank 1 reads it.
make("label_high_late.h5", features=x, labels=np.where(np.arange(40) == 33, 7, y).astype(np.int32))
make("label_negative.h5", features=x, labels=np.where(np.arange(40) == 3, -1, y).astype(np.int32))
nan = x.copy(); nan[12, 7] = np.nan
make("nan.h5", features=nan, labels=y)
inf = x.copy(); inf[30, 2] = -np.inf
make("inf.h5", features=inf, labels=y)
make("wide.h5", features=rng.standard_normal((40, 12)).astype(np.float32), labels=y)
open("not_hdf5.h5", "w").write("features,labels\n1,2\n")
PY

# The checkpoints every case must leave alone: a finished run of 10,16,4.
"${mpirun[@]}" -np 2 "$shardprop" train --train train.h5 --layers 10,16,4 --batch 50 \
  --max-steps 6 --checkpoint-dir ck --checkpoint-every-steps 2 > /dev/null
snapshot() { (cd ck && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
snapshot > ck.sha256
[ "$(ls ck | grep -c '^ckpt-')" -eq 3 ] || { echo "FAIL: fixture has no 3 checkpoints"; exit 1; }

failures=0
# expect_fail STATUS FRAGMENT... -- ARGS...: runs `shardprop ARGS` on 2 ranks and checks the
# above.
expect_fail() {
  local expected=$1
  shift
  local fragments=()
  while [ "$1" != "--" ]; do fragments+=("$1"); shift; done
  shift
  local start end status=0
  start=$(date +%s%N)
  timeout 60 "${mpirun[@]}" -np 2 "$shardprop" "$@" > out.txt 2>&1 || status=$?
  end=$(date +%s%N)
  local seconds=$(((end - start) / 1000000000))
  local errors
  errors=$(grep -c "^shardprop: error:" out.txt || true)
  local line
  line=$(grep -m1 "^shardprop: error:" out.txt || true)
  local problem=""
  [ "$status" -eq "$expected" ] || problem="exit status $status, expected $expected"
  [ "$status" -ne 124 ] || problem="still running after 60 s"
  [ "$seconds" -le 10 ] || problem="took ${seconds} s"
  [ "$errors" -eq 1 ] || problem="$errors error lines"
  for f in "${fragments[@]}"; do
    case $line in *"$f"*) ;; *) problem="'$f' not in the error line" ;; esac
  done
  if grep -qE "terminate called|HDF5-DIAG|Segmentation|Backtrace|core dumped" out.txt; then
    problem="a crash or library trace in the output"
  fi
  local pid  # this test's ranks are the ones working in $work (others may run beside it)
  for pid in $(pgrep -f "^$shardprop " || true); do
    [ "$(readlink "/proc/$pid/cwd" 2> /dev/null)" != "$work" ] || problem="a rank is still running"
  done
  if ! snapshot | cmp -s - ck.sha256; then problem="the saved checkpoints changed"; fi
  if [ -n "$problem" ]; then
    echo "FAIL ($problem): shardprop $*"
    sed 's/^/    /' out.txt
    failures=$((failures + 1))
  else
    echo "ok  ${seconds}s  shardprop $* -> ${line#shardprop: error: }"
  fi
}

t=(train --train train.h5 --layers 10,16,4 --batch 50 --epochs 2)
# Files.
expect_fail 1 missing.h5 "no such file" -- train --train missing.h5 --layers 10,4
expect_fail 1 not_hdf5.h5 "not an HDF5 file" -- train --train not_hdf5.h5 --layers 10,4
expect_fail 1 test_missing.h5 "no such file" -- "${t[@]}" --test test_missing.h5
expect_fail 1 no_features.h5 "no dataset 'features'" -- train --train no_features.h5 --layers 10,4
expect_fail 1 no_labels.h5 labels targets -- train --train no_labels.h5 --layers 10,4
expect_fail 1 features_3d.h5 "must be 2-D" -- train --train features_3d.h5 --layers 10,4
expect_fail 1 features_int.h5 "must hold floats" -- train --train features_int.h5 --layers 10,4
expect_fail 1 labels_float.h5 "must hold integers" -- train --train labels_float.h5 --layers 10,4
expect_fail 1 labels_2d.h5 "must be 1-D" -- train --train labels_2d.h5 --layers 10,4
expect_fail 1 empty.h5 "N = 0" -- train --train empty.h5 --layers 10,4
expect_fail 1 label_high.h5 "label 4 at row 17" -- train --train label_high.h5 --layers 10,4
expect_fail 1 label_high_late.h5 "label 7 at row 33" -- train --train label_high_late.h5 --layers 10,4
expect_fail 1 label_high_late.h5 "label 7 at row 33" -- train --train label_high_late.h5 --layers 10,4 --data-placement replicated
expect_fail 1 label_high_late.h5 "label 7 at row 33" -- train --train train.h5 --test label_high_late.h5 --layers 10,4
expect_fail 1 label_negative.h5 "negative label -1" -- train --train label_negative.h5 --layers 10,4
expect_fail 1 nan.h5 "non-finite value nan at row 12" -- train --train nan.h5 --layers 10,4
expect_fail 1 inf.h5 "non-finite value -inf at row 30" -- train --train inf.h5 --layers 10,4
expect_fail 1 train.h5 "10 features per sample, but the model (--layers 12,16:relu,4:softmax) takes 12" -- \
  train --train train.h5 --layers 12,16,4
expect_fail 1 wide.h5 "12 features per sample" "takes 10" -- \
  train --train train.h5 --test wide.h5 --layers 10,4
# Sizes and numbers.
expect_fail 2 "--batch 1 is smaller than the number of ranks" -- "${t[@]}" --batch 1
expect_fail 2 "--batch 5000" "larger than the training set" -- "${t[@]}" --batch 5000
for flag in --lr --epochs --batch --threads; do
  for value in 0 -1; do
    expect_fail 2 "$flag" "$value" -- "${t[@]}" "$flag" "$value"
  done
done
expect_fail 2 "--lr" "abc" -- "${t[@]}" --lr abc
expect_fail 2 "--momentum" "1.5" -- "${t[@]}" --momentum 1.5
expect_fail 2 "--collective-timeout" "-3" -- "${t[@]}" --collective-timeout -3
expect_fail 2 "--chunk" "0" -- "${t[@]}" --deterministic --chunk 0
expect_fail 2 "--chunk needs --deterministic" -- "${t[@]}" --chunk 8
# --layers and --loss.
expect_fail 2 "--layers" "empty" -- train --train train.h5 --layers ""
expect_fail 2 "--layers" "width 0" -- train --train train.h5 --layers 10,0,4
expect_fail 2 "unknown activation 'gelu'" -- train --train train.h5 --layers 10,8:gelu,4
expect_fail 2 "--layers" "at least" -- train --train train.h5 --layers 10
expect_fail 2 "--layers" "x" -- train --train train.h5 --layers 10,x,4
expect_fail 2 "--loss mse does not fit" softmax -- train --train train.h5 --layers 10,4 --loss mse
expect_fail 2 "--loss bce does not fit" -- train --train train.h5 --layers 10,4:relu --loss bce
expect_fail 2 "--loss" "hinge" -- train --train train.h5 --layers 10,4 --loss hinge
# Flags.
expect_fail 2 "--bogus" -- "${t[@]}" --bogus 1
expect_fail 2 "unknown command 'trian'" -- trian --train train.h5
expect_fail 2 "--train is required" -- train --layers 10,4
# Checkpoints.
expect_fail 2 "--checkpoint-dir ck already holds checkpoints" "--resume ck" -- \
  "${t[@]}" --checkpoint-dir ck
expect_fail 2 "--layers 10,32:relu,4:softmax contradicts the checkpoint's 10,16:relu,4:softmax" -- \
  train --train train.h5 --layers 10,32,4 --resume ck
expect_fail 2 "--batch 60 contradicts the checkpoint's 50" -- train --train train.h5 --batch 60 --resume ck
expect_fail 1 "test.h5" "the checkpoint was trained on 2000" -- train --train test.h5 --resume ck
expect_fail 1 "ck/latest" -- train --train train.h5 --resume ck/latest
expect_fail 1 "train.h5" "missing attribute 'format'" -- train --train train.h5 --resume train.h5
touch file
expect_fail 1 "--checkpoint-dir file/sub" -- "${t[@]}" --checkpoint-dir file/sub
if [ "$(id -u)" -eq 0 ] && mkdir -p ro && mount -t tmpfs -o ro,size=1m tmpfs ro 2> /dev/null; then
  mounts+=("$work/ro")
  expect_fail 1 "--checkpoint-dir ro" "not writable" "Read-only file system" -- \
    "${t[@]}" --checkpoint-dir ro
  expect_fail 1 "--checkpoint-dir ro/sub" "Read-only file system" -- \
    "${t[@]}" --checkpoint-dir ro/sub
elif [ "$(id -u)" -ne 0 ]; then
  mkdir -p ro && chmod 555 ro
  expect_fail 1 "--checkpoint-dir ro" "not writable" -- "${t[@]}" --checkpoint-dir ro
else
  echo "skip: cannot mount a read-only tmpfs"
fi
expect_fail 2 "--save ck/missing/m.h5" -- "${t[@]}" --save ck/missing/m.h5
expect_fail 2 "--save train.h5" -- "${t[@]}" --save train.h5

# eval and predict.
expect_fail 1 "test.h5" "missing attribute 'format'" -- eval --checkpoint test.h5 --data test.h5
expect_fail 1 "wide.h5" "12 features per sample" -- eval --checkpoint ck/ckpt-000000006.h5 --data wide.h5
expect_fail 2 "--out p.txt" ".h5 or .csv" -- predict --checkpoint ck/ckpt-000000006.h5 --data test.h5 --out p.txt

# A full disk: a tmpfs with room for one checkpoint of a 10,256,256,4 net (576 KB) but not
# two. The write of the second fails naming the cause; the first survives and verifies.
if [ "$(id -u)" -eq 0 ] && mkdir -p full && mount -t tmpfs -o size=800k tmpfs full 2> /dev/null; then
  mounts+=("$work/full")
  big=(train --train train.h5 --layers 10,256,256,4 --batch 50 --checkpoint-dir full/ck
       --checkpoint-every-steps 5)
  expect_fail 1 "full/ck/ckpt-000000010.h5.tmp" "No space left on device" -- "${big[@]}"
  [ "$(cat full/ck/latest)" = ckpt-000000005.h5 ] || { echo "FAIL: latest moved"; failures=$((failures + 1)); }
  [ "$(ls full/ck)" = "$(printf 'ckpt-000000005.h5\nlatest')" ] ||
    { echo "FAIL: full/ck holds $(ls full/ck | tr '\n' ' ')"; failures=$((failures + 1)); }
  "$shardprop" info full/ck/ckpt-000000005.h5 | grep -q "checksum   crc32 [0-9a-f]*, verified" ||
    { echo "FAIL: the surviving checkpoint does not verify"; failures=$((failures + 1)); }
  # And a resume into the full directory fails the same way without losing it.
  expect_fail 1 "full/ck/ckpt-000000009.h5.tmp" "No space left on device" -- \
    train --train train.h5 --resume full/ck --checkpoint-dir full/ck --stop-at-step 9
  "$shardprop" info full/ck/ckpt-000000005.h5 > /dev/null ||
    { echo "FAIL: the surviving checkpoint was damaged"; failures=$((failures + 1)); }
else
  echo "skip: the full-disk case needs root to mount a small tmpfs"
fi

if [ "$failures" -ne 0 ]; then
  echo "e2e_bad_input: $failures case(s) failed"
  exit 1
fi
echo "e2e_bad_input: all cases passed"
