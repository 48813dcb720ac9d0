#!/usr/bin/env bash
# The main job: installs the dependencies, builds shardprop, converts Fashion-MNIST from
# Debian's dataset-fashion-mnist package to HDF5 and trains
# 784,512:relu:dropout=0.2,256:relu:dropout=0.2,10:softmax on it with `mpirun -np 2` for 40
# epochs: SGD with momentum, 500 warmup steps, cosine decay and weight decay. The last line
# gives the final test accuracy and the training's wall time.
# Environment: RANKS (2), EPOCHS (40), DATA_DIR (build/fashion-mnist). Extra arguments go to
# `shardprop train` (e.g. --precision bf16).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
"$root/scripts/setup-deps.sh"
"$root/scripts/build.sh"

src=/usr/share/datasets/fashion-mnist
data=${DATA_DIR:-$build/fashion-mnist}
mkdir -p "$data"
for part in train:train t10k:test; do
  from=${part%%:*} to=${part##*:}
  if [ ! -s "$data/$to.h5" ]; then
    "$build/apps/shardprop" convert --images "$src/$from-images-idx3-ubyte.gz" \
      --labels "$src/$from-labels-idx1-ubyte.gz" --out "$data/$to.h5.tmp"
    mv "$data/$to.h5.tmp" "$data/$to.h5"
  fi
done

# Every demo run is a new run: the previous run's checkpoints (the demo's own output) go.
rm -rf "$build/fashion-mnist-checkpoints"
progress=never
[ -t 1 ] && progress=always
start=$(date +%s%N)
"$root/scripts/mpirun.sh" "${RANKS:-2}" "$build/apps/shardprop" train \
  --train "$data/train.h5" --test "$data/test.h5" \
  --layers 784,512:relu:dropout=0.2,256:relu:dropout=0.2,10:softmax --loss xent \
  --batch 128 --epochs "${EPOCHS:-40}" --lr 0.05 --warmup-steps 500 --lr-schedule cosine \
  --momentum 0.9 --weight-decay 0.0001 --seed 1 \
  --metrics "$build/fashion-mnist.jsonl" --progress "$progress" \
  --checkpoint-dir "$build/fashion-mnist-checkpoints" --checkpoint-every-epochs 5 "$@"
tenths=$((($(date +%s%N) - start) / 100000000))

echo "metrics: $build/fashion-mnist.jsonl"
echo "model:   $build/fashion-mnist-checkpoints/$(cat "$build/fashion-mnist-checkpoints/latest")"
if /usr/bin/python3 "$root/scripts/plot-metrics.py" "$build/fashion-mnist.jsonl" \
    --out "$build/fashion-mnist.png"; then
  echo "curves:  $build/fashion-mnist.png"
fi
accuracy=$(tail -n 1 "$build/fashion-mnist.jsonl" | sed -E 's/.*"test_acc":([^,]*),.*/\1/')
printf 'test accuracy %.4f after %s epochs, wall time %d.%d s (mpirun included)\n' \
  "$accuracy" "${EPOCHS:-40}" $((tenths / 10)) $((tenths % 10))
