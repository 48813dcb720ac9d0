#!/usr/bin/python3
"""Draws loss and accuracy curves from a shardprop --metrics JSON Lines file."""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics", help="JSON Lines file written by shardprop train --metrics")
    parser.add_argument("--out", default="curves.png", help="PNG file to write")
    args = parser.parse_args()
    try:
        with open(args.metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"plot-metrics: {args.metrics}: {e}")
    if not rows:
        sys.exit(f"plot-metrics: {args.metrics}: no epochs recorded")

    epochs = [r["epoch"] for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((loss_ax, "loss", "Loss"), (acc_ax, "acc", "Accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], marker="o", label="train")
        test = [r[f"test_{key}"] for r in rows]
        if any(v is not None for v in test):
            ax.plot(epochs, test, marker="s", label="test")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    last = rows[-1]
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")
    fig.suptitle(f"{plural(last['ranks'], 'rank')} x {plural(last['threads'], 'thread')} per rank, "
                 f"{last['samples_per_s']:.0f} samples/s in the last epoch")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
