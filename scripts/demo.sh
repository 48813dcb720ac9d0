#!/usr/bin/env bash
# The main job: installs the dependencies, builds shardprop, converts Fashion-MNIST from
# Debian's dataset-fashion-mnist package to HDF5 and trains
# 784,256:relu,128:relu,10:softmax on it with `mpirun -np 2` for 20 epochs.
# Environment: RANKS (2), EPOCHS (20), DATA_DIR (build/fashion-mnist). Extra arguments go to
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
"$root/scripts/mpirun.sh" "${RANKS:-2}" "$build/apps/shardprop" train \
  --train "$data/train.h5" --test "$data/test.h5" \
  --layers 784,256:relu,128:relu,10:softmax --loss xent \
  --batch 256 --epochs "${EPOCHS:-20}" --lr 0.05 --lr-schedule cosine --momentum 0.9 --seed 1 \
  --metrics "$build/fashion-mnist.jsonl" --progress "$progress" \
  --checkpoint-dir "$build/fashion-mnist-checkpoints" --checkpoint-every-epochs 5 "$@"

echo "metrics: $build/fashion-mnist.jsonl"
echo "model:   $build/fashion-mnist-checkpoints/$(cat "$build/fashion-mnist-checkpoints/latest")"
if /usr/bin/python3 "$root/scripts/plot-metrics.py" "$build/fashion-mnist.jsonl" \
    --out "$build/fashion-mnist.png"; then
  echo "curves:  $build/fashion-mnist.png"
fi
