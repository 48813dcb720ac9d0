#!/usr/bin/env bash
# End to end: `train --deterministic` under mpirun ends with the same bits, and prints the same
# metrics, on 1 to 4 ranks with 1 or 2 threads each, under forced allreduce algorithms, and
# when a checkpoint written by P ranks is resumed by Q ranks, whether each rank holds all
# of the data, its block of it or streams it from the file. The default mode on 3 ranks
# does not match 1 rank's bits, which shows the comparison can fail.
# usage: e2e_deterministic.sh SHARDPROP MAKE_BLOBS CHECKPOINT_TOOL MPIEXEC [MPIEXEC FLAGS...]
set -euo pipefail
shardprop=$1 make_blobs=$2 tool=$3
shift 3
mpirun=("$@")
work=$(mktemp -d)
trap 'pkill -KILL -f "$work/" 2>/dev/null || true; rm -rf "$work"' EXIT
python=/usr/bin/python3  # Debian's, with h5py

"$make_blobs" "$work/train.h5" "$work/test.h5"
# 2000 samples in batches of 48 (6 chunks of 8): 42 steps per epoch, the last of 32 samples.
plain=(--train "$work/train.h5" --test "$work/test.h5" --layers 10,32:relu,16:tanh,4:softmax
       --batch 48 --epochs 3 --lr 0.05 --lr-schedule cosine --momentum 0.9 --seed 5
       --progress never)
common=("${plain[@]}" --deterministic --chunk 8)
train() { "${mpirun[@]}" -np "$1" "$shardprop" train "${@:2}"; }
# The metrics without the timings and the run's shape, which differ by design.
metrics() { sed -E 's/"samples_per_s":[^,]*,"epoch_seconds":[^,]*,"ranks":[0-9]+,"threads":[0-9]+//' "$1"; }

train 1 "${common[@]}" --threads 1 --save "$work/ref.h5" --metrics "$work/ref.jsonl" > /dev/null
for np in 1 2 3 4; do
  for threads in 1 2; do
    name=np${np}_t${threads}
    train "$np" "${common[@]}" --threads "$threads" --save "$work/$name.h5" \
      --metrics "$work/$name.jsonl" > /dev/null
    "$python" "$tool" same "$work/ref.h5" "$work/$name.h5"
    diff <(metrics "$work/ref.jsonl") <(metrics "$work/$name.jsonl")
  done
done

# Every rank holding every row (replicated), or reading each step's rows from the file
# (streamed), gives the bits of each holding its block of the training and test sets
# (partitioned, the default on more than one rank, as above).
for placement in replicated streamed; do
  for np in 1 2 3; do
    train "$np" "${common[@]}" --threads 1 --data-placement "$placement" \
      --save "$work/$placement$np.h5" --metrics "$work/$placement$np.jsonl" > /dev/null
    "$python" "$tool" same "$work/ref.h5" "$work/$placement$np.h5"
    diff <(metrics "$work/ref.jsonl") <(metrics "$work/$placement$np.jsonl")
  done
done

# Open MPI's allreduce algorithms, forced: blocking collectives (no --collective-timeout) go
# through coll_tuned, the gradient's nonblocking ones through coll_libnbc. The runs above
# reduce through node memory (one node); these reduce through MPI.
for algorithms in "4 1" "3 4" "6 3" "1 2"; do
  read -r tuned nbc <<< "$algorithms"
  "${mpirun[@]}" -np 4 --mca coll_tuned_use_dynamic_rules 1 \
    --mca coll_tuned_allreduce_algorithm "$tuned" --mca coll_libnbc_iallreduce_algorithm "$nbc" \
    "$shardprop" train "${common[@]}" --threads 1 --collective-timeout 0 --reduction mpi \
    --save "$work/alg$tuned$nbc.h5" > /dev/null
  "$python" "$tool" same "$work/ref.h5" "$work/alg$tuned$nbc.h5"
done

# eval of a deterministic model: the same numbers on 1 and 3 ranks, and those of training's
# last test evaluation.
"${mpirun[@]}" -np 1 "$shardprop" eval --checkpoint "$work/ref.h5" --data "$work/test.h5" > "$work/eval1.json"
"${mpirun[@]}" -np 3 "$shardprop" eval --checkpoint "$work/ref.h5" --data "$work/test.h5" > "$work/eval3.json"
diff "$work/eval1.json" "$work/eval3.json"
grep -q "\"test_loss\":$(sed -E 's/.*"loss":([^,]*),.*/\1/' "$work/eval1.json")," "$work/ref.jsonl"
# predict: the same probabilities on one core (one oneTBB thread) and on all of them.
"$shardprop" predict --checkpoint "$work/ref.h5" --data "$work/test.h5" --out "$work/all.csv" > /dev/null
taskset -c 0 "$shardprop" predict --checkpoint "$work/ref.h5" --data "$work/test.h5" \
  --out "$work/one.csv" > /dev/null
cmp "$work/all.csv" "$work/one.csv"

# A checkpoint from 3 ranks holding their blocks of the data, resumed mid-epoch on 2
# holding all of it, on 4 holding their blocks and on 1 streaming it (and with 2 threads).
train 3 "${common[@]}" --checkpoint-dir "$work/ck" --stop-at-step 59 > /dev/null
for np in 2 4 1; do
  placement=partitioned
  [ "$np" = 2 ] && placement=replicated
  [ "$np" = 1 ] && placement=streamed
  train "$np" --train "$work/train.h5" --resume "$work/ck" --threads 2 --progress never \
    --data-placement "$placement" --save "$work/resumed$np.h5" > "$work/resume$np.txt"
  if [ "$placement" = partitioned ]; then grep -q "on this rank)" "$work/resume$np.txt"; fi
  grep -q "mode       deterministic, chunks of 8 rows" "$work/resume$np.txt"
  "$python" "$tool" same "$work/ref.h5" "$work/resumed$np.h5"
done
"$shardprop" info "$work/ck/ckpt-000000059.h5" | grep -q "deterministic, chunks of 8 rows"

# The training recipe: dropout, a validation split, clipping, warmup, a multistep
# schedule and gradient accumulation keep the guarantee: the same model, best model and metrics (validation
# included) on 1 to 3 ranks, with each placement (the held-out rows travel to the ranks
# that validate them like a minibatch's), and after a resume on another rank count.
recipe=(--train "$work/train.h5" --layers 10,32:relu:dropout=0.3,16:tanh:dropout=0.1,4:softmax
        --batch 48 --epochs 4 --lr 0.2 --lr-schedule multistep --lr-milestones 2,3
        --lr-decay 0.5 --warmup-steps 10 --clip-norm 0.5 --val-fraction 0.2
        --early-stop-patience 3 --seed 5 --progress never --deterministic --chunk 8 --threads 1)
train 1 "${recipe[@]}" --checkpoint-dir "$work/r1" --metrics "$work/r1.jsonl" > /dev/null
grep -q '"val_loss":' "$work/r1.jsonl"
grep -q '"clipped_steps":[1-9]' "$work/r1.jsonl"
# With --accumulate K, P ranks give P·K ranks' bits (so 1 rank's).
for run in "2 partitioned 1" "3 replicated 1" "3 streamed 1" "2 partitioned 3" "1 streamed 2"; do
  read -r np placement micros <<< "$run"
  name=$work/r$np$placement$micros
  train "$np" "${recipe[@]}" --data-placement "$placement" --accumulate "$micros" \
    --checkpoint-dir "$name" --metrics "$name.jsonl" > /dev/null
  "$python" "$tool" same "$work/r1/$(cat "$work/r1/latest")" "$name/$(cat "$name/latest")"
  "$python" "$tool" same "$work/r1/best.h5" "$name/best.h5"
  diff <(metrics "$work/r1.jsonl") <(metrics "$name.jsonl")
done
train 3 "${recipe[@]}" --checkpoint-dir "$work/rs" --stop-at-step 50 > /dev/null
train 2 --train "$work/train.h5" --resume "$work/rs" --threads 2 --progress never > /dev/null
"$python" "$tool" same "$work/r1/$(cat "$work/r1/latest")" "$work/rs/$(cat "$work/rs/latest")"
"$shardprop" info "$work/r1/best.h5" | grep -qE "best       epoch [1-4]: val_loss"

# The control: without --deterministic, 3 ranks do not give 1 rank's bits.
train 1 "${plain[@]}" --threads 1 --save "$work/plain1.h5" > /dev/null
train 3 "${plain[@]}" --threads 1 --save "$work/plain3.h5" > /dev/null
if "$python" "$tool" same "$work/plain1.h5" "$work/plain3.h5" 2> /dev/null; then
  echo "the default mode gave identical bits on 1 and 3 ranks: the comparison proves nothing" >&2
  exit 1
fi
echo "e2e_deterministic: passed"
