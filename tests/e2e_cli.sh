#!/usr/bin/env bash
# The command line as a user meets it: commands that take a checkpoint take a checkpoint
# directory too; `info` describes every file shardprop reads or writes; unlabeled CSV goes
# through convert and predict; errors of a single process are one line without Open MPI's
# abort banner; --threads above the cores mpirun gave a rank is honoured and said; the
# progress line shows samples/s and ETAs; the header's grammar.
# usage: e2e_cli.sh SHARDPROP MAKE_BLOBS MPIEXEC [MPIEXEC FLAGS...]
# shellcheck source=tests/e2e_lib.sh
. "$(dirname "$0")/e2e_lib.sh"
cd "$work"

"$make_blobs" train.h5 test.h5
"${mpirun[@]}" -np 2 "$shardprop" train --train train.h5 --test test.h5 --layers 10,16,4 \
  --batch 50 --epochs 2 --checkpoint-dir ck --checkpoint-every-epochs 1 --metrics m.jsonl \
  --progress always > run.txt
grep -q "batch      50 global (25 per rank), 40 steps per epoch, 2 epochs" run.txt ||
  fail "header: $(grep batch run.txt)"
grep -qE "epoch 1/2 \[#+ *\] [0-9]+/40 loss [0-9.]+  lr [0-9.e-]+  [0-9,]+ samples/s  ETA epoch [0-9]+:[0-9]{2}, run [0-9]+:[0-9]{2}" run.txt ||
  fail "no progress line with samples/s and ETAs"
echo "ok: header and progress line"

# One rank: no split to speak of; one epoch is "1 epoch".
"$shardprop" train --train train.h5 --layers 10,16,4 --batch 50 --epochs 1 > one.txt
grep -q "batch      50 global, 40 steps per epoch, 1 epoch$" one.txt || fail "one rank: $(grep batch one.txt)"
echo "ok: one rank's header"

# A checkpoint directory wherever a checkpoint is taken: its newest valid file.
"$shardprop" eval --checkpoint ck --data test.h5 > eval_dir.json
"$shardprop" eval --checkpoint ck/ckpt-000000080.h5 --data test.h5 > eval_file.json
cmp eval_dir.json eval_file.json || fail "eval of the directory differs from its newest file"
"${mpirun[@]}" -np 2 "$shardprop" predict --checkpoint ck --data test.h5 --out p.h5 > /dev/null
"$shardprop" info ck > info_dir.txt
grep -q "ck: checkpoint directory, 2 checkpoints, newest ckpt-000000080.h5, latest names ckpt-000000080.h5" info_dir.txt ||
  fail "info of the directory: $(head -1 info_dir.txt)"
grep -q "checksum   crc32 .*, verified" info_dir.txt || fail "info of the directory does not verify"
echo "ok: directories for eval, predict and info"

# Unlabeled CSV: convert --label-column none, predict from the CSV and from its HDF5.
/usr/bin/python3 - <<'PY'
import h5py, numpy as np
with h5py.File("test.h5") as f:
    x = f["features"][()]
np.savetxt("unlabeled.csv", x[:120], delimiter=",", fmt="%.9g",
           header=",".join(f"f{i}" for i in range(x.shape[1])), comments="")
PY
"$shardprop" convert --csv unlabeled.csv --label-column none --out unlabeled.h5 > convert.txt
grep -q "unlabeled.h5: 120 samples x 10 features, no labels" convert.txt || fail "$(cat convert.txt)"
"$shardprop" predict --checkpoint ck --data unlabeled.csv --out from_csv.csv > /dev/null
"$shardprop" predict --checkpoint ck --data unlabeled.h5 --out from_h5.csv > /dev/null
cmp from_csv.csv from_h5.csv || fail "predictions from the CSV and from its HDF5 differ"
echo "ok: unlabeled CSV round trip"

# info reads every file shardprop reads or writes.
check_info() {
  local file=$1 expected=$2
  "$shardprop" info "$file" > info.txt || fail "info $file: status $?: $(cat info.txt)"
  grep -q -- "$expected" info.txt || fail "info $file: '$expected' not in: $(cat info.txt)"
}
check_info train.h5 "train.h5: data set, 2,000 samples x 10 features, labels 0..3 (4 classes)"
check_info train.h5 "stored     features contiguous (row after row), file 0.1 MB"
/usr/bin/python3 -c "
import h5py
with h5py.File('train.h5') as f, h5py.File('chunked.h5', 'w') as out:
    out.create_dataset('features', data=f['features'][:], chunks=(50, 10))
    out['labels'] = f['labels'][:]
"
check_info chunked.h5 "stored     features in chunks of 50 rows"
check_info unlabeled.h5 "no labels or targets"
check_info unlabeled.csv "unlabeled.csv: data set, 120 samples x 10 features"
check_info p.h5 "p.h5: predictions of 500 samples, 4 outputs each"
check_info from_csv.csv "from_csv.csv: predictions of 120 samples, 4 outputs each"
check_info m.jsonl "m.jsonl: training metrics, 2 rows"
check_info ck/latest "names the newest checkpoint of its directory, ckpt-000000080.h5"
check_info ck/ckpt-000000040.h5 "position   step 40: epoch 2 of 2, next batch 0 of 40"
echo "ok: info on data, predictions, metrics and checkpoints"

# A single process that fails says so in one line, without Open MPI's abort banner.
single() {
  local expected=$1 fragment=$2
  shift 2
  local status=0
  "$shardprop" "$@" > out.txt 2>&1 || status=$?
  [ "$status" -eq "$expected" ] || fail "$*: status $status, expected $expected: $(cat out.txt)"
  [ "$(wc -l < out.txt)" -eq 1 ] || fail "$*: not one line: $(cat out.txt)"
  grep -q "^shardprop: error: .*$fragment" out.txt || fail "$*: '$fragment' not in $(cat out.txt)"
  echo "ok: $* -> $(cat out.txt)"
}
single 1 "missing.csv: cannot open" convert --csv missing.csv --out x.h5
single 1 "missing.h5: no such file" info missing.h5
single 1 "test.h5: missing attribute 'format'" eval --checkpoint test.h5 --data test.h5
single 2 "--label-column: 'first' is neither" convert --csv unlabeled.csv --label-column first --out x.h5
single 2 "--optimizer: 'rmsprop' is not one of sgd,adam" train --train train.h5 --optimizer rmsprop
single 2 "--lr-schedule: 'exponential' is not one of constant,cosine,step,multistep,linear" train --train train.h5 --lr-schedule exponential
single 2 "--lr-milestones '30,20': the epochs must increase (30 then 20)" train --train train.h5 --lr-schedule multistep --lr-milestones 30,20
single 2 "--layers: dropout 1 in '16:relu:dropout=1' must be >= 0 and < 1" train --train train.h5 --layers 10,16:relu:dropout=1,4
single 2 "--val-fraction: must be >= 0 and < 1, got '1.5'" train --train train.h5 --val-fraction 1.5
single 2 "--early-stop-patience and --monitor need a validation set" train --train train.h5 --early-stop-patience 3
single 2 "--accumulate 3 does not divide --batch 256 into equal micro-batches" train --train train.h5 --accumulate 3

# --threads above the cores mpirun gave each rank: honoured, and the header says so.
bound=()
for ((i = 0; i < ${#mpirun[@]}; i++)); do  # the test's mpirun flags, but bound to one core
  if [ "${mpirun[i]}" = --bind-to ]; then i=$((i + 1)); else bound+=("${mpirun[i]}"); fi
done
"${bound[@]}" --bind-to core -np 1 "$shardprop" train --train train.h5 --layers 10,16,4 \
  --batch 50 --epochs 1 --threads 3 > threads.txt 2>&1 || fail "--threads 3: $(cat threads.txt)"
grep -q "shardprop train: 1 rank x 3 threads per rank" threads.txt || fail "$(head -2 threads.txt)"
grep -q "note       3 threads on 1 core per rank" threads.txt || fail "no note: $(head -3 threads.txt)"
echo "ok: --threads 3 on 1 core is honoured and said"
echo "e2e_cli: all checks passed"
