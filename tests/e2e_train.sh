#!/usr/bin/env bash
# End to end: `mpirun -np 2 shardprop train` on generated blobs reaches >= 95% test accuracy,
# and writes one metrics line per epoch with the required keys (bad input: e2e_bad_input.sh).
# usage: e2e_train.sh SHARDPROP MAKE_BLOBS MPIEXEC [MPIEXEC FLAGS...]
# shellcheck source=tests/e2e_lib.sh
. "$(dirname "$0")/e2e_lib.sh"

"$make_blobs" "$work/train.h5" "$work/test.h5"
"${mpirun[@]}" -np 2 "$shardprop" train --train "$work/train.h5" --test "$work/test.h5" \
  --layers 10,32:relu,16:tanh,4:softmax --batch 50 --epochs 8 --lr 0.05 --seed 3 \
  --metrics "$work/run.jsonl" --save "$work/model.h5" | tee "$work/out.txt"

# The saved model evaluates to the last epoch's test metrics, under mpirun and without it.
"${mpirun[@]}" -np 3 "$shardprop" eval --checkpoint "$work/model.h5" --data "$work/test.h5" \
  > "$work/eval3.json"
"$shardprop" eval --checkpoint "$work/model.h5" --data "$work/test.h5" > "$work/eval1.json"
"$shardprop" info "$work/model.h5" | grep -qE "model +10,32:relu,16:tanh,4:softmax, loss xent"

python3 - "$work/run.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 8, f"expected 8 metrics lines, got {len(rows)}"
keys = {"epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc",
        "samples_per_s", "epoch_seconds", "ranks", "threads"}
for r in rows:
    missing = keys - r.keys()
    assert not missing, f"missing keys {missing}"
assert [r["epoch"] for r in rows] == list(range(1, 9))
assert rows[-1]["step"] == 8 * 40, rows[-1]["step"]
assert rows[-1]["ranks"] == 2
assert rows[-1]["test_acc"] >= 0.95, f"test accuracy {rows[-1]['test_acc']} < 0.95"
assert rows[-1]["train_loss"] < rows[0]["train_loss"]
print(f"final test accuracy {rows[-1]['test_acc']:.4f}")
for name in ("eval3.json", "eval1.json"):
    e = json.load(open(sys.argv[1].replace("run.jsonl", name)))
    assert e["samples"] == 500, e
    assert e["accuracy"] == rows[-1]["test_acc"], (e, rows[-1])
    assert abs(e["loss"] - rows[-1]["test_loss"]) <= 1e-6 * rows[-1]["test_loss"], (e, rows[-1])
PY
grep -q "shardprop train: 2 ranks" "$work/out.txt"

# --max-steps stops early, mid-epoch.
"${mpirun[@]}" -np 2 "$shardprop" train --train "$work/train.h5" --layers 10,8,4 --batch 64 \
  --epochs 5 --max-steps 7 --metrics "$work/short.jsonl" > /dev/null
python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; assert r[-1]['step']==7, r" \
  "$work/short.jsonl"

echo "e2e: all checks passed"
