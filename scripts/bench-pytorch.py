#!/usr/bin/python3
"""The same training step in plain PyTorch, for comparison with shardprop-bench.

Trains an MLP on the Fashion-MNIST HDF5 file that scripts/bench.sh converts (features,
labels) the way a user's single-process script would: nn.Sequential of Linear and ReLU,
cross-entropy, SGD with momentum, a fresh permutation every epoch, global batch B. Prints the
median samples/s of timed windows for each thread count, and the BLAS and oneDNN PyTorch
was built with. Needs python3-torch and python3-h5py (Debian); not part of the test suite.

usage: scripts/bench-pytorch.py DATA.h5 [--layers 784,1024,1024,10] [--batch 256]
       [--threads 1,2] [--windows 7] [--window-seconds 0.6]
"""
import argparse
import statistics
import time

import h5py
import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--layers", default="784,1024,1024,10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--window-seconds", type=float, default=0.6)
    args = p.parse_args()

    with h5py.File(args.data, "r") as f:
        x = torch.from_numpy(f["features"][...]).float()
        y = torch.from_numpy(f["labels"][...]).long()
    widths = [int(w) for w in args.layers.split(",")]
    print(f"PyTorch {torch.__version__}; {x.shape[0]} samples x {x.shape[1]} features; "
          f"layers {args.layers} (relu, softmax + cross-entropy), batch {args.batch}")
    for line in torch.__config__.show().splitlines():
        if "BLAS_INFO" in line or "MKL-DNN" in line or "CPU capability" in line:
            for part in line.split(","):
                if "BLAS_INFO" in part or "MKL-DNN" in part or "CPU capability" in part:
                    print("  " + part.strip())

    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        torch.manual_seed(1)
        layers = []
        for i in range(len(widths) - 1):
            layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
            if i + 2 < len(widths):
                layers.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*layers)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()
        order = torch.randperm(x.shape[0])
        cursor = 0

        def step():
            nonlocal order, cursor
            if cursor + args.batch > x.shape[0]:
                order, cursor = torch.randperm(x.shape[0]), 0
            idx = order[cursor:cursor + args.batch]
            cursor += args.batch
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()

        for _ in range(10):
            step()
        start = time.perf_counter()
        for _ in range(5):
            step()
        per_window = max(3, int(args.window_seconds / ((time.perf_counter() - start) / 5)))
        rates = []
        for _ in range(args.windows):
            start = time.perf_counter()
            for _ in range(per_window):
                step()
            rates.append(per_window * args.batch / (time.perf_counter() - start))
        print(f"threads {threads}: {statistics.median(rates):,.0f} samples/s "
              f"(median of {args.windows} windows of {per_window} steps)")


if __name__ == "__main__":
    main()
